"""`canvaslm bench decoding`: a diffusion model's three ways to write, side by side on the same weights and prompts
(the 8 chat questions of `bench serve`, in batches of 1 and 8): its canvases (`diffusion`), canvas drafts checked
by its causal pass (`verified`), and the causal pass alone (`autoregressive`). Per mode and batch size: tokens/s,
tokens per forward pass, passes; verified also its mean accepted length (tokens written per draft-and-check round),
its acceptance by draft position and its agreement with the autoregressive tokens (greedy: 1.0 up to float ties,
which is the lossless claim)."""

from __future__ import annotations

import time
from typing import Any

import torch
from rich.progress import Progress

from canvaslm.bench.quality import setting_label
from canvaslm.bench.serve import PROMPTS
from canvaslm.engine.ar import ar_generate
from canvaslm.engine.lm import LM
from canvaslm.engine.verified import draft_size, verified_generate
from canvaslm.errors import CanvasError
from canvaslm.plotting import new_figure, save

DECODINGS = ("autoregressive", "verified", "diffusion")


def bench_decoding(lm: LM, batch_sizes: list[int], new_tokens: int, temperature: float = 0.0,
                   settings: list[dict[str, Any]] = ({},), seed: int = 0,
                   decodings: tuple[str, ...] = DECODINGS) -> dict[str, Any]:
    """Run every decoding of `decodings` (the autoregressive one always: the others are measured against it) at
    every batch size over all of `PROMPTS`, in batches of that size (batch 1: each prompt alone; a batch larger
    than the prompts repeats them), the modes taking turns batch by batch, after one untimed batch of each. The
    canvases run once per entry of `settings` (the model's defaults overridden by it; a row "diffusion ·
    <setting>" where it is not empty). Greedy by default (temperature 0). Times, tokens and passes add up over the
    batches."""
    if lm.kind != "diffusion":
        raise CanvasError(f"{lm.source} is autoregressive: bench decoding compares a diffusion model's ways to write")
    unknown = sorted(set(decodings) - set(DECODINGS))
    if unknown:
        raise CanvasError(f"--decodings takes {', '.join(DECODINGS)} (comma-separated), got {', '.join(unknown)}")
    for setting in settings:
        lm.diffusion_settings(dict(setting))  # a bad setting is refused before the first timing
    # mode -> the canvases' setting (None for the two AR-distributed modes)
    modes: dict[str, dict[str, Any] | None] = {"autoregressive": None}
    if "verified" in decodings:
        modes["verified"] = None
    if "diffusion" in decodings:
        modes.update({"diffusion" + (f" · {setting_label(s)}" if s else ""): dict(s) for s in settings})
    prompts = [lm.chat_prompt_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    rows = []
    with Progress(transient=True) as progress:
        for batch in batch_sizes:
            groups = [[prompts[(start + i) % len(prompts)] for i in range(batch)]
                      for start in range(0, len(prompts), batch)]
            task = progress.add_task(f"bench decoding, batch {batch}", total=(len(groups) + 1) * len(modes))
            for mode, setting in modes.items():
                # untimed: the first batch pays one-off costs (with --compile, minutes of compilation per pass
                # shape), which a timing of seconds would otherwise report as the mode's speed
                _run_group(lm, mode, groups[0], new_tokens, temperature, setting, seed, _totals())
                progress.advance(task)
            totals = {mode: _totals() for mode in modes}
            # the modes take turns batch by batch: a shared machine's speed drifts by tens of percent within
            # minutes, and mode after mode would give that drift to one of them
            for group in groups:
                for mode, setting in modes.items():
                    _run_group(lm, mode, group, new_tokens, temperature, setting, seed, totals[mode])
                    progress.advance(task)
            rows += [_row(mode, batch, len(groups) * batch, totals[mode], totals["autoregressive"]["generated"])
                     for mode in modes]
    by = {(r["decoding"], r["batch"]): r for r in rows}
    for r in rows:
        r["speed_vs_autoregressive"] = round(r["tokens_per_second"] / by["autoregressive", r["batch"]]
                                             ["tokens_per_second"], 3)
    return {"new_tokens": new_tokens, "temperature": temperature, "prompts": len(PROMPTS),
            "draft_size": draft_size(lm.network),
            "diffusion_settings": {mode: vars(lm.diffusion_settings(setting)) for mode, setting in modes.items()
                                   if setting is not None}, "runs": rows}


def _totals() -> dict[str, Any]:
    """What `_run_group` adds up for one mode at one batch size."""
    return {"tokens": 0, "seconds": 0.0, "passes": 0.0, "max_passes": 0, "rounds": 0, "accepted": 0,
            "lengths": None, "generated": []}


def _row(mode: str, batch: int, prompts: int, totals: dict[str, Any], ar_tokens: list[list[int]]
         ) -> dict[str, Any]:
    """One mode's line of the report at one batch size, from its summed `totals`."""
    row = {"decoding": mode, "batch": batch, "prompts": prompts, "tokens": totals["tokens"],
           "seconds": round(totals["seconds"], 3),
           "tokens_per_second": round(totals["tokens"] / totals["seconds"], 2),
           # a step of a batch is one pass for all its rows: passes of each batch's slowest row
           "forward_passes": totals["max_passes"],
           "tokens_per_forward": round(totals["tokens"] / totals["passes"], 3)}
    if mode == "verified":
        lengths = totals["lengths"]  # rounds that accepted 0..n drafts
        row.update(rounds=totals["rounds"], accepted_drafts=totals["accepted"],
                   tokens_per_round=round(totals["tokens"] / max(1, totals["rounds"]), 3),
                   # the share of rounds whose draft token j was accepted, j = 1..n (vLLM's acceptance rate per
                   # position): where a drafter tuned for acceptance would gain
                   acceptance_by_position=[round(float(lengths[j:].sum()) / max(1, totals["rounds"]), 3)
                                           for j in range(1, len(lengths))])
        same = sum(_common_prefix(a, b) for a, b in zip(totals["generated"], ar_tokens, strict=True))
        row["agreement_with_autoregressive"] = round(same / max(1, sum(map(len, ar_tokens))), 4)
    return row


def _run_group(lm: LM, mode: str, group: list[list[int]], new_tokens: int, temperature: float,
               diffusion: dict[str, Any] | None, seed: int, totals: dict[str, Any]) -> None:
    """One batch of prompts in one decoding; adds its time, tokens, passes (and verified's rounds) to `totals`."""
    options = {"temperature": temperature, "top_k": 0, "top_p": 1.0}
    input_ids, valid = lm.batch(group)
    generator = torch.Generator(lm.device).manual_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode():
        if mode == "autoregressive":
            out = ar_generate(lm.network, input_ids, valid, new_tokens, eos_token_ids=lm.eos_token_ids,
                              pad_token_id=lm.pad_token_id, generator=generator, **options)
            sequences, passes = out.sequences, torch.full((len(group),), out.forward_passes)
        elif mode == "verified":
            out = verified_generate(lm.network, input_ids, valid, new_tokens, eos_token_ids=lm.eos_token_ids,
                                    pad_token_id=lm.pad_token_id, generator=generator, **options)
            sequences, passes = out.sequences, out.forward_passes
            totals["rounds"] += int(out.rounds.sum())
            totals["accepted"] += int(out.accepted.sum())
            totals["lengths"] = out.accepted_lengths if totals["lengths"] is None else (
                totals["lengths"] + out.accepted_lengths)
        else:
            result = lm.generate(group, new_tokens, seed=seed, **(diffusion or {}))
            sequences, passes = result.sequences, result.forward_passes
    totals["seconds"] += time.perf_counter() - start
    generated = [lm.decode_new(row, input_ids.shape[1])[0][:new_tokens] for row in sequences]
    totals["generated"] += generated
    totals["tokens"] += sum(map(len, generated))
    totals["passes"] += float(passes.float().sum())
    totals["max_passes"] += int(passes.max())


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def plot_decoding(report: dict[str, Any], png: str) -> bool:
    """Tokens/s and tokens per forward pass per decoding, one group of bars per batch size."""
    figure = new_figure(9, 3.6)
    if figure is None:
        return False
    axes = figure.subplots(1, 2)
    batches = sorted({r["batch"] for r in report["runs"]})
    modes = list(dict.fromkeys(r["decoding"] for r in report["runs"]))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        runs = {r["batch"]: r for r in report["runs"] if r["decoding"] == mode}
        for ax, key in zip(axes, ("tokens_per_second", "tokens_per_forward"), strict=True):
            ax.bar([j + i * width for j in range(len(batches))], [runs[b][key] for b in batches], width, label=mode)
    for ax, title in zip(axes, ("tokens / s", "tokens per forward pass"), strict=True):
        ax.set_xticks([j + width for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_title(title)
    axes[0].legend()
    figure.suptitle(f"decoding modes, {report.get('model', '')} ({report['new_tokens']} tokens, "
                    f"temperature {report['temperature']})")
    return save(figure, png)
