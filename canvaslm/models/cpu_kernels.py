"""canvaslm's own CPU kernel for int4 weights (`cpu_kernels.cpp`, the op `torch.ops.canvaslm.int4_vnni_mm`).

Why: torch's int4 CPU kernel (`torch._weight_int4pack_mm_for_cpu`) converts every weight to float32 and multiplies
in floats; on a 2-core AVX-512 EPYC (Zen 4) it reads SmolLM2's weights at ~11 GB/s from cache, so a decoding pass
is bound by arithmetic and each row of a pass costs ~60% of the first. With AVX-512 VNNI the int4 weights can stay
integers: each group of 32 activations is split into two int8 planes (GGUF's Q8_0, as llama.cpp runs its Q4
weights, and a second plane with its rounding) and multiplied with the nibbles by vpdpbusd, 64 products an
instruction. One core then reads ~45 GB/s from cache, a pass is bound by memory, and the sums keep float32's
precision (teacher-forced over 725 positions of `smol-ar`'s answers, KL from the float32 model 1.53e-3 nats against
1.52e-3 on torch's kernel; one plane alone: 6.2e-3).

The source is compiled once per machine and torch (~10 s, by the C++ compiler the compiled layer uses too), kept in
`$CANVASLM_HOME/compiled/`, and loaded into the process (`load`). Where it does not build or the CPU lacks the
instructions, `quant` keeps torch's kernel; $CANVASLM_INT4_KERNEL=torch asks for torch's anyway."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

from canvaslm.hardware import cache_dir, cpu_flags

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
GROUP, TILE = 32, 16  # inputs a group, outputs a tile (`cpu_kernels.cpp`)
NEEDS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")  # /proc/cpuinfo's names of what the kernel runs
FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma")
OFF = ("torch", "0", "off", "false", "no")  # $CANVASLM_INT4_KERNEL values that keep torch's kernel

_state: dict[str, bool] = {}
_lock = threading.Lock()


def wanted() -> bool:
    """Whether this CPU runs the kernel and $CANVASLM_INT4_KERNEL does not turn it off."""
    if os.environ.get("CANVASLM_INT4_KERNEL", "").strip().lower() in OFF:
        return False
    return all(flag in cpu_flags() for flag in NEEDS)


def load(folder: Path | None = None, progress: bool = True) -> bool:
    """Load the kernel into this process (built first where `folder` has no build of this source for this torch),
    once; False where it is not `wanted` or cannot be built here (one line on stderr says why, and a note beside the
    libraries keeps a failed build from being tried again until the note is deleted)."""
    if not wanted():
        return False
    with _lock:
        if "loaded" not in _state:
            _state["loaded"] = _build_and_load(folder, progress)
        return _state["loaded"]


def _build_and_load(folder: Path | None, progress: bool) -> bool:
    folder = cache_dir() / "compiled" if folder is None else folder
    key = hashlib.sha256(json.dumps([SOURCE.read_text(), torch.__version__, FLAGS]).encode()).hexdigest()[:16]
    library, failed = folder / f"int4-vnni-{key}.so", folder / f"int4-vnni-{key}.failed"
    if failed.exists():
        return False
    if not library.exists():
        if progress:
            print(f"canvaslm: building the int4 CPU kernel, once (~10 s; kept in {folder}; "
                  "CANVASLM_INT4_KERNEL=torch skips it)", file=sys.stderr, flush=True)
        start = time.perf_counter()
        error = _build(library)
        if error is not None:
            with contextlib.suppress(OSError):
                failed.write_text(error + "\n")
            print(f"canvaslm: using torch's int4 kernel: building ours failed ({error.splitlines()[0][:200]}); "
                  f"delete {failed} to try again", file=sys.stderr, flush=True)
            return False
        if progress:
            print(f"canvaslm: built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    torch.ops.load_library(str(library))
    for op in ("int4_vnni_mm", "q8_0_vnni_mm"):
        torch.library.register_fake(f"canvaslm::{op}")(_shape)
    return True


def _build(library: Path) -> str | None:
    """Compile the source into `library` (whole or not at all); the compiler's complaint where it fails."""
    from torch.utils import cpp_extension
    compiler = os.environ.get("CXX", "c++")
    part = library.with_name(f"{library.stem}.{os.getpid()}.part.so")
    command = [compiler, "-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", *FLAGS,
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *(f"-I{path}" for path in cpp_extension.include_paths()), str(SOURCE), "-o", str(part),
               *(f"-L{path}" for path in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu", "-ltorch"]
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{compiler}: {error}"
    if done.returncode != 0:
        part.unlink(missing_ok=True)
        return (done.stderr.strip() or f"{compiler} exited with {done.returncode}")[-2000:]
    part.replace(library)
    return None


def _shape(x: Tensor, packed: Tensor, float_out: bool) -> Tensor:
    """The op's output without running it (torch.export's tracing of the compiled layer)."""
    return x.new_empty((x.shape[0], packed.shape[0] * TILE), dtype=torch.float32 if float_out else torch.bfloat16)


def pack(q: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """int4 values q [N, K] (0..15, w = (q - 8) * scale + zero in groups of 32 inputs, `quant.quantize_int4`) and
    their scales and zeros [N, K / 32] -> the kernel's uint8 [N / 16, K / 32, 320] (`cpu_kernels.cpp`'s layout)."""
    n, k = q.shape
    tiles, groups = n // TILE, k // GROUP
    # input k = 32 g + 8 c + 4 h + b of output 16 t + j goes to byte (t, g, c, j, b), nibble h
    q = q.to(torch.uint8).reshape(tiles, TILE, groups, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)
    nibbles = (q[..., 0] | (q[..., 1] << 4)).reshape(tiles, groups, 256)

    def per_tile(values: Tensor) -> Tensor:  # [N, G] -> the tile's 16 bfloat16 values a group, as bytes
        return values.to(torch.bfloat16).reshape(tiles, TILE, groups).transpose(1, 2).contiguous().view(torch.uint8)

    return torch.cat([nibbles, per_tile(scales), per_tile(zeros)], dim=-1).contiguous()


def pack_q8_0(q: Tensor, scales: Tensor) -> Tensor:
    """int8 values q [N, K] (-127..127, w = q * scale in groups of 32 inputs, `quant.quantize_q8_0`) and their
    scales [N, K / 32] -> the kernel's uint8 [N / 16, K / 32, 544]: per 16 outputs and 32 inputs, 8 vectors of [16
    outputs][4 inputs] bytes q + 128, then the 16 scales in float16 (GGUF's Q8_0 keeps them so: no rounding)."""
    n, k = q.shape
    tiles, groups = n // TILE, k // GROUP
    # input k = 32 g + 4 c + b of output 16 t + j goes to byte (t, g, c, j, b)
    q = (q.to(torch.int16) + 128).to(torch.uint8).reshape(tiles, TILE, groups, 8, 4).permute(0, 2, 3, 1, 4)
    steps = scales.to(torch.float16).reshape(tiles, TILE, groups).transpose(1, 2).contiguous().view(torch.uint8)
    return torch.cat([q.reshape(tiles, groups, 512), steps], dim=-1).contiguous()


def int4_vnni_mm(rows: Tensor, packed: Tensor, float_out: bool = False) -> Tensor:
    """rows [M, K] (bfloat16) @ W.T for W packed by `pack`: [M, N] in bfloat16, or float32."""
    return torch.ops.canvaslm.int4_vnni_mm(rows, packed, float_out)


def q8_0_vnni_mm(rows: Tensor, packed: Tensor) -> Tensor:
    """rows [M, K] (bfloat16) @ W.T for W packed by `pack_q8_0`: [M, N] in float32 (logits)."""
    return torch.ops.canvaslm.q8_0_vnni_mm(rows, packed, True)
