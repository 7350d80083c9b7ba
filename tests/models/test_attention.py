"""attend(): the one-query paths (AR steps) equal torch's SDPA with grouped heads repeated, masked or not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from canvaslm.models.cache import attend


@pytest.mark.parametrize("route", ["matmuls", "sdpa"])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_one_query_attention_equals_sdpa(dtype, atol, route, monkeypatch):
    """One query a row (an AR step) by either route `one_query_sdpa_max_rows` picks: the two small matmuls (many
    rows) or the grouped SDPA kernel (few rows on AMX CPUs)."""
    import canvaslm.models.cache as cache

    monkeypatch.setattr(cache, "one_query_sdpa_max_rows", lambda device: 0 if route == "matmuls" else 8)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 1, 8, generator=g).to(dtype)
    k, v = (torch.randn(3, 2, 11, 8, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(3, 1, 1, 11, generator=g) > 0.3
    mask[..., -1] = True  # every row sees at least itself
    for m in (mask, None):
        ours = attend(q, k, v, m, scale=0.3)
        reference = F.scaled_dot_product_attention(q.float(), k.repeat_interleave(3, 1).float(),
                                                   v.repeat_interleave(3, 1).float(), attn_mask=m, scale=0.3)
        assert ours.shape == (3, 1, 48) and ours.dtype == dtype
        torch.testing.assert_close(ours.float(), reference.transpose(1, 2).reshape(3, 1, 48), atol=atol, rtol=0)


def test_few_rows_of_one_query_take_the_fused_kernel_on_amx_and_are_closer_to_float64(monkeypatch):
    """In bfloat16 the matmul route rounds the scores to bfloat16 before the softmax; the fused kernel keeps them in
    float32, so it is closer to a float64 reference. Only few rows take it, and only where it was measured faster
    (CPUs with AMX)."""
    import canvaslm.models.cache as cache
    from canvaslm.hardware import one_query_sdpa_max_rows

    assert one_query_sdpa_max_rows("cuda") == 0
    g = torch.Generator().manual_seed(2)
    q = torch.randn(4, 9, 1, 64, generator=g).bfloat16()
    k, v = (torch.randn(4, 3, 200, 64, generator=g).bfloat16() for _ in range(2))
    mask = torch.rand(4, 1, 1, 200, generator=g) > 0.2
    exact = attend(q.double(), k.double(), v.double(), mask, scale=0.125)
    errors = {}
    for route, rows in (("matmuls", 0), ("sdpa", 8)):
        monkeypatch.setattr(cache, "one_query_sdpa_max_rows", lambda device, rows=rows: rows)
        errors[route] = (attend(q, k, v, mask, scale=0.125).double() - exact).abs().mean().item()
    assert errors["sdpa"] < 0.75 * errors["matmuls"], errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["canvas", "causal", "none"])
def test_grouped_heads_read_their_keys_as_one_sequence_bit_equal_to_repeated_keys(dtype, shape):
    """n > 1 (a canvas, a prompt chunk, a training pass): the queries of a kv head's group go into SDPA as one
    sequence instead of repeating k/v per head; every output and gradient equals the repeated form exactly."""
    g = torch.Generator().manual_seed(1)
    batch, heads, kv_heads, n, cached, dim = 3, 6, 2, 5, 7, 8
    q = torch.randn(batch, heads, n, dim, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(batch, kv_heads, cached + n, dim, generator=g).to(dtype).requires_grad_() for _ in range(2))
    valid = torch.rand(batch, cached + n, generator=g) > 0.3
    valid[:, cached:] = True
    if shape == "canvas":  # the decoder's: every query sees the same keys (an expanded view, as decoder_mask gives)
        mask = valid[:, None, None, :].expand(-1, 1, n, -1)
    elif shape == "causal":  # the encoder's: each query its own row
        positions = torch.arange(cached + n)
        mask = (positions[None, :] <= positions[cached:, None])[None, None] & valid[:, None, None, :]
    else:
        mask = None
    ours = attend(q, k, v, mask, scale=0.3)
    reference = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                               attn_mask=mask, scale=0.3).transpose(1, 2).reshape(batch, n, -1)
    assert ours.shape == (batch, n, heads * dim) and ours.dtype == dtype
    assert torch.equal(ours, reference)
    weights = torch.randn(ours.shape, generator=g).to(dtype)
    grads = torch.autograd.grad((ours.float() * weights).sum(), (q, k, v))
    expected = torch.autograd.grad((reference.float() * weights).sum(), (q, k, v))
    for ours_grad, reference_grad in zip(grads, expected, strict=True):
        torch.testing.assert_close(ours_grad, reference_grad, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)


def test_grouped_heads_never_copy_the_keys_per_head():
    """The point of grouping: no op writes k/v out once per query head (that copy cost a 32-sequence canvas batch
    ~1-1.5 ms a layer)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.made: list[tuple[str, tuple[int, ...]]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.made.append((str(func), tuple(out.shape)))
            return out

    q = torch.randn(2, 6, 4, 8)
    k, v = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    for mask in (torch.ones(2, 1, 4, 9, dtype=torch.bool), None):
        with Shapes() as ops:
            attend(q, k, v, mask, scale=0.3)
        assert not [made for made in ops.made if made[1] == (2, 6, 9, 8)], ops.made  # keys for 6 heads, not 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_pass_mask_is_made_once_and_changes_no_output(dtype, monkeypatch):
    """`pass_mask`: one query over unpadded keys (an AR step at batch 1) runs unmasked, and a mask of n > 1
    queries comes laid out for the grouped rows; either way attend's output is bit-equal to the raw mask's. A
    padded query's mask is kept, so padding stays unseen."""
    import canvaslm.models.cache as cache
    from canvaslm.models.cache import pass_mask

    monkeypatch.setattr(cache, "one_query_sdpa_max_rows", lambda device: 8)  # the fused kernel's route, any CPU
    g = torch.Generator().manual_seed(3)
    for batch, n in ((1, 1), (3, 1), (1, 4), (3, 4)):
        q = torch.randn(batch, 6, n, 8, generator=g).to(dtype)
        k, v = (torch.randn(batch, 2, 9 + n, 8, generator=g).to(dtype) for _ in range(2))
        positions = torch.arange(9 + n)
        causal = (positions[None, :] <= positions[9:, None])[None, None].expand(batch, 1, n, -1)
        for padded in (False, True):
            valid = torch.ones(batch, 9 + n, dtype=torch.bool)
            valid[:, :3] = not padded
            mask = causal & valid[:, None, None, :]
            made = pass_mask(mask, groups=3)
            if n == 1:
                assert (made is None) == (not padded)
            else:
                assert made.shape == (batch, 1, 3 * n, 9 + n)
            assert torch.equal(attend(q, k, v, made, scale=0.3), attend(q, k, v, mask, scale=0.3))


@pytest.mark.parametrize("fused_rows", [8, 0], ids=["one query fused (AMX)", "one query as matmuls"])
def test_a_causal_pass_of_several_rows_lays_out_its_mask_once_not_in_every_layer(fused_rows, monkeypatch):
    """The encoder of a 4-token commit: its mask is repeated for the grouped rows once per pass (~35 us a layer of
    SmolLM2 saved), and an AR step at batch 1 hands its layers no mask at all, whether one query goes through the
    fused kernel (AMX CPUs) or the matmuls (`one_query_sdpa_max_rows`)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from canvaslm.models import cache as kv_cache
    from canvaslm.models import llama

    monkeypatch.setattr(kv_cache, "one_query_sdpa_max_rows", lambda device_type: fused_rows)

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            masked = "scaled_dot_product" in str(func) and (len(args) > 3 and args[3] is not None
                                                            or (kwargs or {}).get("attn_mask") is not None)
            self.names.append(str(func) + (" with a mask" if masked else ""))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = llama.Model(llama.Config.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
                                              "intermediate_size": 64, "num_hidden_layers": 4,
                                              "num_attention_heads": 4, "num_key_value_heads": 2}, "test"))
    cache = model.new_cache(1)
    with torch.inference_mode():
        model.encode(torch.tensor([[1, 2, 3, 4, 5]]), cache, torch.ones(1, 5, dtype=torch.bool))
        for ids in ([[6, 7, 8, 9]], [[10]]):
            with Ops() as ops:
                model.encode(torch.tensor(ids), cache, torch.ones(1, len(ids[0]), dtype=torch.bool))
            assert sum("aten.repeat" in name for name in ops.names) == (1 if len(ids[0]) > 1 else 0), ops.names
            attention = [name for name in ops.names if "scaled_dot_product" in name or "softmax" in name]
            masking = [name for name in ops.names if "where" in name or "mask" in name]
            assert attention and (len(ids[0]) > 1 or not masking), (attention, masking)
