"""`canvaslm bench`: measured speed, written as JSON.

* `ar`: tokens/s of our autoregressive loop vs transformers' `generate` on identical weights (greedy, batch 1,
  EOS ignored so every run writes the same number of tokens).
* `denoise`: latency of one decoder (denoiser) pass for several canvas sizes after an encoded prompt; an
  autoregressive Llama checkpoint is timed in block-diffusion mode (same weights + self-conditioning block).
* `serve`: throughput and latency through the HTTP server at several concurrency levels (canvaslm.server.bench).
Each number is the median of `--repeats` timed runs after one warm-up run.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from rich.progress import Progress

from canvaslm.engine.ar import ar_generate
from canvaslm.engine.lm import LM


def _median_seconds(fn: Callable[[], Any], repeats: int, progress: Progress, label: str) -> float:
    task = progress.add_task(label, total=repeats + 1)
    fn()  # warm-up
    progress.advance(task)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        progress.advance(task)
    return statistics.median(times)


def machine() -> dict[str, Any]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
            platform.machine(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


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


def main(args) -> int:
    from canvaslm import load

    if args.what == "serve":
        return _serve(args)
    lm = load(args.model, device=args.device)
    report: dict[str, Any] = {"model": args.model, "kind": lm.kind, "machine": machine()}
    if args.what in ("ar", "all"):
        report["ar"] = bench_ar(lm, args.new_tokens, args.repeats, not args.no_reference)
    if args.what in ("denoise", "all"):
        sizes = [int(s) for s in args.canvas.split(",")]
        report["denoise"] = bench_denoise(lm, sizes, args.prompt_tokens, args.repeats)
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


def _serve(args) -> int:
    from pathlib import Path

    from canvaslm.server.bench import bench_serve, plot_serve

    models = [args.model] + ([args.ar] if args.ar else [])
    levels = [int(c) for c in args.concurrency.split(",")]
    report = {**bench_serve(models, levels, args.requests, args.max_tokens), "machine": machine()}
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
        if plot_serve(report, Path(args.out).with_suffix(".png")):
            report["plot"] = str(Path(args.out).with_suffix(".png"))
    print(text)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure speed; writes JSON")
    p.add_argument("what", choices=["ar", "denoise", "all", "serve"], help="which benchmark")
    p.add_argument("--model", "-m", default="smol-ar")
    p.add_argument("--device", default=None)
    p.add_argument("--new-tokens", type=int, default=128, help="ar: tokens generated per run")
    p.add_argument("--canvas", default="1,32,256", help="denoise: comma-separated canvas sizes")
    p.add_argument("--prompt-tokens", type=int, default=128, help="denoise: encoded prompt length")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-reference", action="store_true", help="ar: skip transformers")
    p.add_argument("--out", default=None, help="also write the JSON to this file (serve: and a PNG beside it)")
    p.add_argument("--ar", default=None, help="serve: the AR base to serve and compare (e.g. smol-ar)")
    p.add_argument("--concurrency", default="1,8,32", help="serve: comma-separated client counts")
    p.add_argument("--requests", type=int, default=16, help="serve: requests per level (at least the level)")
    p.add_argument("--max-tokens", type=int, default=64, help="serve: tokens written per request")
