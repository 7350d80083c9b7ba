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
def _cpuinfo(field: str) -> str | None:
    """The value of `field` for the first processor in /proc/cpuinfo (None where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field):
            return line.split(":", 1)[1].strip()
    return None


def cache_dir() -> Path:
    """Where this machine keeps canvaslm's files (models, compiled layers and kernels): $CANVASLM_HOME, default
    ~/.cache/canvaslm."""
    return Path(os.environ.get("CANVASLM_HOME", Path.home() / ".cache" / "canvaslm"))


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags of the first processor in /proc/cpuinfo (empty where there is none)."""
    return frozenset((_cpuinfo("flags") or "").split())


def cpu_vendor() -> str:
    """The CPU's vendor as /proc/cpuinfo names it ("GenuineIntel", "AuthenticAMD"; empty where there is none)."""
    return _cpuinfo("vendor_id") or ""


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


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


def onednn_float32_pays(device: torch.device | str = "cpu") -> bool:
    """True where oneDNN's float32 GEMM on a weight reordered once into its layout (`torch.ops.mkldnn`, what
    inductor's freezing emits) beats torch's default float32 GEMM, MKL's sgemm: x86 CPUs with AVX2 from vendors
    other than Intel, where MKL takes a slow path for few rows. Measured on a 2-core AMD EPYC (family 23, AVX2, no
    AVX-512), 2 threads, ms MKL / oneDNN: SmolLM2's head [49152, 576] at 4 rows 29.6 / 6.8, at 16 rows 46.4 / 14.7;
    whole causal passes of `smol` at 32 rows 255 / 169 (`canvaslm bench passes`, docs/performance.md). On Intel CPUs
    MKL stays (not measured here)."""
    return (torch.device(device).type == "cpu" and "avx2" in cpu_flags() and cpu_vendor() not in ("", "GenuineIntel")
            and torch.backends.mkldnn.is_available())


def packed_max_rows(mode: str, reordered: bool = False, dense_program: bool = False) -> int:
    """Most rows a pass may have for a weight-only packed linear (`canvaslm.models.quant`) to beat the dense bf16
    weight. torch's int4/int8 CPU kernels cost ~linearly in rows, while the dense bf16 GEMM barely grows up to ~32
    rows, and with AMX tiles it is several times faster. 30 SmolLM2 layers' linears, one thread of a Xeon with
    amx_bf16, ms dense / int4 / int8: 1 row 30.0 / 6.6 / 14.4; 4 rows 32.8 / 11.1 / 17.9; 8 rows 32.8 / 20.3 / 30.8;
    16 rows 32.9 / 38.7 / 48.6. On the 2-core AMD EPYC (avx512_bf16, no AMX) int4 still won at 16 rows (32.6
    against 37.1 ms, 2 threads). Whole passes: `canvaslm bench passes --variants bfloat16:int4:rows=64`
    (docs/performance.md). `reordered`: the dense weight is float32 reordered for oneDNN (`onednn_float32_pays`),
    which overtakes the packed kernels sooner. On the 2-core AVX2 EPYC, 2 threads: causal passes of `smol` at 4 /
    6 / 8 rows took 62 / 94 / 95 ms int4 against 80 / 86 / 92 reordered; SmolLM2's head at 3 / 4 rows 5.8 / 7.6 ms
    int8 against 6.4 / 6.8. `dense_program`: the dense weights run the compiled layer too (`canvaslm serve`:
    `aot.compile_layers(..., dense=True)`), which overtakes the packed one sooner than the eager dense layers do. On
    the 2-core AVX-512 EPYC without AMX, AR steps of `smol-ar` in one process (`runs/s44/ab_rows2.py`), ms packed /
    dense library: 12 rows 26.6 / 41.6, 16 rows 40.0 / 54.0, 20 rows 50.0 / 61.5, 24 rows 72.7 / 60.2, 32 rows
    71.6 / 62.9 (the eager layers: about even from 20 to 32 rows). On AMX CPUs not measured: as without it.
    int4_vnni (our kernel, `canvaslm.models.cpu_kernels`) takes int4's rows: on the AVX-512 EPYC the 30 layers'
    linears ran 2.65 / 4.00 / 6.62 / 11.95 / 22.59 / 44.07 ms at 1 / 4 / 8 / 16 / 32 / 64 rows against torch's
    int4 4.10 / 6.54 / 11.54 / 21.54 / 41.44 / 81.72 and unfused dense bfloat16 15.48 / 17.46 / 19.45 / 22.99 /
    30.73 / 48.42 (`runs/s46/bench_linears.py`), so its crossover lies past int4's; and beside the dense program,
    AR steps of `smol-ar` as above, ms packed / dense library: 20 rows 31.8 / 50.8, 24 rows 45.4 / 56.0, 32 rows
    46.5 / 65.8, so it keeps its 32 rows there too (the q8_0_vnni head as well: 5.4 against 7.5 ms at 32 rows)."""
    if reordered:
        return {"int4": 4, "int4_vnni": 4, "int8": 3, "q8_0": 3, "q8_0_vnni": 3}[mode]
    amx = "amx_bf16" in cpu_flags()
    if dense_program and not amx:
        return {"int4": 20, "int4_vnni": 32, "int8": 8, "q8_0": 4, "q8_0_vnni": 32}[mode]
    return {"int4": 8 if amx else 32, "int4_vnni": 8 if amx else 32, "int8": 4 if amx else 8, "q8_0": 4,
            "q8_0_vnni": 32}[mode]


