"""Speed of our loops against transformers on the same weights: `canvaslm bench ar|denoise|generate|prompt|compare`.

* `ar`: tokens/s of our autoregressive loop vs transformers' `generate` on identical weights (greedy, batch 1,
  EOS ignored so every run writes the same number of tokens).
* `denoise`: latency of one decoder (denoiser) pass for several canvas sizes after an encoded prompt; an
  autoregressive Llama checkpoint is timed in block-diffusion mode (same weights + self-conditioning block).
* `generate`: end-to-end block-diffusion generation, ours vs transformers' `DiffusionGemmaForBlockDiffusion.generate`
  on the same checkpoint and seed, at several batch sizes: tokens/s, tokens per forward, ms per decoder pass, time
  to the first committed canvas, peak CUDA memory. `identical_tokens` says whether both wrote the same tokens: the
  random draws are the same, but on random weights the two networks' ~1e-6 float differences are amplified by
  self-conditioning and may change later samples.
* `prompt`: a long prompt (default 4,096 tokens): prefill time (chunked), time to the first committed canvas, the
  request's KV-cache bytes (sliding-window layers keep only their window) and the process's peak memory.
* `compare` (the default): one run, per batch size (default 1, 8, 64), of our diffusion loop, our AR loop on the same
  weights (the encoder used causally), our diffusion loop with the fast sampler, transformers' diffusion reference
  (DiffusionGemma checkpoints) and transformers' `LlamaForCausalLM.generate` (Llama weights): tokens/s, tokens per
  forward, ms per forward pass, time to first token (diffusion: the first committed canvas) and peak memory (CUDA
  allocator, or the process's resident set on Linux CPUs); JSON and a PNG.
Each number is the median of `--repeats` timed runs after one warm-up run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from canvaslm.engine.ar import ar_generate
from canvaslm.engine.lm import LM
from canvaslm.errors import CanvasError
from canvaslm.plotting import new_figure, save


def _timed(fn: Callable[[], Any], repeats: int, progress: Progress, label: str) -> tuple[Any, float]:
    """(last output, median seconds) of `repeats` runs after one warm-up run."""
    task = progress.add_task(label, total=repeats + 1)
    out = fn()  # warm-up
    progress.advance(task)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        progress.advance(task)
    return out, statistics.median(times)


def _median_seconds(fn: Callable[[], Any], repeats: int, progress: Progress, label: str) -> float:
    return _timed(fn, repeats, progress, label)[1]


def machine() -> dict[str, Any]:
    from canvaslm.hardware import cpu_name, describe

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
            "bf16_flags": describe()["bf16_flags"],
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def bench_ar(lm: LM, new_tokens: int, repeats: int, reference: bool) -> dict[str, Any]:
    """Greedy decoding speed at batch 1: ours, and transformers' on the same weights when installed."""
    prompt = lm.chat_prompt_ids([{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
    ids = torch.tensor([prompt], device=lm.device)
    valid = torch.ones_like(ids, dtype=torch.bool)
    result: dict[str, Any] = {"prompt_tokens": len(prompt), "new_tokens": new_tokens}
    with Progress(transient=True) as progress, torch.inference_mode():
        ours = _median_seconds(lambda: ar_generate(lm.network, ids, valid, new_tokens, temperature=0.0,
                                                   eos_token_ids=[]), repeats, progress, "canvaslm AR loop")
        result["canvaslm_tokens_per_second"] = round(new_tokens / ours, 2)
        if reference:
            hf_model = _transformers_twin(lm)
            if hf_model is None:
                result["transformers"] = "not installed"
            else:
                run = lambda: hf_model.generate(ids, attention_mask=valid.long(), max_new_tokens=new_tokens,  # noqa: E731
                                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                theirs = _median_seconds(run, repeats, progress, "transformers generate")
                result["transformers_tokens_per_second"] = round(new_tokens / theirs, 2)
                result["speedup"] = round(theirs / ours, 2)
    return result


def _transformers_twin(lm: LM):
    """transformers' LlamaForCausalLM holding exactly our weights, or None without transformers."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    model = LlamaForCausalLM(LlamaConfig(**lm.config.to_hf())).to(lm.device, next(lm.network.parameters()).dtype)
    model.load_state_dict(lm.network.hf_tensors(), strict=False)
    model.tie_weights()
    return model.eval()


def bench_denoise(lm: LM, canvas_sizes: list[int], prompt_tokens: int, repeats: int) -> dict[str, Any]:
    """Milliseconds for one denoiser pass over C canvas tokens after a prompt_tokens-long encoded prompt."""
    network = lm.network
    if lm.kind != "diffusion":
        network.to_diffusion(max(canvas_sizes))
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, network.vocab_size, (1, prompt_tokens), generator=generator).to(lm.device)
    cache = network.new_cache(1, lm.device)
    latencies = {}
    with Progress(transient=True) as progress, torch.inference_mode():
        network.encode(prompt, cache, torch.ones_like(prompt, dtype=torch.bool))
        for size in canvas_sizes:
            canvas = torch.randint(0, network.vocab_size, (1, size), generator=generator).to(lm.device)
            seconds = _median_seconds(lambda: network.decode(canvas, cache, None), repeats, progress,
                                      f"denoiser, canvas {size}")
            latencies[str(size)] = {"ms": round(1000 * seconds, 2), "ms_per_token": round(1000 * seconds / size, 3)}
    return {"prompt_tokens": prompt_tokens, "canvas_tokens": latencies}


def bench_generate(lm: LM, source: str, batch_sizes: list[int], new_tokens: int, prompt_tokens: int,
                   repeats: int) -> dict[str, Any]:
    """Our diffusion generate vs the transformers reference on the checkpoint `source`, per batch size."""
    if lm.kind != "diffusion":
        raise CanvasError(f"bench generate needs a diffusion model; {lm.source} is {lm.kind}")
    reference = _reference_diffusion(source, lm)
    eos, pad = lm.eos_token_ids, lm.pad_token_id if lm.pad_token_id is not None else 0
    rows = []
    with Progress(transient=True) as progress, torch.inference_mode():
        for batch in batch_sizes:
            generator = torch.Generator().manual_seed(batch)
            ids = torch.randint(3, lm.network.vocab_size, (batch, prompt_tokens), generator=generator).to(lm.device)
            row: dict[str, Any] = {"batch": batch}
            ours = _timed(lambda: lm.generate(ids, new_tokens, seed=0), repeats, progress,
                                   f"canvaslm, batch {batch}")
            first = time.perf_counter()
            for event in lm.generate_steps(ids, new_tokens, seed=0):
                if type(event).__name__ == "CanvasCommitted":
                    row["canvaslm_first_canvas_ms"] = round(1000 * (time.perf_counter() - first), 2)
                    break
            out, seconds = ours
            row.update(_rates("canvaslm", out.sequences[:, prompt_tokens:], out.forward_passes, seconds, pad))
            row["canvaslm_tokens_per_forward"] = round(float(out.tokens_per_forward.float().mean()), 3)
            if reference is not None:
                def theirs() -> Any:
                    torch.manual_seed(0)
                    return reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                              eos_token_id=eos, pad_token_id=pad)
                ref_out, ref_seconds = _timed(theirs, repeats, progress, f"transformers, batch {batch}")
                ref_ids = ref_out.sequences if hasattr(ref_out, "sequences") else ref_out
                row.update(_rates("transformers", ref_ids[:, prompt_tokens:], None, ref_seconds, pad))
                exact = lm.generate(ids, new_tokens, seed=0, exact=True).sequences  # timed runs skip finished rows
                row["identical_tokens"] = bool(torch.equal(ref_ids.to(exact.device), exact))
                row["speedup"] = round(ref_seconds / seconds, 2)
            if torch.cuda.is_available() and lm.device.type == "cuda":
                row["peak_cuda_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            rows.append(row)
    return {"checkpoint": source, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
            "transformers": reference is not None, "batches": rows}


def _rates(name: str, generated: torch.Tensor, passes: torch.Tensor | None, seconds: float, pad: int) -> dict:
    tokens = int((generated != pad).sum())
    rates = {f"{name}_seconds": round(seconds, 4), f"{name}_tokens_per_second": round(tokens / seconds, 2)}
    if passes is not None:
        rates[f"{name}_ms_per_forward"] = round(1000 * seconds / max(int(passes.max()), 1), 2)
    return rates


def _reference_diffusion(source: str, lm: LM) -> Any:
    """transformers' DiffusionGemmaForBlockDiffusion on the same checkpoint, or None without transformers."""
    try:
        from transformers import DiffusionGemmaForBlockDiffusion
    except ImportError:
        return None
    dtype = next(lm.network.parameters()).dtype
    return DiffusionGemmaForBlockDiffusion.from_pretrained(source, dtype=dtype).to(lm.device).eval()


def plot_generate(report: dict[str, Any], png: str) -> bool:
    figure = new_figure(6.4, 4)
    if figure is None:
        return False
    ax = figure.add_subplot()
    batches = [r["batch"] for r in report["batches"]]
    for name in ("canvaslm", "transformers"):
        values = [r.get(f"{name}_tokens_per_second") for r in report["batches"]]
        if all(v is not None for v in values):
            ax.plot(batches, values, "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("generated tokens/s")
    ax.set_title(f"block-diffusion generate, {report['new_tokens']} new tokens")
    ax.legend()
    return save(figure, png)


def bench_prompt(lm: LM, prompt_tokens: int, canvas_length: int) -> dict[str, Any]:
    """Long-prompt cost for one request: prefill, first canvas, cache size, peak memory (an AR checkpoint is run in
    block-diffusion mode with `canvas_length`, as `denoise` does)."""
    import resource

    from canvaslm.models.cache import encode_chunked

    network = lm.network
    if lm.kind != "diffusion":
        network.to_diffusion(canvas_length)
    if prompt_tokens + network.canvas_length > lm.max_length:
        raise CanvasError(f"a {prompt_tokens}-token prompt plus a {network.canvas_length}-token canvas exceeds this "
                          f"model's context of {lm.max_length} tokens")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, network.vocab_size, (1, prompt_tokens), generator=generator).to(lm.device)
    valid = torch.ones_like(ids, dtype=torch.bool)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        cache = network.new_cache(1, lm.device)
        start = time.perf_counter()
        encode_chunked(network, ids, cache, valid)
        prefill = time.perf_counter() - start
        cache_bytes = sum(t.numel() * t.element_size() for t in [*cache.keys, *cache.values] if t is not None)
        full_bytes = sum(2 * t.shape[1] * cache.length * t.shape[3] * t.element_size()
                         for t in cache.keys if t is not None)
        start = time.perf_counter()
        for event in lm.generate_steps(ids, network.canvas_length, seed=0):
            if type(event).__name__ == "CanvasCommitted":
                break
        first_canvas = time.perf_counter() - start
    return {"prompt_tokens": prompt_tokens, "canvas_length": network.canvas_length,
            "prefill_ms": round(1000 * prefill, 1), "prefill_tokens_per_second": round(prompt_tokens / prefill, 1),
            "time_to_first_canvas_ms": round(1000 * first_canvas, 1),
            "kv_cache_mb": round(cache_bytes / 2**20, 2), "kv_cache_mb_without_windows": round(full_bytes / 2**20, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_rss_growth_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024, 1)}


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((x for x in status.splitlines() if x.startswith("VmHWM:")), None)
    return round(int(line.split()[1]) / 1024, 1) if line else None


def _engine_row(run: Callable[[], Any], first: Callable[[], Any], tokens: Callable[[Any], int],
                passes: Callable[[Any], int | None], repeats: int, progress: Progress, label: str,
                device: torch.device) -> dict[str, Any]:
    """Measure one engine at one batch size: `run` generates, `first` stops at the first token (or canvas)."""
    _reset_peak_memory(device)
    out, seconds = _timed(run, repeats, progress, label)
    start = time.perf_counter()
    first()
    ttft = time.perf_counter() - start
    n, forward = tokens(out), passes(out)
    row = {"tokens_per_second": round(n / seconds, 2), "seconds": round(seconds, 4),
           "time_to_first_token_ms": round(1000 * ttft, 2), "peak_memory_mb": _peak_memory_mb(device)}
    if forward:
        row["ms_per_forward"] = round(1000 * seconds / forward, 2)
    return row


def bench_compare(lm: LM, source: str, batch_sizes: list[int], new_tokens: int, prompt_tokens: int,
                  repeats: int) -> dict[str, Any]:
    """Our diffusion and AR loops and transformers' references on identical weights, per batch size."""
    if lm.kind != "diffusion":
        raise CanvasError(f"bench compare needs a diffusion model (its weights also run autoregressively); "
                          f"{lm.source} is {lm.kind}")
    network, device = lm.network, lm.device
    pad = lm.pad_token_id if lm.pad_token_id is not None else 0
    reference = _reference_diffusion(source, lm) if type(network).__module__.endswith("diffusion_gemma") else None
    hf_ar = _transformers_twin(lm) if type(network).__module__.endswith("llama") else None
    rows = []
    with Progress(transient=True) as progress, torch.inference_mode():
        for batch in batch_sizes:
            generator = torch.Generator().manual_seed(batch)
            ids = torch.randint(3, network.vocab_size, (batch, prompt_tokens), generator=generator).to(device)
            valid = torch.ones_like(ids, dtype=torch.bool)
            row: dict[str, Any] = {"batch": batch}

            def first_canvas() -> None:
                for event in lm.generate_steps(ids, new_tokens, seed=0):
                    if type(event).__name__ == "CanvasCommitted":
                        return

            diffusion = _engine_row(lambda: lm.generate(ids, new_tokens, seed=0), first_canvas,
                                    lambda o: int((o.sequences[:, prompt_tokens:] != pad).sum()),
                                    lambda o: int(o.forward_passes.max()), repeats, progress,
                                    f"canvaslm diffusion, batch {batch}", device)
            out = lm.generate(ids, new_tokens, seed=0)
            diffusion["tokens_per_forward"] = round(float(out.tokens_per_forward.float().mean()), 3)
            row["canvaslm_diffusion"] = diffusion
            fast = _engine_row(lambda: lm.generate(ids, new_tokens, seed=0, sampler="fast"), first_canvas,
                               lambda o: int((o.sequences[:, prompt_tokens:] != pad).sum()),
                               lambda o: int(o.forward_passes.max()), repeats, progress,
                               f"canvaslm diffusion (fast sampler), batch {batch}", device)
            out = lm.generate(ids, new_tokens, seed=0, sampler="fast")
            fast["tokens_per_forward"] = round(float(out.tokens_per_forward.float().mean()), 3)
            row["canvaslm_diffusion_fast_sampler"] = fast
            ar = lambda n: ar_generate(network, ids, valid, n, temperature=0.0, eos_token_ids=[])  # noqa: E731
            row["canvaslm_ar"] = _engine_row(lambda: ar(new_tokens), lambda: ar(1), lambda o: int(o.new_tokens.sum()),
                                             lambda o: o.forward_passes, repeats, progress,
                                             f"canvaslm AR, batch {batch}", device)
            row["canvaslm_ar"]["tokens_per_forward"] = float(batch)
            if reference is not None:
                def theirs(n: int) -> Any:
                    torch.manual_seed(0)
                    return reference.generate(ids, attention_mask=valid.long(), max_new_tokens=n,
                                              eos_token_id=lm.eos_token_ids, pad_token_id=pad)
                ref = _engine_row(lambda: theirs(new_tokens), lambda: theirs(1),
                                  lambda o: int((getattr(o, "sequences", o)[:, prompt_tokens:] != pad).sum()),
                                  lambda o: None, repeats, progress, f"transformers diffusion, batch {batch}",
                                  device)
                row["transformers_diffusion"] = ref
            if hf_ar is not None:
                def hf_generate(n: int) -> Any:
                    return hf_ar.generate(ids, attention_mask=valid.long(), max_new_tokens=n, min_new_tokens=n,
                                          do_sample=False, pad_token_id=pad)
                row["transformers_ar"] = _engine_row(lambda: hf_generate(new_tokens), lambda: hf_generate(1),
                                                     lambda o: batch * new_tokens, lambda o: new_tokens, repeats,
                                                     progress, f"transformers AR, batch {batch}", device)
            best_ar = max(row[k]["tokens_per_second"] for k in ("canvaslm_ar", "transformers_ar") if k in row)
            ours = max(diffusion["tokens_per_second"], fast["tokens_per_second"])
            row["diffusion_vs_best_ar"] = round(ours / best_ar, 2)
            if "transformers_diffusion" in row:
                row["diffusion_vs_transformers_diffusion"] = round(
                    ours / row["transformers_diffusion"]["tokens_per_second"], 2)
            rows.append(row)
    return {"checkpoint": source, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
            "canvas_length": network.canvas_length, "batches": rows}


ENGINES = ("canvaslm_diffusion", "canvaslm_diffusion_fast_sampler", "canvaslm_ar", "transformers_diffusion",
           "transformers_ar")


def plot_compare(report: dict[str, Any], png: str) -> bool:
    """tokens/s and time to first token per engine against the batch size."""
    figure = new_figure(10, 4)
    if figure is None:
        return False
    speed, latency = figure.subplots(1, 2)
    batches = [r["batch"] for r in report["batches"]]
    for engine in ENGINES:
        rows = [r[engine] for r in report["batches"] if engine in r]
        if len(rows) == len(batches):
            speed.plot(batches, [r["tokens_per_second"] for r in rows], "o-", label=engine.replace("_", " "))
            latency.plot(batches, [r["time_to_first_token_ms"] for r in rows], "o-", label=engine.replace("_", " "))
    for axes, label in ((speed, "generated tokens/s"), (latency, "time to first token (ms)")):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("batch size")
        axes.set_ylabel(label)
        axes.legend(fontsize=8)
    speed.set_title(f"{Path(str(report['checkpoint'])).name}: {report['new_tokens']} new tokens")
    return save(figure, png)
