"""Weight-only int4 / int8 linears (canvaslm.models.quant): the packing is right, small passes take the packed
kernel and large ones the dense weight, and a quantized model keeps its weights, its state dict and its canvas pass."""

from __future__ import annotations

import copy
import math
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from canvaslm.hardware import int4_pays, resolve_quantize
from canvaslm.models import llama
from canvaslm.models.lora import LoRALinear, apply_lora, cache_canvas_weights
from canvaslm.models.quant import (GROUP_SIZE, SMALL_PASS_ROWS, PackedWeight, QuantizedLinear, dequantize_int4,
                                   quantize, quantize_int4)


def q4_1_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """A weight on GGUF Q4_1's grid: per group of 32 inputs, w = d * q + m with float16 d and m, q in 0..15, and
    both ends of the grid used (what ggml's quantizer produces: m is the group's minimum, d its range / 15)."""
    g = torch.Generator().manual_seed(seed)
    groups = in_features // GROUP_SIZE
    d = (torch.rand(out_features, groups, 1, generator=g) * 0.05 + 0.001).half().float()
    m = (-torch.rand(out_features, groups, 1, generator=g) * 0.4).half().float()
    q = torch.randint(0, 16, (out_features, groups, GROUP_SIZE), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    return (d * q + m).reshape(out_features, in_features)


def test_int4_packing_of_a_q4_1_weight_is_exact():
    weight = q4_1_weight(48, 96)
    q, scales, zeros = quantize_int4(weight)
    assert q.min() >= 0 and q.max() <= 15
    assert torch.equal(dequantize_int4(q, scales, zeros), weight)


@pytest.mark.parametrize("mode, tolerance", [("int4", 0.02), ("int8", 0.02)])
def test_a_packed_weight_computes_the_product_it_stands_for(mode, tolerance):
    torch.manual_seed(0)
    weight = q4_1_weight(64, 96) if mode == "int4" else torch.randn(64, 96)
    packed = PackedWeight(weight, mode)
    x = torch.randn(3, 5, 96)
    y = packed(x)
    assert y.shape == (3, 5, 64) and y.dtype == torch.float32
    exact = x @ weight.T
    # the packed kernel rounds activations and scales to bfloat16: ~1% of the output's scale, not more
    assert (y - exact).abs().max() <= tolerance * exact.abs().max()
    # a transposed or misordered scale layout would be off by the output's whole scale
    assert not torch.allclose(y, x @ weight.flip(0).T, atol=0.5 * float(exact.abs().max()))


def tiny_model() -> llama.Model:
    config = llama.Config.from_hf(dict(model_type="llama", vocab_size=80, hidden_size=64, intermediate_size=96,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=128, eos_token_id=1, pad_token_id=0,
                                       tie_word_embeddings=True), "tiny")
    torch.manual_seed(0)
    return llama.Model(config).eval()


def last_logits(model: llama.Model, ids: torch.Tensor, step: int) -> torch.Tensor:
    """Logits of `step` tokens appended in one pass after the rest of `ids` is encoded."""
    cache = model.new_cache(1)
    model.encode(ids[:, :-step], cache, torch.ones_like(ids[:, :-step], dtype=torch.bool))
    return model.logits(model.encode(ids[:, -step:], cache, torch.ones_like(ids[:, -step:], dtype=torch.bool)))


@torch.inference_mode()
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_a_quantized_model_keeps_its_weights_and_follows_the_dense_one(mode):
    dense = tiny_model()
    model = copy.deepcopy(dense)
    packed = quantize(model, mode)
    assert len(packed) == 2 * 7 and all(isinstance(model.get_submodule(n), QuantizedLinear) for n in packed)
    before, after = dense.state_dict(), model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    ids = torch.randint(2, 80, (1, 60), generator=torch.Generator().manual_seed(1))
    small, reference = last_logits(model, ids, 1), last_logits(dense, ids, 1)
    assert not torch.equal(small, reference)  # the packed kernels ran
    probs = reference.softmax(-1)
    kl = (probs * (reference.log_softmax(-1) - small.log_softmax(-1))).sum()
    assert kl < 0.02, kl
    # past `max_rows` rows a pass runs on the dense weights: the prefill is the dense model's, bit for bit
    big = model.logits(model.encode(ids, model.new_cache(1), torch.ones_like(ids, dtype=torch.bool)))
    assert torch.equal(big, dense.logits(dense.encode(ids, dense.new_cache(1), torch.ones_like(ids, dtype=torch.bool))))


@torch.inference_mode()
def test_canvas_adapters_keep_a_dense_canvas_pass_over_a_packed_causal_pass_and_pack_small_drafts():
    """A 16-token canvas runs the merged canvas weights dense (the canvas sampler's numerics stay); a pass of up to
    SMALL_PASS_ROWS canvas tokens (a verified draft) runs them packed, close to the dense product."""
    model = tiny_model().to_diffusion(16)  # 16 rows: the int8 head is dense too (packed_max_rows)
    model.config = dataclasses.replace(model.config, canvas_adapters=True)
    apply_lora(model, rank=4, alpha=8)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=0.05)
    model.eval()
    cache_canvas_weights(model)
    dense = copy.deepcopy(model)
    quantize(model, "int4")
    adapters = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert all(isinstance(m.base, QuantizedLinear) == n.startswith("layers.") for n, m in adapters.items())
    ids = torch.randint(2, 80, (1, 40), generator=torch.Generator().manual_seed(2))
    canvas = torch.randint(2, 80, (1, 16), generator=torch.Generator().manual_seed(3))

    def canvas_logits(m: llama.Model) -> torch.Tensor:
        cache = m.new_cache(1)
        m.encode(ids, cache, torch.ones_like(ids, dtype=torch.bool))  # 40 rows: dense either way
        return m.decode(canvas, cache, None)

    assert torch.equal(canvas_logits(model), canvas_logits(dense))  # the merged canvas weights stay dense
    assert not torch.equal(last_logits(model, ids, 1), last_logits(dense, ids, 1))  # the causal step is packed
    assert model.small_pass_rows == SMALL_PASS_ROWS and dense.small_pass_rows is None
    canvas = canvas[:, :SMALL_PASS_ROWS]
    packed, exact = canvas_logits(model), canvas_logits(dense)
    assert not torch.equal(packed, exact)  # a draft-sized canvas runs the packed canvas weights
    assert (packed.softmax(-1) - exact.softmax(-1)).abs().max() < 0.05


