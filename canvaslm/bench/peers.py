"""`canvaslm bench peers`: llama.cpp beside us on the same GGUF, the same prompts, batch 1, the same threads.

Systems, each answering the same chat prompts (token ids from our tokenizer, so every system reads the same
prompt) greedily, up to `--new-tokens` tokens or the end of turn, one prompt at a time:

* `llama.cpp`: llama-cpp-python (the optional extra `pip install -e ".[peers]"`, compiled from source) on the
  GGUF file. It runs in a subprocess, so a crash of the native library is reported, not fatal; its KV cache is
  reset before every prompt (it would otherwise reuse the shared chat-template prefix, which our loops do not).
* `canvaslm autoregressive`: our AR loop on the parent (`--ar`, default smol-ar), once per precision variant.
* `canvaslm diffusion` and `canvaslm verified`: the model under test (`-m`) in each precision variant after its AR
  loop, diffusion at its default sampler setting.

tok/s = tokens written / wall seconds, prompts included, after one warm-up prompt (which also pays a compiled
variant's compilation). JSON + PNG.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from canvaslm.bench.passes import Variant
from canvaslm.bench.serve import PROMPTS
from canvaslm.errors import CanvasError
from canvaslm.plotting import new_figure, save


def llama_cpp_rates(gguf: Path, prompts: list[list[int]], new_tokens: int, threads: int, n_batch: int,
                    extra_buffers: bool = True) -> dict:
    """Run llama.cpp on `prompts` in a subprocess; its measurements, or {"error": ...} if it failed or crashed.
    `extra_buffers=False` keeps the weights as stored (llama.cpp's `use_extra_bufts`: no AMX / CPU repacking)."""
    spec = {"gguf": str(gguf), "prompts": prompts, "new_tokens": new_tokens, "threads": threads, "n_batch": n_batch,
            "extra_buffers": extra_buffers}
    try:
        done = subprocess.run([sys.executable, "-m", "canvaslm.bench.peers"], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 30 minutes"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit status {done.returncode} ({tail})"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _llama_cpp_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The subprocess side of `llama_cpp_rates`."""
    import llama_cpp
    import llama_cpp.llama_cpp as native

    defaults = native.llama_model_default_params

    def model_params() -> Any:  # Llama() has no argument for it; it starts from these defaults
        params = defaults()
        params.use_extra_bufts = spec.get("extra_buffers", True)
        return params

    native.llama_model_default_params = model_params
    longest = max(map(len, spec["prompts"])) + spec["new_tokens"] + 8
    llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=max(512, longest), n_threads=spec["threads"],
                          n_threads_batch=spec["threads"], n_batch=spec["n_batch"], seed=0, verbose=False)

    def answer(prompt: list[int]) -> int:
        llm.reset()
        out = llm.create_completion(prompt, max_tokens=spec["new_tokens"], temperature=0.0, top_k=1)
        return int(out["usage"]["completion_tokens"])

    answer(spec["prompts"][0])  # warm-up
    tokens, start = 0, time.perf_counter()
    for prompt in spec["prompts"]:
        tokens += answer(prompt)
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 2),
            "version": llama_cpp.__version__, "n_batch": spec["n_batch"], "threads": spec["threads"],
            "extra_buffers": spec.get("extra_buffers", True),
            "amx": "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode(errors="replace")}


def _ours(lm, prompts: list[list[int]], new_tokens: int, **options: Any) -> dict[str, Any]:
    """Our loop on `prompts`, one at a time, greedy (AR modes) or the model's defaults (diffusion)."""
    def answer(prompt: list[int]) -> tuple[int, int]:
        out = lm.generate([prompt], new_tokens, seed=0, **options)
        written = lm.decode_new(out.sequences[0], len(prompt))[0][:new_tokens]
        return len(written), int(out.forward_passes[0])

    answer(prompts[0])  # warm-up
    tokens, passes, start = 0, 0, time.perf_counter()
    for prompt in prompts:
        n, p = answer(prompt)
        tokens, passes = tokens + n, passes + p
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 2),
            "tokens_per_forward": round(tokens / max(1, passes), 3)}


