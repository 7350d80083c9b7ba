"""`canvaslm bench`: measured speed and quality, written as JSON (and a PNG where people would rather look).

* `ar`, `denoise`, `generate`, `prompt`, `compare` (the default): our loops against transformers (`speed.py`);
* `structured`: schema-bound JSON and code infill, the diffusion scaffold vs the same weights decoding
  autoregressively under llguidance (`structured.py`);
* `serve`: throughput and latency through the HTTP server at several concurrency levels, optionally with a share
  of JSON requests in the batch (`serve.py`);
* `train`: training tokens/s of the float32 path and the fast path on one config (`train.py`);
* `decoding`: a diffusion model's canvases, verified drafts and causal pass on the same weights (`decoding.py`);
* `passes`: ms per causal and canvas pass by pass size, for several dtype / quantization variants (`passes.py`);
* `peers`: llama.cpp on the same GGUF beside our AR loop, canvases and verified decoding, batch 1 (`peers.py`);
* `ceiling`: the tokens per pass an AR parent's own distribution allows any canvas model of it under the
  left-to-right threshold rule (`ceiling.py`).
The quality report (`canvaslm quality`) is `quality.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from canvaslm.bench.passes import DEFAULT_VARIANTS
from canvaslm.bench.speed import (bench_ar, bench_compare, bench_denoise, bench_generate, bench_prompt, machine,
                                  plot_compare, plot_generate)
from canvaslm.cli_args import key_values, precision_args, threads_arg
from canvaslm.loading import load_model
from canvaslm.errors import CanvasError


CANVAS_DEFAULT = "1,32,256"


def main(args) -> int:
    if args.what == "serve":
        return _serve(args)
    if args.what == "train":
        from canvaslm.bench.train import main as bench_train

        return bench_train(args)
    if args.what == "passes":
        return _passes(args)
    if args.what == "peers":
        return _peers(args)
    if args.what == "ceiling":
        return _ceiling(args)
    lm = load_model(args)
    report: dict[str, Any] = {"model": args.model, "kind": lm.kind, "machine": machine()}
    if args.what in ("ar", "all"):
        report["ar"] = bench_ar(lm, args.new_tokens, args.repeats, not args.no_reference)
    if args.what in ("denoise", "all"):
        sizes = [int(s) for s in args.canvas.split(",")]
        report["denoise"] = bench_denoise(lm, sizes, args.prompt_tokens, args.repeats)
    if args.what == "structured":
        from canvaslm.bench.structured import bench_structured, plot_structured

        report = bench_structured(args.model, lm, args.schema_tasks, args.infill_tasks,
                                  int(args.canvas.split(",")[-1]), args.seed, {})
        report["machine"] = machine()
        if args.out and plot_structured(report, str(Path(args.out).with_suffix(".png"))):
            report["plot"] = str(Path(args.out).with_suffix(".png"))
    if args.what == "prompt":
        report["prompt"] = bench_prompt(lm, args.prompt_tokens, int(args.canvas.split(",")[-1]))
    if args.what == "compare":
        batches = [int(b) for b in (args.batch_sizes or "1,8,64").split(",")]
        report["compare"] = bench_compare(lm, args.model, batches, args.new_tokens, args.prompt_tokens, args.repeats)
        if args.out and plot_compare(report["compare"], str(Path(args.out).with_suffix(".png"))):
            report["plot"] = str(Path(args.out).with_suffix(".png"))
    if args.what == "decoding":
        from canvaslm.bench.decoding import DECODINGS, bench_decoding, plot_decoding

        batches = [int(b) for b in (args.batch_sizes or "1,8").split(",")]
        decodings = tuple(d.strip() for d in (args.decodings or ",".join(DECODINGS)).split(",") if d.strip())
        report["decoding"] = bench_decoding(lm, batches, args.new_tokens, args.temperature or 0.0,
                                            [key_values(s, "--setting") for s in args.setting] or [{}],
                                            decodings=decodings)
        report["decoding"]["model"] = args.model
        if args.out and plot_decoding(report["decoding"], str(Path(args.out).with_suffix(".png"))):
            report["plot"] = str(Path(args.out).with_suffix(".png"))
    if args.what == "generate":
        batches = [int(b) for b in (args.batch_sizes or "1,8,64").split(",")]
        report["generate"] = bench_generate(lm, args.model, batches, args.new_tokens, args.prompt_tokens, args.repeats)
        if args.out and plot_generate(report["generate"], str(Path(args.out).with_suffix(".png"))):
            report["plot"] = str(Path(args.out).with_suffix(".png"))
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


def _passes(args) -> int:
    from canvaslm.bench.passes import bench_passes, parse_variants, plot_passes

    sizes = [int(s) for s in (args.canvas if args.canvas != CANVAS_DEFAULT else "1,16,32,64,128").split(",")]
    report = {**bench_passes(args.model, parse_variants(args.variants), sizes, args.prompt_tokens, args.repeats,
                             args.device), "machine": machine()}
    return _write(report, args.out, plot_passes)


def _peers(args) -> int:
    import torch

    from canvaslm.bench.passes import parse_variants
    from canvaslm.bench.peers import bench_peers, plot_peers

    report = {**bench_peers(args.model, args.ar or "smol-ar", parse_variants(args.variants), args.new_tokens,
                            args.threads or torch.get_num_threads(), args.n_batch, args.gguf), "machine": machine()}
    return _write(report, args.out, plot_peers)


def _ceiling(args) -> int:
    from canvaslm.bench.ceiling import ceiling, plot_ceiling
    from canvaslm.bench.quality import read_prompts

    if not args.prompts:
        raise CanvasError("bench ceiling needs --prompts (a data directory or a JSONL file of prompts)")
    judge = load_model(args)
    if judge.kind != "autoregressive":
        raise CanvasError(f"bench ceiling: --model must be the autoregressive parent; {args.model} is a {judge.kind} "
                          "model")
    prompts = read_prompts(args.prompts, args.limit, judge.require_tokenizer(), args.exclude)
    canvas = int(args.canvas.split(",")[-1]) if args.canvas != CANVAS_DEFAULT else 16
    temperature = 0.7 if args.temperature is None else args.temperature
    if temperature <= 0:
        raise CanvasError(f"bench ceiling: --temperature must be > 0 (the answers are samples), got {temperature}")
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("lookahead over answers", total=len(prompts))
        result = ceiling(judge, prompts, temperature=temperature, max_new_tokens=args.new_tokens, canvas=canvas,
                         seed=args.seed, progress=lambda: bar.advance(task))
    report = {**result, "machine": machine()}
    return _write(report, args.out, plot_ceiling)


def _write(report: dict[str, Any], out: str | None, plot: Any) -> int:
    """Print the report as JSON; with `out`, also write it there and draw the PNG beside it."""
    if out and plot(report, Path(out).with_suffix(".png")):
        report["plot"] = str(Path(out).with_suffix(".png"))
    text = json.dumps(report, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    print(text)
    return 0


def _serve(args) -> int:
    from canvaslm.bench.serve import bench_serve, plot_serve

    models = [args.model] + ([args.ar] if args.ar else [])
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.rounds < 1:
        raise CanvasError(f"--rounds must be >= 1, got {args.rounds}")
    if not 0 <= args.structured_share <= 1:
        raise CanvasError(f"--structured-share must be in [0, 1], got {args.structured_share}")
    decodings = [d.strip() for d in (args.decodings or "diffusion").split(",") if d.strip()]
    unknown = sorted(set(decodings) - {"diffusion", "verified", "autoregressive"})
    if unknown or not decodings:
        raise CanvasError(f"--decodings takes diffusion, verified, autoregressive (comma-separated), got "
                          f"{args.decodings!r}")
    if args.max_draft_batch is not None and args.max_draft_batch < 1:
        raise CanvasError(f"--max-draft-batch must be >= 1, got {args.max_draft_batch}")
    flags = ["--dtype", args.dtype, "--quantize", args.quantize] + \
        (["--compile"] if args.compile else []) + \
        {True: ["--compile-layers"], False: ["--no-compile-layers"], None: []}[args.compile_layers] + \
        (["--threads", str(args.threads)] if args.threads else []) + \
        (["--max-draft-batch", str(args.max_draft_batch)] if args.max_draft_batch is not None else [])
    report = {**bench_serve(models, levels, args.requests, args.max_tokens, structured_share=args.structured_share,
                            server_flags=flags, decodings=decodings, temperature=args.temperature,
                            rounds=args.rounds, settings=[key_values(s, "--setting") for s in args.setting] or [{}]),
              "machine": machine()}
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
        if plot_serve(report, Path(args.out).with_suffix(".png")):
            report["plot"] = str(Path(args.out).with_suffix(".png"))
    print(text)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure speed; writes JSON")
    p.add_argument("what", nargs="?", default="compare",
                   choices=["compare", "ar", "denoise", "all", "generate", "prompt", "serve", "structured", "train",
                            "decoding", "passes", "peers", "ceiling"],
                   help="which benchmark (default compare)")
    threads_arg(p)
    p.add_argument("--model", "-m", default="smol-ar")
    p.add_argument("--device", default=None)
    p.add_argument("--new-tokens", type=int, default=128,
                   help="ar, generate: tokens generated per run; ceiling: answer length")
    precision_args(p, dtype="float32", quantize="none")
    p.add_argument("--canvas", default=CANVAS_DEFAULT,
                   help="denoise: comma-separated canvas sizes (passes: default 1,16,32,64,128); prompt, "
                        "structured: the last one")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="passes, peers (the AR rows): comma-separated "
                   f"dtype:quantize[:compile|:layers][:rows=N] (default {DEFAULT_VARIANTS})")
    p.add_argument("--batch-sizes", default=None, help="generate (default 1,8,64), decoding (default 1,8): "
                   "comma-separated batch sizes")
    p.add_argument("--temperature", type=float, default=None, help="decoding: AR sampling temperature of the "
                   "verified and autoregressive modes (default 0: greedy, where verified must equal "
                   "autoregressive); ceiling: the answers' and marginals' temperature (default 0.7)")
    p.add_argument("--prompts", default=None, help="ceiling: data directory (its last N prompts) or JSONL")
    p.add_argument("--limit", type=int, default=24, help="ceiling: number of prompts (default 24)")
    p.add_argument("--exclude", action="append", default=None, help="ceiling: data directories whose prompts "
                   "are skipped (repeatable)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="denoise, generate, prompt, train: prompt length")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-reference", action="store_true", help="ar: skip transformers")
    p.add_argument("--out", default=None, help="also write the JSON to this file (serve: and a PNG beside it)")
    p.add_argument("--ar", default=None, help="serve: the AR base to serve and compare (e.g. smol-ar); peers: the AR "
                   "parent (default smol-ar)")
    p.add_argument("--gguf", default=None, help="peers: the GGUF llama.cpp runs (default: --ar's file)")
    p.add_argument("--n-batch", type=int, default=512, help="peers: llama.cpp's prompt batch (a crash retries 1)")
    p.add_argument("--concurrency", default="1,8,32", help="serve: comma-separated client counts")
    p.add_argument("--setting", action="append", default=[], metavar="K=V[,K=V]",
                   help="serve, decoding: a sampler setting for the diffusion model's canvases (repeatable: one row "
                        "each, timed side by side; e.g. canvas_size=4)")
    p.add_argument("--requests", type=int, default=16, help="serve: requests per level (at least the level)")
    p.add_argument("--rounds", type=int, default=1, help="serve: turns each system takes at each level (the "
                   "systems alternate); the median is reported")
    p.add_argument("--max-tokens", type=int, default=64, help="serve: tokens written per request")
    p.add_argument("--max-draft-batch", type=int, default=None, metavar="N",
                   help="serve: each server's --max-draft-batch (drafts and checked canvases while at most N "
                        "sequences run; default: the server's, 1 on CPUs); a large N keeps canvases of their size "
                        "under load")
    p.add_argument("--decodings", help="serve: the diffusion model's decodings to drive, comma-separated "
                   "(diffusion, verified, autoregressive; default diffusion); --dtype, --quantize, --compile(-layers), "
                   "--threads and --temperature reach the servers and the requests. decoding: the ones timed "
                   "beside the autoregressive one (default all three)")
    p.add_argument("--structured-share", type=float, default=0.0,
                   help="serve: share of the diffusion model's requests that ask for JSON (response_format "
                        "json_schema); they run in the batch, and each level reports passes by batch size")
    p.add_argument("--schema-tasks", type=int, default=50, help="structured: JSON-schema tasks")
    p.add_argument("--infill-tasks", type=int, default=50, help="structured: code-infill tasks (Python stdlib)")
    p.add_argument("--seed", type=int, default=0, help="structured: task set and sampling seed; ceiling: answers")
    p.add_argument("--steps", type=int, default=4, help="train: timed optimizer steps per path")
    p.add_argument("--warmup", type=int, default=1, help="train: untimed optimizer steps first")
    p.add_argument("--batch-size", type=int, default=8, help="train: examples per step")
    p.add_argument("--train-canvas", type=int, default=16, help="train: canvas length the model is converted to")
    p.add_argument("--response-tokens", type=int, default=128, help="train: response tokens per example")
    p.add_argument("--lora-rank", type=int, default=64, help="train: LoRA rank")
