"""Weight-only int4 / int8 linears (canvaslm.models.quant): the packing is right, small passes take the packed
kernel and large ones the dense weight, and a quantized model keeps its weights, its state dict and its canvas pass."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from canvaslm import hardware
from canvaslm.hardware import cpu_flags, int4_pays, resolve_quantize
from canvaslm.models import cpu_kernels, llama
from canvaslm.models.lora import LoRALinear, apply_lora, cache_canvas_weights
from canvaslm.models.quant import (
    GROUP_SIZE,
    SMALL_PASS_ROWS,
    PackedWeight,
    QuantizedLinear,
    causal_packed_weights,
    dequantize_int4,
    int4_mode,
    quantize,
    quantize_int4,
    quantize_q8_0,
)


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


@pytest.mark.parametrize("mode, tolerance", [("int4", 0.02), ("int8", 0.02), ("q8_0", 0.02)])
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


def test_q8_0_keeps_the_gguf_grid_where_one_scale_a_channel_does_not():
    """A head's groups differ in scale along a row; Q8_0 gives each group its own, and the two int4 planes that run
    it must add up to that grid's product. Inputs weigh every group alike, so a group rounded away shows."""
    g = torch.Generator().manual_seed(0)
    out_features, groups = 48, 4
    columns = 10.0 ** torch.linspace(0, -3, groups)  # each group's scale, three decades apart
    d = (columns * (0.5 + 0.5 * torch.rand(out_features, groups, generator=g))).half().float()[..., None]
    q = torch.randint(-127, 128, (out_features, groups, GROUP_SIZE), generator=g)
    q[..., 0] = 127  # ggml's quantizer maps each group's largest magnitude to ±127
    weight = (d * q).reshape(out_features, groups * GROUP_SIZE)
    grid, scales = quantize_q8_0(weight)
    assert torch.equal(grid.reshape_as(q), q.float()) and torch.equal(scales[..., None], d)
    x = (torch.randn(6, groups, GROUP_SIZE, generator=g) / columns[:, None]).reshape(6, -1).bfloat16()
    exact = x.double() @ weight.double().T
    y = PackedWeight(weight, "q8_0")(x, torch.float32)
    assert y.dtype == torch.float32 and y.shape == exact.shape
    assert (y - exact).abs().max() <= 0.01 * exact.abs().max()  # the planes' and scales' bfloat16 roundings
    per_channel = PackedWeight(weight, "int8")(x, torch.float32)
    assert (per_channel - exact).abs().max() > 0.1 * exact.abs().max()  # the small groups, rounded away


def test_the_head_is_packed_as_the_cpu_reads_it_fastest(monkeypatch):
    """`head_mode`: q8_0_vnni where our kernel runs (AVX-512 VNNI) and the CPU has no AMX, else q8_0 where two
    int4 planes beat the int8 kernel (AVX-512 BF16 without AMX), int8 elsewhere; either way logits in float32,
    close to the dense head's, and past the packed rows the dense head itself."""
    cases = [({"avx512_bf16"}, "q8_0", 4), ({"avx512_bf16", "amx_bf16", *cpu_kernels.NEEDS}, "int8", 4),
             ({"avx2"}, "int8", 8)]
    if all(flag in cpu_flags() for flag in cpu_kernels.NEEDS):  # the kernel runs on this CPU
        cases.append(({"avx512_bf16", *cpu_kernels.NEEDS}, "q8_0_vnni", 32))
    for flags, mode, rows in cases:
        for module in (hardware, cpu_kernels):
            monkeypatch.setattr(module, "cpu_flags", lambda flags=flags: frozenset(flags))
        model = tiny_model()
        quantize(model, "int4", reorder=False)
        assert model.packed_head.mode == mode and model.packed_head.max_rows == rows
        hidden = torch.randn(1, rows + 1, 64)
        dense = F.linear(hidden, model.embed_tokens.weight)
        logits = model.logits(hidden[:, :rows])
        assert logits.dtype == torch.float32 and not torch.equal(logits, dense[:, :rows])  # the packed head ran
        assert torch.allclose(logits, dense[:, :rows], atol=0.05 * float(dense.abs().max()))
        assert torch.equal(model.logits(hidden), dense)
        last = torch.randn(3, 7, 64).bfloat16()[:, -1]  # a bfloat16 pass's last positions: strided rows
        assert torch.allclose(model.logits(last), F.linear(last.float(), model.embed_tokens.weight),
                              atol=0.05 * float(dense.abs().max()))


