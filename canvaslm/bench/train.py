"""`canvaslm bench train`: training tokens/s of the old float32 path and the fast path on one config, side by side.

Both paths train the same model on the same batches (standard-library code windows tokenized by the model's
tokenizer, prompt + response tokens per example) with the same objective, LoRA rank and optimizer:

* `fp32`: what the trainer did before: float32 compute on the CPU, the adapters active in both passes, so the
  causal pass runs with autograd and its AR loss (weight 1) is trained;
* `fast`: bfloat16 autocast where the hardware has it (`canvaslm.hardware`), canvas-only adapters (the causal pass is
  the frozen parent: no backward, no AR head), logits only at scored positions.

Each path runs `warmup` untimed optimizer steps then `steps` timed ones in this process; tokens/s is the real
(non-pad) tokens of the timed steps over their wall time. `speedup` = fast / fp32.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from canvaslm.errors import CanvasError
from canvaslm.hardware import bf16_is_fast, describe

SMOL_MASK_TOKEN = 4  # SmolLM2's <reponame>: a special token chat data never holds, used as the absorbing mask


def bench_train(model: str = "smol-ar", steps: int = 4, warmup: int = 1, batch_size: int = 8, canvas: int = 16,
                prompt_tokens: int = 128, response_tokens: int = 128, lora_rank: int = 64,
                objective: dict[str, Any] | None = None, paths: tuple[str, ...] = ("fp32", "fast"),
                progress: bool = True) -> dict[str, Any]:
    """Train `model` for warmup + steps optimizer steps per path and report tokens/s; see the module doc."""
    from canvaslm.train.config import parse_config
    from canvaslm.train.data import build
    from canvaslm.train.tasks import make_task
    from canvaslm.train.trainer import train

    if steps < 1 or warmup < 0 or batch_size < 1:
        raise CanvasError(f"bench train needs steps >= 1, warmup >= 0, batch size >= 1; got {steps}, {warmup}, "
                          f"{batch_size}")
    objective = objective or {"kind": "masked", "mask_token_id": SMOL_MASK_TOKEN, "shift": True,
                              "self_conditioning_p": 0.0, "ar_weight": 1.0}
    report: dict[str, Any] = {"model": model, "machine": describe(), "bf16_is_fast": bf16_is_fast("cpu"),
                              "batch_size": batch_size, "canvas_length": canvas, "prompt_tokens": prompt_tokens,
                              "response_tokens": response_tokens, "lora_rank": lora_rank, "objective": objective,
                              "steps": steps, "warmup_steps": warmup, "paths": {}}
    with tempfile.TemporaryDirectory(prefix="canvaslm-bench-train-") as tmp:
        data = Path(tmp) / "data"
        examples = batch_size * (steps + warmup) + 8
        build({"tokenizer": {"model": model}, "filters": {"dedup": True},
               "source": [{"kind": "files", "globs": ["{stdlib}/**/*.py"], "context_tokens": prompt_tokens,
                           "response_tokens": response_tokens, "max_examples": examples, "seed": 0}]},
              data, progress=progress)
        for path in paths:
            fast = path == "fast"
            raw = {"model": {"source": model, "diffusion_canvas_length": canvas},
                   "data": {"task": "shards", "path": str(data), "held_out": 1,
                            "max_canvases": -(-response_tokens // canvas)},
                   "objective": objective,
                   "lora": {"enabled": True, "rank": lora_rank, "alpha": 2 * lora_rank,
                            "scope": "canvas" if fast else "all"},
                   "optim": {"max_steps": steps + warmup, "batch_size": batch_size, "lr": 1e-4},
                   "train": {"out_dir": str(Path(tmp) / path), "bf16": "auto" if fast else False, "log_every": 1,
                             "device": "cpu"},
                   "eval": {"sample_examples": 0, "examples": 1}}
            config = parse_config(raw, f"bench train ({path})")
            start = time.perf_counter()
            train(config, make_task(config))
            records = [json.loads(line) for line in (Path(tmp) / path / "metrics.jsonl").read_text().splitlines()]
            timed = [r for r in records if r.get("split") == "train" and r["step"] > warmup]
            seconds = [r["tokens"] / r["tokens_per_s"] for r in timed]
            tokens = sum(r["tokens"] for r in timed)
            report["paths"][path] = {
                "bf16": fast and bf16_is_fast("cpu"), "lora_scope": raw["lora"]["scope"],
                "tokens_per_s": round(tokens / sum(seconds), 1),
                "median_step_s": round(statistics.median(seconds), 3),
                "tokens_per_step": round(tokens / len(timed), 1),
                "final_loss": round(timed[-1]["loss"], 4), "wall_s": round(time.perf_counter() - start, 1)}
    if {"fp32", "fast"} <= report["paths"].keys():
        report["speedup"] = round(report["paths"]["fast"]["tokens_per_s"] / report["paths"]["fp32"]["tokens_per_s"], 2)
    return report


def main(args: Any) -> int:
    report = bench_train(args.model, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size,
                         canvas=args.train_canvas, prompt_tokens=args.prompt_tokens,
                         response_tokens=args.response_tokens, lora_rank=args.lora_rank)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0
