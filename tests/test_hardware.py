"""canvaslm.hardware: bfloat16 where the machine has it, float32 elsewhere, and a clear error for a bad name."""

from __future__ import annotations

import pytest
import torch

from canvaslm import hardware


def test_auto_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert hardware.bf16_is_fast("cpu") and hardware.resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not hardware.bf16_is_fast("cpu") and hardware.resolve_dtype("auto", "cpu") == torch.float32
    assert hardware.resolve_dtype("bfloat16", "cpu") == torch.bfloat16  # an explicit choice is kept


def test_auto_quantizes_to_int4_where_bfloat16_is_fast_or_the_cpu_has_avx2(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16", "amx_bf16"}))
    assert hardware.resolve_quantize("auto", "cpu") == "int4" and hardware.resolve_dtype("auto") == torch.bfloat16
    # AVX2 alone: float32 activations with int4 weights (an AR step 84.7 -> 48.8 ms on such an EPYC)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx", "avx2", "fma"}))
    assert hardware.resolve_quantize("auto", "cpu") == "int4" and hardware.resolve_dtype("auto") == torch.float32
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"sse4_2", "avx"}))  # untested ground: dense
    assert hardware.resolve_quantize("auto", "cpu") == "none"
    assert hardware.resolve_quantize("auto", "cuda") == "none" and hardware.resolve_quantize("none", "cpu") == "none"


def test_a_bad_dtype_name_is_refused():
    with pytest.raises(ValueError, match="dtype must be one of"):
        hardware.resolve_dtype("fp8")


def test_describe_names_the_machine():
    info = hardware.describe()
    assert info["cpu"] and info["torch"] == torch.__version__ and set(info["bf16_flags"]) <= set(hardware.BF16_FLAGS)


def test_packed_weights_take_fewer_rows_where_amx_makes_the_dense_bf16_pass_cheap(monkeypatch):
    from canvaslm.models.quant import PackedWeight

    weight = torch.randn(64, 64)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16", "amx_tile"}))
    amx = PackedWeight(weight, "int4")
    assert amx.takes(torch.randn(8, 64, dtype=torch.bfloat16)) and not amx.takes(torch.randn(16, 64))
    assert hardware.packed_max_rows("int8") == 4
    assert hardware.packed_max_rows("int4", dense_program=True) == 8  # not measured beside the dense program
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert PackedWeight(weight, "int4").takes(torch.randn(32, 64)) and hardware.packed_max_rows("int8") == 8
    # the dense weights' compiled layer (a server's) overtakes the packed one from 24 rows on the AVX-512 EPYC
    assert hardware.packed_max_rows("int4", dense_program=True) == 20
    assert hardware.packed_max_rows("int8", dense_program=True) == 8
    # our kernel stays ahead of the dense program up to 32 rows (session 46)
    assert hardware.packed_max_rows("int4_vnni", dense_program=True) == 32
    # the head as two int4 planes: ahead of the dense bfloat16 head up to 4 rows on the AVX-512 EPYC
    assert hardware.head_mode() == "q8_0" and hardware.packed_max_rows("q8_0") == 4
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16", "amx_tile"}))
    assert hardware.head_mode() == "int8"  # the int8 kernel reads the head faster there (session 43)
    assert hardware.head_mode(vnni=True) == "int8"  # ours not measured there
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512_bf16", "avx512_vnni"}))
    assert hardware.head_mode(vnni=True) == "q8_0_vnni" and hardware.packed_max_rows("q8_0_vnni") == 32


def test_float32_weights_are_reordered_for_onednn_on_avx2_cpus_not_made_by_intel(monkeypatch):
    """MKL's float32 GEMM is slow for few rows on an AVX2 AMD EPYC (a causal pass of `smol` at 32 rows: 255 ms
    against 169 on oneDNN's reordered weights), and stays where it was measured fast or not at all."""
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx", "avx2", "fma"}))
    monkeypatch.setattr(hardware, "cpu_vendor", lambda: "AuthenticAMD")
    assert hardware.onednn_float32_pays("cpu") == torch.backends.mkldnn.is_available()
    assert not hardware.onednn_float32_pays("cuda") and not hardware.onednn_float32_pays("meta")
    monkeypatch.setattr(hardware, "cpu_vendor", lambda: "GenuineIntel")
    assert not hardware.onednn_float32_pays("cpu")
    monkeypatch.setattr(hardware, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"sse4_2", "avx"}))
    assert not hardware.onednn_float32_pays("cpu")
    # the packed kernels stop sooner in front of the reordered weights, whatever the flags
    assert hardware.packed_max_rows("int4", reordered=True) == 4
    assert hardware.packed_max_rows("int8", reordered=True) == 3
