"""How good and how fast a converted model is, next to its autoregressive parent (`canvaslm quality`).

On held-out chat prompts, every sampler setting of the diffusion model, the AR model (temperature 0.7, our own
loop) and the diffusion model's verified decoding (temperature 0.7: its canvas drafts, checked by its causal pass)
answer with up to `max_new_tokens` tokens; then, per system:

* GenPPL: exp of the AR judge's mean NLL per response token given the chat prompt (token-weighted over all
  responses; an emitted end-of-turn counts as a token, so ending well is scored too). The judge scores in float32
  without quantization (`scorer`), whatever precision the systems run in;
* unigram entropy: entropy of each response's token histogram, averaged over responses (low = repetition);
* distinct-4: unique / total token 4-grams over all responses;
* tokens per forward (the reference's per-row metric, averaged), empty answers;
* CPU tok/s at batch 1 on the first `speed_prompts` prompts: response tokens / wall time, the AR judge, the
  default setting and verified decoding taking turns prompt by prompt.

Optional reference rows answer with the AR judge at other temperatures (`ar_temperatures`).

`acceptance` compares the default diffusion setting with the AR model against the default-model targets, and
`plot_frontier` draws GenPPL against tokens per forward for all settings.

A report takes hours on a CPU (200 prompts x 128 tokens per system), so with `resume` every system's scored answers
are written to that file as soon as they are done, and a run started again on the same models, prompts and options
takes them from there instead of answering again (`canvaslm quality` keeps `OUT.partial.json` beside its report).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from canvaslm.engine.lm import LM
from canvaslm.errors import CanvasError

AR_SETTING: dict[str, Any] = {"temperature": 0.7}
# the default model's acceptance (issue 17), and the targets beyond it
TARGETS = {"genppl_ratio_max": 1.5, "entropy_ratio_min": 0.85, "tokens_per_forward_min": 3.0,
           "empty_answers_max": 0, "cpu_speedup_min": 2.0}
STRETCH = {"tokens_per_forward_min": 4.0, "cpu_speedup_min": 3.0}


@dataclass
class SystemReport:
    name: str
    setting: dict[str, Any]
    genppl: float
    unigram_entropy: float
    distinct_4: float
    tokens_per_forward: float
    mean_response_tokens: float
    empty_answers: int
    tokens_per_second_batch1: float | None
    samples: list[str]
    tokens_per_pass_with_commits: float | None = None  # tokens per forward, the causal passes that commit the
                                                       # canvases counted too (None: no such passes, AR)
    doubled_words: float | None = None  # words equal to the word before them per 1,000 words (None: no text)


def read_prompts(source: str | Path, limit: int, tokenizer: Any,
                 exclude: str | Path | Sequence[str | Path] | None = None) -> list[list[int]]:
    """Up to `limit` chat prompts (ids) from a `canvaslm data build` directory (its last examples) or a JSONL file
    (`{"messages": [...]}` or `{"prompt": "..."}` per line, rendered with the chat template); prompts that occur in
    the data directories `exclude` (the training data) are dropped."""
    from canvaslm.train.shards import open_shards

    seen = set()
    for directory in [exclude] if isinstance(exclude, (str, Path)) else exclude or []:
        excluded = open_shards(directory)
        seen |= {tuple(excluded[i][0].tolist()) for i in range(len(excluded))}
    path = Path(source)
    if path.is_dir():
        shards = open_shards(path)
        prompts = [p for p in (shards[i][0].tolist() for i in range(len(shards))) if tuple(p) not in seen]
        return prompts[-limit:]
    if not path.is_file():
        raise CanvasError(f"{path}: not found; expected a data directory or a JSONL file of prompts")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CanvasError(f"{path}:{number}: not JSON ({e.msg})") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if messages is None and isinstance(record, dict) and isinstance(record.get("prompt"), str):
            messages = [{"role": "user", "content": record["prompt"]}]
        if not isinstance(messages, list) or not messages:
            raise CanvasError(f"{path}:{number}: expected {{\"messages\": [...]}} or {{\"prompt\": \"...\"}}")
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        if tuple(ids) not in seen:
            prompts.append(ids)
        if len(prompts) == limit:
            break
    return prompts


def answer(lm: LM, prompts: Sequence[list[int]], setting: Mapping[str, Any], max_new_tokens: int,
           batch_size: int, seed: int, progress: Any = None
           ) -> tuple[list[list[int]], list[bool], float, float | None]:
    """(response ids cut at end-of-turn and max_new_tokens, whether each ended with end-of-turn, mean tokens per
    forward, the same with the commits' causal passes counted or None) for every prompt, generated in batches."""
    responses, stopped, tpf, with_commits = [], [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        out = lm.generate(chunk, max_new_tokens, seed=seed + start, **setting)
        width = max(map(len, chunk))  # prompts are left-padded to the longest
        for row in range(len(chunk)):
            ids, reason = lm.decode_new(out.sequences[row], width)
            responses.append(ids[:max_new_tokens])
            stopped.append(reason == "stop" and len(ids) <= max_new_tokens)
        tpf.extend(out.tokens_per_forward.tolist())
        if out.commit_passes is not None:
            tokens = out.tokens_per_forward * out.forward_passes
            with_commits.extend((tokens / (out.forward_passes + out.commit_passes).clamp(min=1)).tolist())
        if progress is not None:
            progress()
    return responses, stopped, sum(tpf) / len(tpf), sum(with_commits) / len(with_commits) if with_commits else None


def judge_nll(judge: LM, prompts: Sequence[list[int]], responses: Sequence[list[int]], stopped: Sequence[bool],
              batch_size: int = 8) -> tuple[float, int]:
    """(summed NLL, scored tokens) of the responses (plus end-of-turn where emitted) under the AR judge."""
    eos = judge.eos_token_ids[0]
    total, count = 0.0, 0
    rows = [(p, r + ([eos] if s else [])) for p, r, s in zip(prompts, responses, stopped, strict=True)]
    for start in range(0, len(rows), batch_size):
        chunk = [(p, r) for p, r in rows[start:start + batch_size] if r]
        if not chunk:
            continue
        logits = judge.logits([p + r for p, r in chunk])  # left-padded: each row ends at the same column
        width = logits.shape[1]
        for row, (_, response) in enumerate(chunk):
            n = len(response)
            predicted = logits[row, width - n - 1: width - 1].log_softmax(-1)
            target = torch.tensor(response, device=predicted.device)
            total -= float(predicted.gather(-1, target[:, None]).sum())
            count += n
    return total, count


def unigram_entropy(ids: Sequence[int]) -> float:
    """Entropy (nats) of the token histogram of one response."""
    if not ids:
        return 0.0
    counts, n = Counter(ids), len(ids)
    return -sum(c / n * math.log(c / n) for c in counts.values())


def distinct_ngrams(responses: Sequence[Sequence[int]], n: int = 4) -> float:
    grams = [tuple(r[i:i + n]) for r in responses for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def doubled_words(texts: Sequence[str]) -> float | None:
    """Words equal to the word just before them ("the sky sky blue") per 1,000 words of `texts` (words: runs of
    letters, lowercased); None when there are none. A canvas draws the positions of one pass independently, and a
    word written twice is how that shows in its text; an AR model's own rate is the yardstick."""
    words = [re.findall(r"[^\W\d_]+", text.lower()) for text in texts]
    total = sum(map(len, words))
    if not total:
        return None
    return 1000 * sum(a == b for w in words for a, b in zip(w, w[1:])) / total


def tokens_per_second(systems: Sequence[tuple[LM, Mapping[str, Any]]], prompts: Sequence[list[int]],
                      max_new_tokens: int, seed: int) -> list[float]:
    """Response tokens per wall-clock second of each (model, setting), one prompt at a time (batch 1), after one
    warm-up call each. The systems take turns prompt by prompt: a shared machine's speed drifts by tens of percent
    within minutes, and system after system would give that drift to one of them."""
    for lm, setting in systems:
        lm.generate([prompts[0]], 8, seed=seed, **setting)
    tokens, seconds = [0] * len(systems), [0.0] * len(systems)
    for i, prompt in enumerate(prompts):
        for j, (lm, setting) in enumerate(systems):
            start = time.perf_counter()
            out = lm.generate([prompt], max_new_tokens, seed=seed + i, **setting)
            seconds[j] += time.perf_counter() - start
            tokens[j] += len(lm.decode_new(out.sequences[0], len(prompt))[0][:max_new_tokens])
    return [t / s if s else 0.0 for t, s in zip(tokens, seconds, strict=True)]


def evaluate_system(lm: LM, judge: LM, name: str, prompts: Sequence[list[int]], setting: Mapping[str, Any], *,
                    max_new_tokens: int, batch_size: int, seed: int, progress: Any = None) -> SystemReport:
    """The system's answers to `prompts`, scored by `judge` (its speed is timed apart: `tokens_per_second`)."""
    responses, stopped, tpf, with_commits = answer(lm, prompts, setting, max_new_tokens, batch_size, seed, progress)
    nll, count = judge_nll(judge, prompts, responses, stopped)
    tokenizer = judge.tokenizer
    texts = [tokenizer.decode(r) for r in responses] if tokenizer is not None else []
    return SystemReport(
        name=name, setting=dict(setting), genppl=math.exp(nll / count) if count else float("inf"),
        unigram_entropy=sum(map(unigram_entropy, responses)) / len(responses),
        distinct_4=distinct_ngrams(responses), tokens_per_forward=tpf,
        mean_response_tokens=sum(map(len, responses)) / len(responses),
        empty_answers=sum(not t.strip() for t in texts) if texts else sum(not r for r in responses),
        tokens_per_second_batch1=None, samples=texts[:5], tokens_per_pass_with_commits=with_commits,
        doubled_words=doubled_words(texts))


def acceptance(diffusion: SystemReport, ar: SystemReport) -> dict[str, Any]:
    """Each default-model target with the measured value and whether it holds."""
    speedup = (diffusion.tokens_per_second_batch1 / ar.tokens_per_second_batch1
               if diffusion.tokens_per_second_batch1 and ar.tokens_per_second_batch1 else None)
    checks = {
        "genppl_ratio": (diffusion.genppl / ar.genppl, lambda v: v <= TARGETS["genppl_ratio_max"]),
        "entropy_ratio": (diffusion.unigram_entropy / ar.unigram_entropy if ar.unigram_entropy else 0.0,
                          lambda v: v >= TARGETS["entropy_ratio_min"]),
        "tokens_per_forward": (diffusion.tokens_per_forward, lambda v: v >= TARGETS["tokens_per_forward_min"]),
        "empty_answers": (diffusion.empty_answers, lambda v: v <= TARGETS["empty_answers_max"]),
        "cpu_speedup": (speedup, lambda v: v is not None and v >= TARGETS["cpu_speedup_min"]),
    }
    result = {name: {"value": value, "passed": bool(ok(value))} for name, (value, ok) in checks.items()}
    result["all_passed"] = all(item["passed"] for item in result.values())
    result["stretch"] = {
        "tokens_per_forward": diffusion.tokens_per_forward >= STRETCH["tokens_per_forward_min"],
        "cpu_speedup": speedup is not None and speedup >= STRETCH["cpu_speedup_min"]}
    return result


def check_systems(model: LM, judge: LM) -> None:
    if model.kind != "diffusion" or judge.kind != "autoregressive":
        raise CanvasError(f"quality needs a diffusion model and an autoregressive judge; got {model.source} "
                          f"({model.kind}) and {judge.source} ({judge.kind})")


def quality_report(model: LM, judge: LM, prompts: Sequence[list[int]], settings: Sequence[Mapping[str, Any]], *,
                   max_new_tokens: int = 128, batch_size: int = 16, speed_prompts: int = 10, seed: int = 0,
                   show_progress: bool = True, verified: bool = True, scorer: LM | None = None,
                   ar_temperatures: Sequence[float] = (), resume: str | Path | None = None) -> dict[str, Any]:
    """The whole report: one entry per diffusion setting (the first is the default, timed at batch 1), the AR
    judge's own answers at temperature 0.7, the model's verified decoding at the same AR setting (its output has
    the distribution of the model's causal pass: the parent's, for canvas-only adapters), and the acceptance
    checks. `scorer` computes GenPPL (default: `judge` itself; the CLI passes the judge in float32 when the
    systems run in another precision). `ar_temperatures` adds the judge's answers at other temperatures as
    reference rows (`ar_references`): a diffusion setting that writes sharper text than the parent at 0.7 can be
    read next to the parent at its own temperature, while the acceptance stays against 0.7. `resume`: a file
    that keeps each system's scored answers as they finish, read back when the run is the same
    (`run_fingerprint`); speeds are timed anew."""
    check_systems(model, judge)
    scorer = judge if scorer is None else scorer
    if not prompts:
        raise CanvasError("quality needs at least one prompt")
    for setting in settings:  # a bad setting fails now, not after the systems before it have run for an hour
        options = dict(setting)
        decoding = options.pop("decoding", None)
        model.resolve_sampling(options, decoding)
    for temperature in ar_temperatures:
        judge.resolve_sampling({"temperature": temperature}, None)
    per_system = math.ceil(len(prompts) / batch_size)
    batches = per_system * (len(settings) + 1 + verified + len(ar_temperatures))
    run = None if resume is None else run_fingerprint((model, judge, scorer), prompts, max_new_tokens, batch_size,
                                                      seed)
    done = {} if resume is None else resumed_systems(resume, run)
    if done and show_progress:
        print(f"resuming from {resume}: {', '.join(done)} already answered", file=sys.stderr)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not show_progress, transient=True) as bar:
        task = bar.add_task("answering", total=batches)
        step = lambda: bar.advance(task)  # noqa: E731
        resumed = []  # the systems whose answers an earlier, cut-off run of the same fingerprint gave

        def system(lm: LM, name: str, setting: Mapping[str, Any]) -> SystemReport:
            kept = done.get(name)
            if kept is not None and kept.setting == dict(setting):
                bar.advance(task, per_system)
                resumed.append(name)
                return kept
            done[name] = evaluate_system(lm, scorer, name, prompts, setting, max_new_tokens=max_new_tokens,
                                         batch_size=batch_size, seed=seed, progress=step)
            if resume is not None:
                save_systems(resume, run, done)
            return done[name]

        ar = system(judge, "autoregressive", AR_SETTING)
        diffusion = [system(model, f"diffusion {json.dumps(s)}", s) for s in settings]
        verified_setting = {**AR_SETTING, "decoding": "verified"}
        checked = system(model, "verified", verified_setting) if verified else None
        references = [system(judge, f"autoregressive T={t:g}", {"temperature": t}) for t in ar_temperatures]
    if speed_prompts > 0:  # the AR judge, the default setting and verified decoding, timed side by side
        timed = [(ar, judge, AR_SETTING), (diffusion[0], model, settings[0])]
        timed += [(checked, model, verified_setting)] if checked is not None else []
        speeds = tokens_per_second([(lm, setting) for _, lm, setting in timed], prompts[:speed_prompts],
                                   max_new_tokens, seed)
        for (report, _, _), speed in zip(timed, speeds, strict=True):
            report.tokens_per_second_batch1 = speed
    return {"model": model.source, "judge": judge.source, "prompts": len(prompts), "max_new_tokens": max_new_tokens,
            "precision": {"systems": _precision(model), "judge_scoring": _precision(scorer)},
            "seed": seed, "device": str(model.device), "threads": torch.get_num_threads(),
            "autoregressive": asdict(ar), "diffusion": [asdict(d) for d in diffusion],
            "verified": None if checked is None else asdict(checked),
            "ar_references": [asdict(r) for r in references], "resumed": resumed,
            "targets": TARGETS, "acceptance": acceptance(diffusion[0], ar)}


def run_fingerprint(lms: Sequence[LM], prompts: Sequence[list[int]], max_new_tokens: int, batch_size: int,
                    seed: int) -> str:
    """A digest of everything a system's answers and scores depend on: each model's weights (every byte of its
    state, so an asset retrained in place is a new run), source, precision and sampler defaults, the prompts, the
    token budget, the batching (padding and seeds follow it) and the seed."""
    digest = hashlib.sha256(json.dumps([prompts, max_new_tokens, batch_size, seed]).encode())
    for lm in {id(lm): lm for lm in lms}.values():
        defaults = vars(lm.diffusion_defaults) if lm.kind == "diffusion" else lm.ar_defaults
        digest.update(json.dumps([lm.source, lm.kind, _precision(lm), defaults], sort_keys=True,
                                 default=str).encode())
        for name, tensor in lm.network.state_dict().items():
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def resumed_systems(path: str | Path, run: str) -> dict[str, SystemReport]:
    """The systems a cut-off run of the same fingerprint finished (by name); none when `path` is missing,
    unreadable or from another run, which the next save replaces."""
    try:
        kept = json.loads(Path(path).read_text(encoding="utf-8"))
        if kept.get("fingerprint") != run:
            return {}
        return {name: SystemReport(**fields) for name, fields in kept["systems"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def save_systems(path: str | Path, run: str, systems: Mapping[str, SystemReport]) -> None:
    """Write the finished systems for `resumed_systems`, whole or not at all (a kill mid-write keeps the last)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps({"fingerprint": run, "systems": {k: asdict(v) for k, v in systems.items()}},
                                  ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, path)


def _precision(lm: LM) -> dict[str, str]:
    return {"dtype": lm.dtype_name, "quantize": lm.quantization, **({"compiled": lm.compiled} if lm.compiled else {})}


SHORT_NAMES = {"entropy_bound": "bound", "accept_probability": "p", "max_denoising_steps": "steps"}


def setting_label(setting: Mapping[str, Any]) -> str:
    """A sampler setting in a few words for a plot: `order=left_to_right,acceptance=threshold,accept_probability=0.9`
    -> `left_to_right threshold p=0.9`."""
    words = [str(v) if k in ("order", "acceptance", "sampler") else f"{SHORT_NAMES.get(k, k)}={v}"
             for k, v in setting.items()]
    return " ".join(words) or "defaults"


def shared_and_own(settings: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the keys and values every setting shares, each setting's other keys): with several settings a plot names
    the shared part once and each point by what sets it apart (a long setting in every label runs off the figure).
    One setting is all its own."""
    if len(settings) < 2:
        return {}, [dict(s) for s in settings]
    shared = {k: v for k, v in settings[0].items() if all(k in s and s[k] == v for s in settings[1:])}
    return shared, [{k: v for k, v in s.items() if k not in shared} for s in settings]


def plot_frontier(report: Mapping[str, Any], png: str | Path) -> bool:
    """GenPPL against tokens per forward, one point per diffusion setting, the AR model as a reference line;
    False when matplotlib (the `train` extra) is missing."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend state
        from matplotlib.ticker import LogFormatter
    except ImportError:
        return False
    shared, own = shared_and_own([p["setting"] for p in report["diffusion"]])
    entries = len(own) + 2 + bool(report.get("verified")) + len(report.get("ar_references", []))
    figure = Figure(figsize=(6.4, 3.6 + 0.16 * entries), layout="constrained")
    ax = figure.add_subplot()
    for i, (p, setting) in enumerate(zip(report["diffusion"], own, strict=True)):  # one marker per setting,
        # named in the legend: labels beside close points would overlap
        ax.plot([p["tokens_per_forward"]], [p["genppl"]], marker="os^vDP<>X*"[i % 10], linestyle="none",
                label=f"diffusion: {setting_label(setting)}")
    ar, checked = report["autoregressive"], report.get("verified")
    if checked:
        ax.plot([checked["tokens_per_forward"]], [checked["genppl"]], "s", color="green",
                label=f"verified, T=0.7 (GenPPL {checked['genppl']:.1f})")
    ax.axhline(ar["genppl"], color="grey", linestyle="--", label=f"AR, T=0.7 (GenPPL {ar['genppl']:.1f})")
    for reference, style in zip(report.get("ar_references", []), ["-.", ":", (0, (5, 1))] * 4):
        ax.axhline(reference["genppl"], color="grey", linestyle=style,
                   label=f"AR, T={reference['setting']['temperature']:g} (GenPPL {reference['genppl']:.1f})")
    ax.axhline(ar["genppl"] * TARGETS["genppl_ratio_max"], color="red", linestyle=":", label="1.5x AR")
    ax.set_yscale("log")
    # 3.4, not 3.4 x 10^0; minor ticks are labeled only where the range is narrow (LogFormatter's thresholds)
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax.set_xlabel("tokens per forward pass")
    ax.set_ylabel("GenPPL (AR judge)")
    ax.set_title(f"quality/speed frontier, {report['prompts']} prompts")
    if shared:
        figure.suptitle(f"every setting: {setting_label(shared)}", fontsize=7, wrap=True)
    figure.legend(loc="outside lower center", fontsize=7)  # below the axes: it never hides a point
    figure.savefig(png, dpi=120)
    return True
