"""Our int4 CPU kernel (canvaslm.models.cpu_kernels): the product it computes, its rows independent of each other,
the packing `quantize` picks with it, and the way back to torch's kernel where it cannot build or is turned off."""

from __future__ import annotations

import copy

import pytest
import torch

from canvaslm.hardware import cpu_flags
from canvaslm.models import cpu_kernels
from canvaslm.models.quant import PackedWeight, dequantize_int4, int4_mode, quantize, quantize_int4
from tests.models.test_quant import q4_1_weight, tiny_model

runs_here = pytest.mark.skipif(not all(f in cpu_flags() for f in cpu_kernels.NEEDS),
                               reason="the kernel needs AVX-512 VNNI, which this CPU lacks")


def exact(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ W.T in float64 on the int4 grid the kernel holds (scales and zeros rounded to bfloat16, as packed)."""
    q, scales, zeros = quantize_int4(weight)
    w = dequantize_int4(q, scales.bfloat16().float(), zeros.bfloat16().float())
    return x.double() @ w.double().T


def inputs(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """bfloat16 rows with an outlier channel and a group of zeros, as hidden states have."""
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    x[:, 5] *= 40
    x[:, 32:64] = 0
    return x.bfloat16()


@runs_here
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 19])
@pytest.mark.parametrize("shape", [(16, 64), (48, 576), (32, 1536)])
def test_the_kernel_computes_the_int4_product_to_float32_precision(rows, shape):
    """The activations go in as two int8 planes a group (the second holds the first's rounding at 1/254 of its
    step), so the float32 output is within ~5e-5 of the exact product (here, with an outlier 40 times the other
    inputs): one plane alone (8 bits a group) is off by ~5e-3, torch's int4 kernel's bfloat16 output by ~2e-3."""
    assert cpu_kernels.load()
    weight = q4_1_weight(*shape, seed=rows)
    packed = PackedWeight(weight, "int4_vnni")
    x = inputs(rows, shape[1], seed=rows)
    want = exact(x.float(), weight)
    got = cpu_kernels.int4_vnni_mm(x, packed.packed, float_out=True)
    assert got.dtype == torch.float32 and got.shape == (rows, shape[0])
    assert ((got.double() - want).norm() / want.norm()).item() < 1.5e-4
    rounded = packed(x)  # bfloat16, rounded once from the same float32 sums
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, got.bfloat16())


def q8_0_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """A weight on GGUF Q8_0's grid: per group of 32 inputs, w = d * q with float16 d and q in -127..127, the
    largest at +-127 (ggml's quantizer)."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(out_features, in_features // 32, 1, generator=g) * 0.01 + 1e-4).half().float()
    q = torch.randint(-127, 128, (out_features, in_features // 32, 32), generator=g)
    q[..., 0] = 127
    return (d * q).reshape(out_features, in_features)


@runs_here
@pytest.mark.parametrize("rows", [1, 4, 11])
def test_the_head_kernel_computes_the_q8_0_product_to_float32_precision(rows):
    """The output head on the GGUF's Q8_0 grid, as it is (float16 scales kept exactly), in float32 logits."""
    assert cpu_kernels.load()
    weight = q8_0_weight(256, 576, seed=rows)
    packed = PackedWeight(weight, "q8_0_vnni")
    x = inputs(rows, 576, seed=rows)
    want = x.double() @ weight.double().T
    got = packed(x, torch.float32)
    assert ((got.double() - want).norm() / want.norm()).item() < 1.5e-4
    assert torch.equal(cpu_kernels.q8_0_vnni_mm(x[-1:].contiguous(), packed.packed)[0], got[-1])


@runs_here
def test_a_row_gets_the_same_bits_alone_or_in_a_batch():
    """Rows never mix: each is quantized by itself and summed in the same order, so a sequence's logits do not
    depend on what else the server batches with it (torch's dense GEMM does not promise that)."""
    assert cpu_kernels.load()
    weight = q4_1_weight(64, 576)
    packed = PackedWeight(weight, "int4_vnni").packed
    x = inputs(13, 576)
    together = cpu_kernels.int4_vnni_mm(x, packed, float_out=True)
    for i in range(13):
        assert torch.equal(cpu_kernels.int4_vnni_mm(x[i:i + 1].contiguous(), packed, float_out=True)[0], together[i])


@runs_here
def test_bad_inputs_get_the_ops_own_error():
    assert cpu_kernels.load()
    packed = PackedWeight(q4_1_weight(16, 64), "int4_vnni").packed
    with pytest.raises(RuntimeError, match=r"x must be bfloat16 \[M, K\] on the CPU, got Float"):
        cpu_kernels.int4_vnni_mm(torch.randn(2, 64), packed)
    strided = torch.randn(3, 2, 64).bfloat16()[:, -1]  # a pass's last positions
    assert torch.equal(cpu_kernels.int4_vnni_mm(strided, packed),
                       cpu_kernels.int4_vnni_mm(strided.contiguous(), packed))
    with pytest.raises(RuntimeError, match=r"packed must be uint8 \[N / 16, K / 32, 320\] for K = 96"):
        cpu_kernels.int4_vnni_mm(torch.randn(2, 96).bfloat16(), packed)


@runs_here
def test_quantize_packs_int4_for_the_kernel_unless_told_not_to(monkeypatch):
    model = tiny_model()
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    quantize(ours, "int4")
    monkeypatch.setenv("CANVASLM_INT4_KERNEL", "torch")
    assert int4_mode() == "int4"
    quantize(theirs, "int4")
    modes = {w.mode for m in ours.modules() for w in m.__dict__.values() if isinstance(w, PackedWeight)}
    modes |= {f.causal.mode for m in ours.modules() for k, f in m.__dict__.items() if k.startswith("fused_")}
    assert "int4_vnni" in modes and "int4" not in modes
    ids = torch.randint(0, 80, (1, 6))
    valid = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        want = model(ids, model.new_cache(1), valid)
        got = {name: m(ids, m.new_cache(1), valid) for name, m in (("ours", ours), ("theirs", theirs))}
    # the same int4 weights on either kernel: as close to the float32 model as each other
    error = {name: (y - want).abs().max().item() for name, y in got.items()}
    assert error["ours"] < 2 * error["theirs"] + 1e-3, error
    assert (got["ours"] - got["theirs"]).abs().max().item() < 0.05


def test_a_failed_build_says_why_once_and_leaves_torchs_kernel(tmp_path, monkeypatch, capsys):
    """No compiler (or a broken one): one line on stderr, a note beside the libraries, and no second try."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert cpu_kernels._build_and_load(tmp_path, progress=True) is False
    err = capsys.readouterr().err
    assert "using torch's int4 kernel: building ours failed" in err and "no-such-compiler" in err
    notes = list(tmp_path.glob("int4-vnni-*.failed"))
    assert len(notes) == 1 and "no-such-compiler" in notes[0].read_text()
    assert cpu_kernels._build_and_load(tmp_path, progress=True) is False
    assert capsys.readouterr().err == ""  # not tried again
    assert not list(tmp_path.glob("*.so"))


def test_the_kernel_is_not_wanted_without_vnni_or_when_turned_off(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    assert not cpu_kernels.wanted() and not cpu_kernels.load()
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset(cpu_kernels.NEEDS))
    assert cpu_kernels.wanted()
    for value in ("torch", "0", "off"):
        monkeypatch.setenv("CANVASLM_INT4_KERNEL", value)
        assert not cpu_kernels.wanted()
