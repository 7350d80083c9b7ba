"""`Model.bound_layers`: a pass runs its layers as plain calls on the weights bound for it, packed (a quantized
model's small passes) or dense (larger passes, models not quantized), bit-equal to the modules' own way to the same
products, and only where every linear of the pass would run on that kind of weight."""

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
        patch.setattr(llama.Model, "bound_layers", lambda self, rows: None)
        return passes(model)


def counted(model: llama.Model, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, torch.Tensor], list[bool]]:
    """`passes` with a note of which passes ran on the packed layers."""
    taken, bound = [], llama.Model.bound_layers
    with monkeypatch.context() as patch:
        patch.setattr(llama.Model, "bound_layers",
                      lambda self, rows: taken.append(bound(self, rows) is not None) or bound(self, rows))
        return passes(model), taken


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adapted", [False, True], ids=["parent", "canvas adapters"])
@pytest.mark.parametrize("quantized", [True, False], ids=["int4", "dense"])
def test_passes_run_on_the_bound_layers_bit_equal_to_the_modules(quantized, adapted, dtype, monkeypatch):
    """Packed: the small passes; dense: the prompt of 10 rows past the packed kernels' rows where they stop
    sooner, and every pass of a model not quantized. (The dense weights as the modules hold them: not reordered
    for oneDNN, which `quantize` does for float32 models on CPUs not made by Intel; such passes run the modules,
    `test_the_modules_run_what_the_bound_layers_cannot`.)"""
    model = (adapted_tiny_model() if adapted else tiny_model()).to(dtype)
    if adapted:
        cache_canvas_weights(model)  # merged in the model's dtype
    if quantized:
        quantize(model, "int4", reorder=False)
    ours, taken = counted(model, monkeypatch)
    assert taken[1:] == [True] * (3 if adapted else 2), taken  # the prompt may fall between packed and dense
    reference = modules_only(model, monkeypatch)
    for name, logits in reference.items():
        assert torch.equal(ours[name], logits), name
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    model.to(other)  # the bound layers read the norms' parameters, which `to` converts in place
    if adapted:
        cache_canvas_weights(model)
        if quantized:
            quantize(model, "int4", reorder=False)
    ours, taken = counted(model, monkeypatch)
    assert all(taken[-2:]) and all(torch.equal(ours[name], logits)
                                   for name, logits in modules_only(model, monkeypatch).items())


def test_new_adapter_weights_are_never_read_from_old_bound_layers(monkeypatch):
    """`cache_canvas_weights` after the adapters changed: until `quantize` packs the new merged weights the canvas
    pass runs on the dense merged weights (bound as the modules run them), then on the new packed ones; never on
    the stale packed ones."""
    model = adapted_tiny_model()
    quantize(model, "int4")
    before, _ = counted(model, monkeypatch)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=0.05)
    cache_canvas_weights(model)
    changed, taken = counted(model, monkeypatch)
    assert taken[-1] is True and not torch.equal(changed["canvas"], before["canvas"])
    assert torch.equal(changed["canvas"], modules_only(model, monkeypatch)["canvas"])
    assert torch.equal(changed["commit"], before["commit"])  # the causal pass (the parent) did not change
    quantize(model, "int4")
    repacked, taken = counted(model, monkeypatch)
    assert taken[-1] is True
    assert torch.equal(repacked["canvas"], modules_only(model, monkeypatch)["canvas"])


def test_biases_run_on_the_dense_bound_layers_and_never_on_packed_ones(monkeypatch):
    """Qwen2's q/k/v biases: the fused packed weight adds them, so packed passes run the modules; dense passes bind
    each linear with its bias."""
    model = tiny_model("qwen2")
    plain = passes(model)
    assert torch.equal(plain["commit"], modules_only(model, monkeypatch)["commit"])
    quantize(model, "int4")
    ours, taken = counted(model, monkeypatch)
    assert taken[1:] == [False, False]  # an AR step and a commit of 4: packed, with biases
    for name, logits in modules_only(model, monkeypatch).items():
        assert torch.equal(ours[name], logits), name


def test_the_modules_run_what_the_bound_layers_cannot(monkeypatch):
    """Autograd, autocast, a pass of rows some packed weights take and others not, a quantized model's linear
    left unpacked (dense at every size) among packed ones, and the passes past the packed rows of a float32 model
    whose dense weights are reordered for oneDNN (`quantize`'s default on CPUs not made by Intel)."""
    model = tiny_model()
    with torch.inference_mode():
        assert model.bound_layers(1) is not None  # not quantized: dense at any size
    reordered = tiny_model()
    quantize(reordered, "int4", reorder=True)
    with torch.inference_mode():
        most = min(layer.o.max_rows for layer in reordered.bound_layers(1))
        assert reordered.bound_layers(most + 1) is None  # the reordered weights run it, through the modules
    quantize(model, "int4", reorder=False)
    with torch.inference_mode():
        packed = model.bound_layers(1)
        most = min(layer.o.max_rows for layer in packed)
        assert packed is not None and model.bound_layers(most) is packed
        dense = model.bound_layers(most + 1)
        assert dense is not None and dense is not packed
        model.layers[0].self_attn.o_proj.packed.max_rows = most + 4  # as `canvaslm bench passes` moves them
        assert model.bound_layers(most + 1) is None and model.bound_layers(most + 5) is dense
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.bound_layers(1) is None
    with torch.enable_grad():
        assert model.bound_layers(1) is None
    del model.layers[1].mlp.__dict__["fused_gate_up"]  # that group's linears now run one by one, dense
    model.__dict__.pop("_bound_layers")
    with torch.inference_mode():
        assert model.bound_layers(1) is None


def test_a_hooked_layer_runs_its_modules_so_the_hook_runs(monkeypatch):
    """A forward hook on a layer or below (FSDP2 gathers a layer's shards in one; a user's probe) is never skipped:
    such passes run the modules, whenever the hook came."""
    model = tiny_model()
    quantize(model, "int4")
    with torch.inference_mode():
        assert model.bound_layers(1) is not None
        seen = []
        handle = model.layers[1].mlp.down_proj.register_forward_hook(lambda *a: seen.append(1))
        assert model.bound_layers(1) is None and model.bound_layers(100) is None
        passes(model)
        assert len(seen) == 3  # the prompt, the step and the commit
        handle.remove()
        assert model.bound_layers(1) is not None
