"""`Model.packed_layers`: a quantized model's small passes run its layers as plain calls on their packed weights,
bit-equal to the modules' own way to the same kernels, and only where every linear of the pass would take them."""

from __future__ import annotations

import pytest
import torch

from canvaslm.models import llama
from canvaslm.models.lora import LoRALinear, cache_canvas_weights
from canvaslm.models.quant import quantize
from tests.models.test_quant import adapted_tiny_model, tiny_model


def passes(model: llama.Model) -> dict[str, torch.Tensor]:
    """A prompt of two padded rows, an AR step, a commit of 4 and (on a diffusion model) a canvas of 2 (2 x 2 rows:
    a canvas weight packed for drafts takes up to 4)."""
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    valid = ids != 0
    valid[1] = True
    out = {}
    with torch.inference_mode():
        cache = model.new_cache(2)
        out["prompt"] = model(ids, cache, valid)
        out["step"] = model(torch.tensor([[13], [14]]), cache, torch.ones(2, 1, dtype=torch.bool))
        out["commit"] = model(torch.tensor([[15, 16, 17, 18]] * 2), cache, torch.ones(2, 4, dtype=torch.bool))
        if model.config.canvas_length:
            out["canvas"] = model.decode(torch.tensor([[19, 20]] * 2), cache, None)
    return out


def modules_only(model: llama.Model, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    with monkeypatch.context() as patch:
        patch.setattr(llama.Model, "packed_layers", lambda self, rows: None)
        return passes(model)


def counted(model: llama.Model, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, torch.Tensor], list[bool]]:
    """`passes` with a note of which passes ran on the packed layers."""
    taken, bound = [], llama.Model.packed_layers
    with monkeypatch.context() as patch:
        patch.setattr(llama.Model, "packed_layers",
                      lambda self, rows: taken.append(bound(self, rows) is not None) or bound(self, rows))
        return passes(model), taken


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adapted", [False, True], ids=["parent", "canvas adapters"])
def test_small_passes_run_on_the_packed_layers_bit_equal_to_the_modules(adapted, dtype, monkeypatch):
    model = (adapted_tiny_model() if adapted else tiny_model()).to(dtype)
    if adapted:
        cache_canvas_weights(model)  # merged in the model's dtype
    quantize(model, "int4")
    ours, taken = counted(model, monkeypatch)
    # the prompt (10 rows) is above the int4 kernel's rows on this machine or not; the small passes always take it
    assert taken[-(3 if adapted else 2):] == [True] * (3 if adapted else 2), taken
    reference = modules_only(model, monkeypatch)
    for name, logits in reference.items():
        assert torch.equal(ours[name], logits), name
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    model.to(other)  # the bound layers read the norms' parameters, which `to` converts in place
    if adapted:
        cache_canvas_weights(model)
        quantize(model, "int4")
    ours, taken = counted(model, monkeypatch)
    assert all(taken[-2:]) and all(torch.equal(ours[name], logits)
                                   for name, logits in modules_only(model, monkeypatch).items())


def test_new_adapter_weights_are_never_read_from_old_packed_layers(monkeypatch):
    """`cache_canvas_weights` after the adapters changed: until `quantize` packs the new merged weights the canvas
    pass runs on the modules (dense merged weights), then on the new packed ones; never on the stale ones."""
    model = adapted_tiny_model()
    quantize(model, "int4")
    before, _ = counted(model, monkeypatch)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=0.05)
    cache_canvas_weights(model)
    changed, taken = counted(model, monkeypatch)
    assert taken[-1] is False and not torch.equal(changed["canvas"], before["canvas"])
    assert torch.equal(changed["canvas"], modules_only(model, monkeypatch)["canvas"])
    assert torch.equal(changed["commit"], before["commit"])  # the causal pass (the parent) did not change
    quantize(model, "int4")
    repacked, taken = counted(model, monkeypatch)
    assert taken[-1] is True
    assert torch.equal(repacked["canvas"], modules_only(model, monkeypatch)["canvas"])


def test_the_modules_run_what_the_packed_layers_cannot(monkeypatch):
    """Autograd, a pass of more rows than a packed weight takes, a dense model, and a linear that is not packed."""
    model = tiny_model()
    assert model.packed_layers(1) is None  # not quantized
    quantize(model, "int4")
    with torch.inference_mode():
        assert model.packed_layers(1) is not None
        most = min(w.max_rows for layer in model.packed_layers(1) for w in layer.weights)
        assert model.packed_layers(most) is not None and model.packed_layers(most + 1) is None
        model.layers[0].self_attn.o_proj.packed.max_rows = most - 1  # as `canvaslm bench passes` moves them
        assert model.packed_layers(most) is None
    with torch.enable_grad():
        assert model.packed_layers(1) is None
    del model.layers[1].mlp.__dict__["fused_gate_up"]  # that group's linears now run one by one
    model.__dict__.pop("_packed_layers")
    with torch.inference_mode():
        assert model.packed_layers(1) is None