def head_mode(vnni: bool = False) -> str:
    """How `canvaslm.models.quant.quantize` packs the output head: "q8_0" (int8 in groups of 32, GGUF's Q8_0 grid,
    as two int4 planes in one call of torch's int4 kernel) on CPUs with `avx512_bf16` and no AMX, else "int8" (one
    scale per output channel, `torch._weight_int8pack_mm`). On the 2-core AVX-512 EPYC (Zen 4), SmolLM2's head
    [49152, 576], 2 threads, median ms int8 / q8_0 / dense bfloat16 (`runs/s45/head3.py`): 1 row 2.96 / 2.01 / 6.42,
    2 rows 3.47 / 2.52 / 6.49, 4 rows 3.90 / 3.36 / 5.84, 5 rows 8.47 / 7.21 / 6.69, 8 rows 7.90 / 6.79 / 6.28
    (hence q8_0's 4 rows in `packed_max_rows`); and q8_0 keeps the GGUF's grid, where one scale a channel rounds it
    again (KL from the float32 head over 118 positions of `smol-ar`: 4.0e-4 against 1.5e-3 nats). On the AMX Xeon
    the int8 kernel read the head in 1.0 ms alone against 0.85 for one int4 plane (session 43), so two would not
    pay there; on CPUs with AVX2 only it is not measured. `vnni` (our kernel runs here, `cpu_kernels.load`):
    "q8_0_vnni", the same grid on it, on CPUs without AMX (session 46, the same EPYC, the head alone and so in
    cache: 0.36 / 0.70 / 1.32 / 2.87 / 5.39 ms at 1 / 4 / 8 / 16 / 32 rows against the planes' 1.63 / 2.88 / 5.82 /
    11.43 / 22.72 and dense bfloat16's 3.28 / 3.87 / 4.35 / 5.36 / 7.53, hence its 32 rows; KL 2.2e-5 nats, its
    float16 scales kept as the GGUF has them); on AMX CPUs not measured, so the int8 kernel stays there."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "int8"
    if vnni:
        return "q8_0_vnni"
    return "q8_0" if "avx512_bf16" in flags else "int8"


def one_query_sdpa_max_rows(device_type: str) -> int:
    """Most rows (sequences) whose attention of one query each (an AR step, a commit of one token) goes through
    torch's fused SDPA kernel instead of two small matmuls. On the 2-core AMX Xeon (bfloat16, SmolLM2's 9 heads over
    3 kv heads; `runs/s39/att.py` of session 39), one layer at 1 / 4 / 8 / 32 rows took 20 / 28 / 41 / 96 us over
    64 keys against 83 / 86 / 98 / 157 with the matmuls, and 33 / 65 / 112 / 544 us over 300 keys against 90 / 120 /
    184 / 507, with half the matmuls' error against float64 (they round the scores to bfloat16). On the AVX-512
    EPYC without AMX the kernel cost 5-7x the matmuls at 64 rows; elsewhere it is not measured, so 0 there. (A
    constant read at import: a compiled pass traces this call, and must not trace the read of /proc/cpuinfo.)"""
    return _ONE_QUERY_SDPA_CPU_ROWS if device_type == "cpu" else 0


_ONE_QUERY_SDPA_CPU_ROWS = 8 if "amx_bf16" in cpu_flags() else 0


def describe() -> dict[str, object]:
    """The machine, for benchmark JSON: CPU model, cores, bf16 flags, torch threads and version."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "bf16_flags": sorted(set(BF16_FLAGS) & cpu_flags()),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
