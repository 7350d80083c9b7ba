"""LoRA: exact no-op at start, adapters-only training, merge equals the adapted model, PEFT-layout files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from canvaslm.errors import CheckpointError
from canvaslm.models import llama
from canvaslm.models.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRALinear, apply_lora, hf_module_names,
                                 load_adapter, merge_lora, save_adapter)
from tests.train.toy_config import MODEL_INIT


def tiny_model(**overrides) -> llama.Model:
    torch.manual_seed(0)
    return llama.Model(llama.Config.from_hf({"model_type": "llama", **MODEL_INIT, **overrides}, "test"))


def logits(model: llama.Model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, model.new_cache(ids.shape[0]), torch.ones_like(ids, dtype=torch.bool))


def randomize_adapters(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(0, 0.1)


IDS = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 4, 8, 0, 31, 6]])


def test_zero_initialised_adapters_leave_the_output_unchanged():
    model = tiny_model()
    before = logits(model, IDS)
    apply_lora(model, rank=4, alpha=8, dropout=0.1)
    model.eval()
    assert torch.equal(logits(model, IDS), before)


def test_only_adapters_and_modules_to_save_train():
    model = tiny_model()
    names = apply_lora(model, rank=4, alpha=8, modules_to_save=["norm"])
    assert len(names) == 2 * 7 and "lm_head" not in names  # q k v o gate up down per layer; not the output layer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{x}" for m in names for x in "AB"} | {"norm.weight"}
    logits(model, IDS).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_targets_pick_module_name_suffixes():
    model = tiny_model()
    assert apply_lora(model, 2, 4, targets=["q_proj", "mlp.down_proj"]) == [
        "layers.0.self_attn.q_proj", "layers.0.mlp.down_proj", "layers.1.self_attn.q_proj", "layers.1.mlp.down_proj"]
    assert apply_lora(tiny_model(), 2, 4, targets="v_proj") == [f"layers.{i}.self_attn.v_proj" for i in (0, 1)]
    for targets in (["qproj"], ["lm_head"]):  # a typo; the output layer (trained in full via modules_to_save)
        with pytest.raises(CheckpointError, match="no nn.Linear module matches"):
            apply_lora(tiny_model(), 2, 4, targets=targets)


def test_merged_model_equals_the_adapted_model():
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8, dropout=0.5)
    randomize_adapters(model)
    model.eval()  # no dropout
    adapted = logits(model, IDS)
    assert not torch.allclose(adapted, logits(tiny_model(), IDS))
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(tiny_model().state_dict())  # plain names again: hf export works
    torch.testing.assert_close(logits(model, IDS), adapted, atol=1e-5, rtol=1e-5)


def test_dropout_acts_on_the_adapter_path_in_training_mode():
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8, dropout=0.5)
    randomize_adapters(model)
    model.train()
    assert not torch.equal(logits(model, IDS), logits(model, IDS))


def test_adapter_files_use_peft_names_and_load_back(tmp_path):
    model = tiny_model()
    hf_names = hf_module_names(model)
    apply_lora(model, rank=4, alpha=8, dropout=0.05)
    randomize_adapters(model)
    save_adapter(model, tmp_path, rank=4, alpha=8, dropout=0.05, base_model="smol-ar", hf_names=hf_names)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == "smol-ar"
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    tensors = load_file(tmp_path / ADAPTER_WEIGHTS)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (32, 4)

    fresh = tiny_model()
    apply_lora(fresh, rank=4, alpha=8)
    load_adapter(fresh, tmp_path, hf_names=hf_names)
    model.eval(), fresh.eval()
    assert torch.equal(logits(fresh, IDS), logits(model, IDS))
    wrong = tiny_model()
    apply_lora(wrong, rank=2, alpha=8)
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_adapter(wrong, tmp_path, hf_names=hf_names)


def test_under_autocast_the_frozen_base_is_cast_once_and_gives_autocasts_result():
    """The bf16 copy a LoRALinear keeps of its frozen base gives exactly what autocast's own cast gives (outputs and
    gradients), and a changed base weight is cast again."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(32, 16), rank=4, alpha=8, dropout=0.0)
    for p in layer.base.parameters():
        p.requires_grad_(False)
    layer.lora_B.data.normal_(0, 0.1)
    x = torch.randn(3, 32, requires_grad=True)

    def reference(x: torch.Tensor) -> torch.Tensor:  # autocast casting the fp32 weight itself
        update = torch.nn.functional.linear(torch.nn.functional.linear(x, layer.lora_A), layer.lora_B)
        return torch.nn.functional.linear(x, layer.base.weight, layer.base.bias) + update * layer.scaling

    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = layer(x), reference(x)
        kept = layer._autocast_base[1]
        assert kept.dtype == torch.bfloat16 and layer(x) is not None and layer._autocast_base[1] is kept  # once
    assert torch.equal(ours, theirs)
    ours_grad = torch.autograd.grad(ours.float().sum(), (x, layer.lora_A))
    theirs_grad = torch.autograd.grad(theirs.float().sum(), (x, layer.lora_A))
    assert all(torch.equal(a, b) for a, b in zip(ours_grad, theirs_grad, strict=True))
    with torch.no_grad():
        layer.base.weight.mul_(2)  # a changed base weight is cast again
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), reference(x))
    assert torch.equal(layer(x), reference(x))  # without autocast: the float32 base itself
