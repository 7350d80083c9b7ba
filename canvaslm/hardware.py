"""What this machine computes fast: the dtype that pays on it, and a short description for benchmark reports.

On CPUs, bfloat16 matmuls only pay with hardware support: AMX tiles (`amx_bf16`, Intel Sapphire Rapids and later)
or AVX-512 BF16 dot products (`avx512_bf16`, Intel Cooper Lake, AMD Zen 4). Measured on a 2-core AMD EPYC with
avx512_bf16 and no AMX (torch 2.13): 0.26-0.39 TFLOP/s bf16 against 0.08-0.13 fp32; the notes in
../shared/research report 2.7-3.2 against 0.15-0.43 on a Xeon with AMX. Without either, bf16 is emulated and slower
than float32.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
DTYPE_CHOICES = ("auto", "float32", "bfloat16")
QUANTIZE_CHOICES = ("auto", "none", "int8", "int4")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags of the first processor in /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_is_fast(device: torch.device | str = "cpu") -> bool:
    """True where bfloat16 matmuls beat float32: CUDA devices that support bf16, CPUs with AMX or AVX-512 BF16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in BF16_FLAGS)
    return False


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """"auto" -> bfloat16 where `bf16_is_fast(device)`, else float32; "float32" / "bfloat16" as given."""
    if name not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    return getattr(torch, name)


def int4_pays(device: torch.device | str = "cpu") -> bool:
    """True where torch's int4 weight-only kernel beats the dense weight at batch 1: CPUs where bfloat16 is fast,
    and x86 CPUs with AVX2 (the kernel casts its rows to bfloat16 there too, yet reads a quarter of float32's bytes).
    One AR step of `smol`, 2 threads, float32 activations elsewhere: 84.7 ms dense float32 against 48.8 ms with int4
    weights on a 2-core AMD EPYC with AVX2 and no AVX-512 (`canvaslm bench passes`, docs/performance.md)."""
    if torch.device(device).type != "cpu":
        return False
    return bf16_is_fast("cpu") or "avx2" in cpu_flags()


def resolve_quantize(name: str, device: torch.device | str = "cpu") -> str:
    """"auto" -> "int4" where `int4_pays(device)`, else "none"; the others as given."""
    if name not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {name!r}")
    if name == "auto":
        return "int4" if int4_pays(device) else "none"
    return name


def packed_max_rows(mode: str) -> int:
    """Most rows a pass may have for a weight-only packed linear (`canvaslm.models.quant`) to beat the dense bf16
    weight. torch's int4/int8 CPU kernels cost ~linearly in rows, while the dense bf16 GEMM barely grows up to ~32
    rows, and with AMX tiles it is several times faster. 30 SmolLM2 layers' linears, one thread of a Xeon with
    amx_bf16, ms dense / int4 / int8: 1 row 30.0 / 6.6 / 14.4; 4 rows 32.8 / 11.1 / 17.9; 8 rows 32.8 / 20.3 / 30.8;
    16 rows 32.9 / 38.7 / 48.6. On the 2-core AMD EPYC (avx512_bf16, no AMX) int4 still won at 16 rows (32.6
    against 37.1 ms, 2 threads). Whole passes: `canvaslm bench passes --variants bfloat16:int4:rows=64`
    (docs/performance.md)."""
    amx = "amx_bf16" in cpu_flags()
    return {"int4": 8 if amx else 32, "int8": 4 if amx else 8}[mode]


def describe() -> dict[str, object]:
    """The machine, for benchmark JSON: CPU model, cores, bf16 flags, torch threads and version."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "bf16_flags": sorted(set(BF16_FLAGS) & cpu_flags()),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