def bench_peers(model: str, ar: str, variants: list[Variant], new_tokens: int, threads: int,
                n_batch: int = 512, gguf: str | None = None) -> dict[str, Any]:
    from canvaslm import load
    from canvaslm.loading import registry

    gguf_path = Path(gguf) if gguf else registry.resolve(ar)
    if gguf_path is None or gguf_path.suffix != ".gguf" or not gguf_path.is_file():
        raise CanvasError(f"bench peers needs the AR parent as a .gguf file (--gguf, or --ar naming one); got "
                          f"{gguf or ar}")
    variants = [Variant(*variant) for variant in variants]
    for variant in variants:  # the AR loop as `load` builds it: `bench passes` times the rest
        if variant.packed_rows is not None or not variant.fused or variant.aten:
            raise CanvasError(f"bench peers --variants: expected dtype:quantize[:compile] (the AR loop as `load` "
                              f"builds it; rows=N, unfused and aten are `bench passes` variants), got {variant}")
    parent = load(ar, dtype=torch.float32)
    prompts = [parent.chat_prompt_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    rows: list[dict[str, Any]] = []
    peer = llama_cpp_rates(gguf_path, prompts, new_tokens, threads, n_batch)
    if "error" in peer and n_batch > 1:
        # on AMX CPUs ggml repacks Q4_1 weights for its AMX kernels, whose batched (prompt) path dies when built
        # by GCC 12: its `_tile_loadconfig` tells the compiler that ldtilecfg reads 8 bytes, so the tile sizes
        # are never stored and the first tile instruction faults (docs/performance.md). One token a time never
        # enters that path and keeps the fast repacked weights.
        first_error = peer["error"]
        peer = llama_cpp_rates(gguf_path, prompts, new_tokens, threads, 1)
        peer["n_batch_error"] = f"n_batch={n_batch}: {first_error}"
    rows.append({"system": "llama.cpp", "precision": "GGUF (Q4_1 linears, Q8_0 embeddings)"
                 + (", repacked for AMX" if peer.get("amx") and peer.get("extra_buffers") else ""), **peer})
    if peer.get("amx"):  # the same GGUF without the AMX repacking, at the asked n_batch: the other side of it
        plain = llama_cpp_rates(gguf_path, prompts, new_tokens, threads, n_batch, extra_buffers=False)
        rows.append({"system": "llama.cpp", "precision": "GGUF as stored, no AMX repacking", **plain})
    with torch.inference_mode():
        for variant in variants:  # each variant's AR loop, then the diffusion model's canvases in it
            lm = load(ar, dtype=variant.dtype, quantize=variant.quantize, compile=variant.compiled)
            rows.append({"system": "canvaslm autoregressive", "precision": _precision(lm),
                         **_ours(lm, prompts, new_tokens, temperature=0.0)})
            lm = load(model, dtype=variant.dtype, quantize=variant.quantize, compile=variant.compiled)
            if lm.kind == "diffusion":
                rows.append({"system": "canvaslm diffusion", "precision": _precision(lm),
                             **_ours(lm, prompts, new_tokens)})
                rows.append({"system": "canvaslm verified", "precision": _precision(lm),
                             **_ours(lm, prompts, new_tokens, decoding="verified", temperature=0.0)})
    reference = peer.get("tokens_per_second")
    for row in rows:
        if reference and "tokens_per_second" in row:
            row["vs_llama_cpp"] = round(row["tokens_per_second"] / reference, 3)
    return {"model": model, "ar": ar, "gguf": gguf_path.name, "prompts": len(prompts), "new_tokens": new_tokens,
            "threads": threads, "batch": 1, "systems": rows}


def _precision(lm) -> str:
    compiled = {True: ", compiled", "layers": ", compiled layers"}.get(lm.compiled, "")
    return f"{lm.dtype_name}, {lm.quantization}{compiled}"


def plot_peers(report: dict[str, Any], png: str | Path) -> bool:
    figure = new_figure(8, 3.8)
    if figure is None:
        return False
    axes = figure.subplots()
    rows = [r for r in report["systems"] if "tokens_per_second" in r]
    labels = [f"{r['system']}\n({r['precision']})" for r in rows]
    bars = axes.barh(range(len(rows)), [r["tokens_per_second"] for r in rows])
    axes.bar_label(bars, fmt="%.1f", fontsize=8)
    axes.set_yticks(range(len(rows)), labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("tokens / s (batch 1, prompts included)")
    axes.set_title(f"{report['gguf']}: {report['prompts']} chat prompts, ≤ {report['new_tokens']} tokens, "
                   f"{report['threads']} threads", fontsize=9)
    return save(figure, png)


if __name__ == "__main__":  # the llama.cpp subprocess: a JSON spec on stdin, one JSON line on stdout
    print(json.dumps(_llama_cpp_worker(json.loads(sys.stdin.read()))))
