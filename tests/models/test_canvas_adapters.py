"""Canvas-only adapters: the causal pass stays the AR parent, the canvas pass is parent + LoRA, in training and in
inference, through save / load, and with the merged weights inference keeps."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from canvaslm.checkpoints import hf
from canvaslm.models import llama
from canvaslm.models.lora import LoRALinear, apply_lora, cache_canvas_weights, merge_lora, set_canvas_pass

CANVAS = 4


def parent() -> llama.Model:
    config = llama.Config.from_hf(dict(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=64, eos_token_id=1, pad_token_id=0), "tiny")
    torch.manual_seed(0)
    return llama.Model(config).to_diffusion(CANVAS).eval()


def with_canvas_adapters(model: llama.Model) -> llama.Model:
    """A copy with canvas-only LoRA whose B is random (a fresh adapter would change nothing)."""
    model = copy.deepcopy(model)
    model.config = dataclasses.replace(model.config, canvas_adapters=True)
    apply_lora(model, rank=4, alpha=8.0)
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=0.3)
    return model.eval()


def encode_then_decode(model, prompt: torch.Tensor, canvas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cache = model.new_cache(prompt.shape[0])
    prompt_logits = model.logits(model.encode(prompt, cache, torch.ones_like(prompt, dtype=torch.bool)))
    return prompt_logits, model.decode(canvas, cache, None)


@torch.no_grad()
def test_the_causal_pass_is_the_parent_and_the_canvas_pass_is_parent_plus_adapter():
    base = parent()
    adapted = with_canvas_adapters(base)
    merged = merge_lora(copy.deepcopy(adapted))
    merged.config = dataclasses.replace(merged.config, canvas_adapters=False)
    prompt, canvas = torch.randint(2, 61, (2, 7)), torch.randint(2, 61, (2, CANVAS))
    base_prompt, base_canvas = encode_then_decode(base, prompt, canvas)
    ours_prompt, ours_canvas = encode_then_decode(adapted, prompt, canvas)
    assert torch.equal(ours_prompt, base_prompt)                    # bit for bit the parent
    assert not torch.allclose(ours_canvas, base_canvas, atol=1e-3)  # the adapter acts on the canvas
    # the canvas pass reads the parent's cache with the adapted weights: the merged model's decode on that cache
    cache = base.new_cache(2)
    base.encode(prompt, cache, torch.ones_like(prompt, dtype=torch.bool))
    torch.testing.assert_close(ours_canvas, merged.decode(canvas, cache, None), atol=1e-5, rtol=0)
    # the merged weights inference keeps give the same logits as the three-matmul adapter path
    cache_canvas_weights(adapted)
    torch.testing.assert_close(encode_then_decode(adapted, prompt, canvas)[1], ours_canvas, atol=1e-5, rtol=0)


def test_training_forward_trains_only_the_canvas_pass():
    adapted = with_canvas_adapters(parent()).train()
    ids = torch.randint(2, 61, (2, 3 + 2 * CANVAS))
    valid = torch.ones_like(ids, dtype=torch.bool)
    noised = torch.randint(2, 61, (2, 2 * CANVAS))
    encoder, canvas = adapted.forward_block_diffusion(ids, valid, 3, noised, None)
    assert not encoder.requires_grad and canvas.requires_grad      # no autograd through the frozen parent
    with torch.no_grad():
        set_canvas_pass(adapted, False)
        parent_logits = adapted.logits(adapted.encode(ids, adapted.new_cache(2), valid))
    torch.testing.assert_close(encoder, parent_logits, atol=1e-5, rtol=0)
    canvas.sum().backward()
    grads = [m.lora_B.grad for m in adapted.layers.modules() if isinstance(m, LoRALinear)]
    assert len(grads) == 14 and all(g is not None and g.abs().sum() > 0 for g in grads)


@torch.no_grad()
def test_a_canvas_adapter_model_round_trips_through_save_and_load(tmp_path):
    adapted = with_canvas_adapters(parent())
    hf.save_model(adapted, tmp_path / "m")
    assert (tmp_path / "m" / hf.CANVAS_ADAPTER / "adapter_model.safetensors").is_file()
    _, loaded = hf.load_model(tmp_path / "m")
    assert loaded.config.canvas_adapters
    prompt, canvas = torch.randint(2, 61, (1, 5)), torch.randint(2, 61, (1, CANVAS))
    for ours, theirs in zip(encode_then_decode(loaded, prompt, canvas), encode_then_decode(adapted, prompt, canvas)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # saving did not strip the adapters from the model in memory
    assert any(isinstance(m, LoRALinear) for m in adapted.modules())


def test_a_missing_adapter_folder_is_a_clear_error(tmp_path):
    hf.save_model(with_canvas_adapters(parent()), tmp_path / "m")
    for f in (tmp_path / "m" / hf.CANVAS_ADAPTER).iterdir():
        f.unlink()
    (tmp_path / "m" / hf.CANVAS_ADAPTER).rmdir()
    with pytest.raises(Exception, match="canvas_adapters"):
        hf.load_model(tmp_path / "m")


def test_unmerged_adapters_that_are_not_canvas_only_are_refused_on_save(tmp_path):
    model = parent()
    apply_lora(model, rank=2, alpha=4.0)
    with pytest.raises(Exception, match="merge"):
        hf.save_model(model, tmp_path / "m")


@torch.no_grad()
def test_an_adapter_that_never_saw_self_conditioning_is_skipped_and_a_trained_one_is_read():
    model = copy.deepcopy(parent())
    model.config = dataclasses.replace(model.config, canvas_adapters=True)
    apply_lora(model, rank=4, alpha=8.0)  # wraps the self-conditioning block's down_proj too; its B starts at 0
    down = model.self_conditioning.down_proj
    assert isinstance(down, LoRALinear)
    runs = []
    model.self_conditioning.register_forward_hook(lambda *_: runs.append(1))
    cache = model.new_cache(1)
    prompt = torch.randint(2, 61, (1, 5))
    model.encode(prompt, cache, torch.ones_like(prompt, dtype=torch.bool))
    canvas, sc = torch.randint(2, 61, (1, CANVAS)), torch.randn(1, CANVAS, 61)
    plain = model.decode(canvas, cache, None)
    torch.testing.assert_close(model.decode(canvas, cache, sc), plain, atol=0, rtol=0)
    assert not runs  # zero base and zero B: the block adds nothing, so the pass skips it
    torch.nn.init.normal_(down.base.weight, std=0.3)
    torch.nn.init.normal_(down.lora_B, std=0.3)
    assert (model.decode(canvas, cache, sc) - plain).abs().max() > 1e-3 and runs


def test_switching_passes_finds_the_adapters_once_and_again_after_they_come_or_go(monkeypatch):
    """`set_canvas_pass` runs before most passes: it walks the model once, and again only after adapters were
    added, taken out or merged, so a switch never misses an adapter nor touches one that left; a copy of the
    model switches its own adapters."""
    from canvaslm.models.lora import without_adapters

    adapted = with_canvas_adapters(parent())
    adapters = [m for m in adapted.modules() if isinstance(m, LoRALinear)]
    set_canvas_pass(adapted, True)
    copied = copy.deepcopy(adapted)
    set_canvas_pass(copied, False)
    assert all(m.canvas_pass for m in adapters)
    assert not any(m.canvas_pass for m in copied.modules() if isinstance(m, LoRALinear))
    walks = []
    modules = adapted.modules
    monkeypatch.setattr(adapted, "modules", lambda: walks.append(1) or modules())
    for canvas in (False, True, False):
        set_canvas_pass(adapted, canvas)
    assert not walks and adapters and not any(m.canvas_pass for m in adapters)
    with without_adapters(adapted):
        set_canvas_pass(adapted, True)  # no adapter in place: nothing to switch
        assert not any(m.canvas_pass for m in adapters)
    set_canvas_pass(adapted, True)  # back in place: every one of them switches
    assert all(m.canvas_pass for m in adapters) and len(walks) == 2
    merge_lora(adapted)
    set_canvas_pass(adapted, False)
    assert all(m.canvas_pass for m in adapters) and len(walks) == 3