def test_auto_picks_int4_where_the_kernel_pays():
    assert resolve_quantize("auto", "cpu") == ("int4" if int4_pays("cpu") else "none")
    assert resolve_quantize("auto", "cuda") == "none" and resolve_quantize("int8", "cpu") == "int8"
    with pytest.raises(ValueError, match="quantize must be one of"):
        resolve_quantize("int3", "cpu")


def test_shapes_the_kernel_does_not_take_stay_dense():
    assert PackedWeight.fits(torch.zeros(48, 64), "int4") and not PackedWeight.fits(torch.zeros(40, 64), "int4")
    assert not PackedWeight.fits(torch.zeros(48, 40), "int4") and PackedWeight.fits(torch.zeros(40, 48), "int8")
    assert not PackedWeight.fits(torch.zeros(40, 40), "int8")
    with pytest.raises(ValueError, match="does not take"):
        PackedWeight(torch.zeros(40, 40), "int8")
    linear = torch.nn.Linear(40, 40)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"proj": linear})])
    model.embed_tokens = torch.nn.Embedding(10, 40)
    assert quantize(model, "int4") == [] and model.layers[0]["proj"] is linear and model.packed_head is None
    model.embed_tokens = torch.nn.Embedding(10, 48)
    quantize(model, "int8")
    x = torch.randn(2, 48)
    assert torch.allclose(model.packed_head(x), F.linear(x, model.embed_tokens.weight), rtol=0.05, atol=0.05)


def test_the_last_positions_logits_read_the_head_without_copying_it():
    """A bfloat16 [B, 1, H] slice of a longer pass keeps its parent's strides; F.linear on it copied the whole
    [V, H] head per call (~80 ms for SmolLM2's on the CPU, against ~2 for the same rows as a matrix)."""
    from canvaslm.models.quant import head_logits

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4096, 64, generator=g).to(torch.bfloat16)
    hidden = torch.randn(2, 7, 64, generator=g).to(torch.bfloat16)
    last = hidden[:, -1:]
    with torch.profiler.profile(record_shapes=True) as prof:
        logits = head_logits(last, weight, None)
    copied = [event.input_shapes for event in prof.events() if event.name == "aten::copy_"
              and any(shape and math.prod(shape) >= weight.numel() for shape in event.input_shapes)]
    assert copied == []
    assert logits.shape == (2, 1, 4096) and logits.dtype == torch.float32
    assert torch.equal(logits, F.linear(last.contiguous().reshape(2, 64), weight).float()[:, None])