def tiny_model(model_type: str = "llama") -> llama.Model:
    config = llama.Config.from_hf(dict(model_type=model_type, vocab_size=80, hidden_size=64, intermediate_size=96,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=128, eos_token_id=1, pad_token_id=0,
                                       tie_word_embeddings=True), "tiny")
    torch.manual_seed(0)
    model = llama.Model(config).eval()
    for name, param in model.named_parameters():  # biases (qwen2's q/k/v) start at zero: make them count
        if name.endswith(".bias"):
            torch.nn.init.normal_(param, std=0.5)
    return model


def adapted_tiny_model() -> llama.Model:
    """`tiny_model` as a block-diffusion model with canvas-only adapters (random, so that they count), merged."""
    model = tiny_model().to_diffusion(16)
    model.config = dataclasses.replace(model.config, canvas_adapters=True)
    apply_lora(model, rank=4, alpha=8)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=0.05)
    model.eval()
    cache_canvas_weights(model)
    return model


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
    packed = quantize(model, mode, reorder=False)  # the dense passes on aten's GEMM, bit for bit
    fused = {f"layers.{i}.{n}" for i in range(2) for n in ("self_attn.q_proj", "self_attn.k_proj",
                                                             "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
    assert len(packed) == 2 * 7 and fused < set(packed)  # q/k/v and gate/up as one packed weight each
    assert all(isinstance(model.get_submodule(n), QuantizedLinear) for n in set(packed) - fused)
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
    model = adapted_tiny_model()
    dense = copy.deepcopy(model)
    quantize(model, "int4", reorder=False)
    model.packed_head = None  # the layers are what this is about (a q8_0_vnni head takes 16 rows too)
    adapters = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    alone = ("o_proj", "down_proj")  # the others are packed in groups (FusedLinears)
    assert all(isinstance(m.base, QuantizedLinear) == (n.startswith("layers.") and n.endswith(alone))
               for n, m in adapters.items())
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


@torch.inference_mode()
@pytest.mark.parametrize("mode, model_type", [("int4", "llama"), ("int8", "llama"), ("int4", "qwen2")])
def test_linears_that_read_the_same_input_run_as_one_packed_weight_with_the_same_products(mode, model_type,
                                                                                          monkeypatch):
    """q/k/v and gate/up packed as one weight each: the logits of every pass equal those of the model packed one
    linear at a time, bit for bit (qwen2: with q/k/v biases), in fewer kernel calls (an AR step of 2 layers: 8
    instead of 14)."""
    dense = tiny_model(model_type)
    assert (model_type == "qwen2") == (dense.layers[0].self_attn.q_proj.bias is not None)
    fused, alone = copy.deepcopy(dense), copy.deepcopy(dense)
    quantize(fused, mode, reorder=False)
    quantize(alone, mode, fuse=False, reorder=False)
    ids = torch.randint(2, 80, (1, 60), generator=torch.Generator().manual_seed(1))
    body = int4_mode() if mode == "int4" else mode  # our kernel where it runs, else torch's
    owner, kernel = (cpu_kernels, "int4_vnni_mm") if body == "int4_vnni" else \
        (torch, "_weight_int4pack_mm_for_cpu" if mode == "int4" else "_weight_int8pack_mm")
    calls, original = [], getattr(owner, kernel)
    monkeypatch.setattr(owner, kernel, lambda *a: calls.append(1) or original(*a))
    head = int({"int8": "int8", "q8_0": "int4"}.get(fused.packed_head.mode) == body)  # one call of its kernel
    for step in (1, 4):
        calls.clear()
        a = last_logits(fused, ids, step)
        fused_calls = len(calls) - head
        calls.clear()
        b = last_logits(alone, ids, step)
        assert torch.equal(a, b)
        assert fused_calls == 2 * 4 and len(calls) - head == 2 * 7


@torch.inference_mode()
@pytest.mark.parametrize("fuse", [True, False])
def test_the_causal_packed_weights_are_all_listed_so_that_no_rows_leaves_every_pass_dense(fuse):
    """`causal_packed_weights` lists every packed weight of the causal pass (per layer: q/k/v and gate/up fused
    plus o and down, or seven alone; then the head): with none of them taking a row, a step computes exactly the
    dense model's logits, and with the kernel's rows it does not."""
    dense = tiny_model()
    packed = copy.deepcopy(dense)
    quantize(packed, "int4", fuse=fuse, reorder=False)
    weights = causal_packed_weights(packed)
    assert len(weights) == len(dense.layers) * (4 if fuse else 7) + 1 and weights[-1] is packed.packed_head
    ids = torch.randint(2, 80, (1, 60), generator=torch.Generator().manual_seed(1))
    assert not torch.equal(last_logits(packed, ids, 1), last_logits(dense, ids, 1))
    for weight in weights:
        weight.max_rows = 0
    assert torch.equal(last_logits(packed, ids, 1), last_logits(dense, ids, 1))


@torch.inference_mode()
def test_fused_canvas_weights_follow_the_adapters_and_step_aside_when_they_change():
    """Canvas-only adapters: a draft-sized canvas pass reads the fused merged weights (bit for bit what the
    one-by-one packing computes); after the adapters change and their merged weights are cached again, the stale
    fused copy is not used: the pass follows the new weights."""
    model = adapted_tiny_model()
    alone = copy.deepcopy(model)
    quantize(model, "int4", reorder=False)
    quantize(alone, "int4", fuse=False, reorder=False)
    ids = torch.randint(2, 80, (1, 40), generator=torch.Generator().manual_seed(2))
    canvas = torch.randint(2, 80, (1, SMALL_PASS_ROWS), generator=torch.Generator().manual_seed(3))

    def canvas_logits(m: llama.Model) -> torch.Tensor:
        cache = m.new_cache(1)
        m.encode(ids, cache, torch.ones_like(ids, dtype=torch.bool))
        return m.decode(canvas, cache, None)

    assert torch.equal(canvas_logits(model), canvas_logits(alone))
    assert torch.equal(last_logits(model, ids, 1), last_logits(alone, ids, 1))  # the causal pass: the bases
    before = canvas_logits(model)
    for m in (model, alone):
        for module in m.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.mul_(3)
        cache_canvas_weights(m)  # merged weights change; their packed copies are gone (dense until packed)
    after = canvas_logits(model)
    assert not torch.equal(after, before)
    assert torch.equal(after, canvas_logits(alone))


def test_reordered_weights_take_the_larger_passes_with_the_dense_products(monkeypatch):
    """`reorder=True` (oneDNN's layout, where MKL's float32 GEMM is slow): the passes a packed kernel does not take
    run on the reordered weights, causal and canvas pass and head alike, and compute the dense model's logits up to
    the order of the sums; the packed kernels then stop at `packed_max_rows(mode, reordered=True)`; with autograd
    on, or under `reorder=False`, the plain weights run."""
    from canvaslm.hardware import packed_max_rows
    from canvaslm.models.quant import ReorderedWeight

    model = adapted_tiny_model()
    dense, plain = copy.deepcopy(model), copy.deepcopy(model)
    quantize(model, "int4", reorder=True)
    quantize(plain, "int4", reorder=False)
    plain.packed_head = None  # a q8_0_vnni head takes the 16 canvas rows itself
    assert all(w.reordered is not None and w.max_rows == packed_max_rows(w.mode, reordered=True)
               for w in causal_packed_weights(model))
    assert all(w.reordered is None for w in causal_packed_weights(plain))
    calls, original = [], ReorderedWeight.__call__
    monkeypatch.setattr(ReorderedWeight, "__call__", lambda self, x: calls.append(x.shape) or original(self, x))
    ids = torch.randint(2, 80, (1, 40), generator=torch.Generator().manual_seed(2))
    canvas = torch.randint(2, 80, (1, 16), generator=torch.Generator().manual_seed(3))

    @torch.no_grad()
    def logits(m: llama.Model) -> tuple[torch.Tensor, torch.Tensor]:
        cache = m.new_cache(1)
        prefill = m.logits(m.encode(ids, cache, torch.ones_like(ids, dtype=torch.bool)))  # 40 rows
        return prefill, m.decode(canvas, cache, None)                                     # 16 canvas rows

    got, exact = logits(model), logits(dense)
    # per layer: q/k/v and gate/up fused, o and down alone, in the prefill and in the canvas pass; then the head
    assert len(calls) == 2 * (2 * 4 + 1)
    for a, b in zip(got, exact, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()
    calls.clear()
    assert all(torch.equal(a, b) for a, b in zip(logits(plain), exact, strict=True)) and calls == []
    x = torch.randn(1, 8, 64, requires_grad=True)  # autograd: the plain weights, no reordered call
    model.layers[0].self_attn.o_proj(x).sum().backward()
    assert calls == [] and x.grad is not None


def test_a_reordered_linear_compiles_to_one_graph_on_its_plain_weight():
    """Under torch.compile the trace takes the plain weight (inductor orders it itself): no graph break at the
    reordered op, and the compiled linear computes the dense product."""
    linear = torch.nn.Linear(64, 48, bias=False)
    layer = QuantizedLinear.wrap(linear, "int4", reordered=True)
    x = torch.randn(8, 64)  # past the packed kernel's rows
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), F.linear(x, linear.weight), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), F.linear(x, linear.weight), rtol=1e-5, atol=1e-5)
