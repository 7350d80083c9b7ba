"""`canvaslm bench passes`: what one forward pass costs, per pass size and per precision, in one run.

A decoding loop is a sequence of passes: an AR step is a causal pass over 1 token; committing a canvas (or checking
a verified draft) is a causal pass over C tokens; a denoising step is a canvas pass over C tokens. Each is timed
after a `--prompt-tokens` prompt is encoded, for each `--variants` entry (dtype:quantize, e.g. float32:none,
bfloat16:int4; `:rows=N` sends passes of up to N rows through the packed kernels, past the machine's crossover),
batch 1, median of `--repeats`, the variants taking turns pass by pass. The ratio the CPU plan turns on is
`canvas_vs_ar`: a canvas pass of C tokens against one AR step of the same variant (issue target: ≤ 1.5 at C = 32).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from rich.progress import Progress

from canvaslm.errors import CanvasError
from canvaslm.hardware import QUANTIZE_CHOICES, resolve_quantize
from canvaslm.models.cache import KVCache
from canvaslm.models.quant import causal_packed_weights, quantize as quantize_weights
from canvaslm.plotting import new_figure, save

DEFAULT_VARIANTS = "float32:none,bfloat16:none,bfloat16:int4"


class Variant(NamedTuple):
    dtype: str
    quantize: str
    compiled: bool | str = False  # True: torch.compile of the passes; "layers": the layer compiled ahead of time
    packed_rows: int | None = None  # most rows a packed linear takes (None: the machine's crossover)
    fused: bool = True  # q/k/v and gate/up packed as one weight each (`canvaslm.models.quant.FusedLinears`)
    aten: bool = False  # larger passes on aten's dense GEMM even where a packed model reorders it for oneDNN


def parse_variants(text: str) -> list[Variant]:
    """"float32:none,bfloat16:int4:compile,bfloat16:int4:rows=64" -> Variants, checked. `compile` runs the
    passes through torch.compile, `layers` the layer compiled ahead of time (`load(compile="layers")`); `rows=N`
    overrides `canvaslm.hardware.packed_max_rows`, to time packed kernels past the machine's crossover; `unfused`
    packs every linear alone (to time what fusing q/k/v and gate/up saves); `aten` keeps a packed model's larger
    passes on torch's default dense GEMM where `load` would reorder the weights for oneDNN
    (`canvaslm.hardware.onednn_float32_pays`)."""
    variants = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        dtype, quantize, *extras = item.split(":") if ":" in item else (item, "")
        rows = [e.removeprefix("rows=") for e in extras if e.startswith("rows=")]
        if (dtype not in ("auto", "float32", "bfloat16") or quantize not in QUANTIZE_CHOICES
                or any(e not in ("compile", "layers", "unfused", "aten", "") and not e.startswith("rows=")
                       for e in extras)
                or not all(r.isdigit() and int(r) > 0 for r in rows) or len(rows) > 1):
            raise CanvasError(f"--variants {item!r}: expected dtype:quantize[:compile|:layers][:rows=N][:unfused]"
                              "[:aten] "
                              "with dtype auto|float32|bfloat16 and quantize auto|none|int8|int4, e.g. "
                              "bfloat16:int4:compile")
        compiled = "layers" if "layers" in extras else "compile" in extras
        variants.append(Variant(dtype, quantize, compiled, int(rows[0]) if rows else None,
                                "unfused" not in extras, "aten" in extras))
    if not variants:
        raise CanvasError("--variants: give at least one dtype:quantize pair")
    return variants


def set_packed_rows(network: torch.nn.Module, rows: int) -> None:
    """Make every packed weight of `network`'s causal pass (linears, fused groups, head) take passes of up to
    `rows` rows."""
    for packed in causal_packed_weights(network):
        packed.max_rows = rows


def _time_ms(setup: Callable[[], Any], timed: Callable[[Any], Any]) -> float:
    """ms of one `timed(setup())`; `setup` runs untimed."""
    state = setup()
    start = time.perf_counter()
    timed(state)
    return 1000 * (time.perf_counter() - start)


def bench_passes(source: str, variants: list[Variant], sizes: list[int], prompt_tokens: int,
                 repeats: int, device: str | None = None) -> dict[str, Any]:
    """ms per causal pass and per canvas pass of each size, for each (dtype, quantize) variant of `source`: the
    median of `repeats` after one warm-up. Every variant is loaded first and they take turns, pass by pass: a shared
    machine's speed drifts by tens of percent within minutes (seen on a 2-core EPYC: one variant 52 then 73 ms an
    AR step in two runs minutes apart), and variant after variant would give that drift to one of them."""
    from canvaslm import load
    from canvaslm.engine.ar import advance

    rows, timers = [], []  # timers: (row, "causal_ms" | "canvas_ms", size, setup, timed)
    with torch.inference_mode():
        for dtype, quantize, compiled, packed_rows, fused, aten in variants:
            if fused and not aten:
                lm = load(source, device=device, dtype=dtype, quantize=quantize, compile=compiled)
            else:  # packed here, one linear at a time, or without reordered weights
                lm = load(source, device=device, dtype=dtype, quantize="none", compile=compiled)
                lm.quantization = resolve_quantize(quantize, lm.device)
                quantize_weights(lm.network, lm.quantization, fuse=fused, reorder=False if aten else None)
            network = lm.network
            if packed_rows is not None:
                set_packed_rows(network, packed_rows)
            generator = torch.Generator().manual_seed(0)
            prompt = torch.randint(3, network.vocab_size, (1, prompt_tokens), generator=generator).to(lm.device)

            def prompt_cache(network=network, prompt=prompt, device=lm.device) -> KVCache:
                # every timed pass starts from the same encoded prompt
                cache = network.new_cache(1, device)
                network.encode(prompt, cache, torch.ones_like(prompt, dtype=torch.bool))
                return cache

            shared = prompt_cache()  # canvas passes only read it
            packed = causal_packed_weights(network)
            row: dict[str, Any] = {"dtype": lm.dtype_name,
                                   "quantize": lm.quantization, "compiled": compiled, "fused": fused,
                                   "packed_rows": packed_rows or (packed[0].max_rows if packed else 0),
                                   "reordered": any(p.reordered is not None for p in packed),
                                   "causal_ms": {},
                                   "canvas_ms": {}}
            for size in sizes:
                tokens = torch.randint(3, network.vocab_size, (1, size), generator=generator).to(lm.device)
                timers.append((row, "causal_ms", size, prompt_cache,
                               lambda c, network=network, tokens=tokens: advance(network, c, tokens)))
                if lm.kind == "diffusion":
                    timers.append((row, "canvas_ms", size, lambda shared=shared: shared,
                                   lambda c, network=network, tokens=tokens: network.decode(tokens, c, None)))
            rows.append(row)
        times: dict[int, list[float]] = {i: [] for i in range(len(timers))}
        # no auto-refresh: rich's render thread would share the CPU with the passes it times
        with Progress(transient=True, auto_refresh=False) as progress:
            task = progress.add_task("passes", total=repeats + 1)
            for turn in range(repeats + 1):  # turn 0 warms up (and compiles) every pass
                for i, (_, _, _, setup, timed) in enumerate(timers):
                    elapsed = _time_ms(setup, timed)
                    if turn:
                        times[i].append(elapsed)
                progress.advance(task)
                progress.refresh()
        for i, (row, kind, size, _, _) in enumerate(timers):
            row[kind][str(size)] = round(statistics.median(times[i]), 2)
    for row in rows:
        ar_step = row["causal_ms"].get("1")
        if ar_step and row["canvas_ms"]:
            row["canvas_vs_ar"] = {size: round(ms / ar_step, 2) for size, ms in row["canvas_ms"].items()}
    return {"model": source, "prompt_tokens": prompt_tokens, "sizes": sizes, "repeats": repeats, "variants": rows}


def plot_passes(report: dict[str, Any], png: str | Path) -> bool:
    """ms per pass against the pass size, one line per variant and pass kind."""
    figure = new_figure(7, 4.5)
    if figure is None:
        return False
    axes = figure.subplots()
    for row in report["variants"]:
        compiled = {True: ", compiled", "layers": ", compiled layers"}.get(row.get("compiled"), "")
        label = f"{row['dtype']}, {row['quantize']}{compiled}"
        label += ", unfused" if row.get("fused") is False else ""
        label += f" (packed to {row['packed_rows']} rows)" if row.get("packed_rows") else ""
        label += ", then reordered for oneDNN" if row.get("reordered") else ""
        for kind, style in (("causal_ms", "o-"), ("canvas_ms", "s--")):
            if row[kind]:
                sizes = [int(s) for s in row[kind]]
                axes.plot(sizes, list(row[kind].values()), style, label=f"{kind.split('_')[0]} pass, {label}")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("tokens in the pass (batch 1)")
    axes.set_ylabel("ms per pass (median)")
    axes.set_title(f"{report['model']}: one forward pass after a {report['prompt_tokens']}-token prompt")
    axes.legend(fontsize=7)
    return save(figure, png)
