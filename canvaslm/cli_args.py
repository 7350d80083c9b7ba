"""Argument helpers shared by the command-line entry points (`canvaslm`, `canvaslm bench`, `canvaslm sudoku`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from canvaslm.errors import CanvasError
from canvaslm.hardware import QUANTIZE_CHOICES


def threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch's kernels (default: torch's choice, one per physical core)")


def precision_args(p: argparse.ArgumentParser, dtype: str = "auto", quantize: str = "auto") -> None:
    """--dtype and --quantize: what the weights compute in (canvaslm.hardware says what "auto" picks)."""
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=dtype,
                   help=f"weights and activations (auto: bfloat16 where this machine computes it fast, float32 "
                        f"elsewhere on CPUs; default {dtype})")
    p.add_argument("--quantize", choices=list(QUANTIZE_CHOICES), default=quantize,
                   help=f"weight-only quantized linears for small passes on CPUs (auto: int4 where bfloat16 is "
                        f"fast or the CPU has AVX2, else none; default {quantize})")
    p.add_argument("--compile", action="store_true", help="compile the model's passes with torch.compile (the "
                   "causal pass; a Llama's canvas pass too): minutes on the first passes of every run, then AR steps "
                   "~1.6x and 4-token canvas passes ~1.3x faster on a 2-core CPU")
    p.add_argument("--compile-layers", action=argparse.BooleanOptionalAction, default=None,
                   help="a Llama's decoder layer on packed weights compiled ahead of time (bfloat16, --quantize "
                   "int4/int8/auto): built once per model shape and thread count (~20-50 s), kept in "
                   "$CANVASLM_HOME/compiled, ~1.3x faster passes on a 2-core CPU (docs/performance.md). Default: on "
                   "where it runs and builds, else the eager layers ($CANVASLM_COMPILE_LAYERS=0 turns the default "
                   "off); --compile-layers: fail if it cannot; --no-compile-layers: the eager layers")


def set_threads(threads: int | None) -> None:
    """Apply --threads (None: leave torch's choice)."""
    if threads is None:
        return
    if threads < 1:
        raise CanvasError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def key_values(text: str, flag: str) -> dict[str, Any]:
    """`a=1,b=0.5` -> {"a": 1, "b": 0.5} (values as JSON when they parse, else strings)."""
    result: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CanvasError(f"{flag} {text!r}: expected key=value pairs separated by commas")
        try:
            result[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            result[key.strip()] = value
    return result
