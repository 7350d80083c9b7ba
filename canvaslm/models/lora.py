"""LoRA: low-rank adapters on a model's nn.Linear layers, written in the PEFT file layout.

`apply_lora` swaps each targeted nn.Linear for a `LoRALinear` computing base(x) + scale * B(A(dropout(x))) with
B = 0 at the start (so the model is unchanged until trained) and freezes every other weight.

Canvas-only adapters (`set_canvas_pass`): a block-diffusion model converted from an AR parent may keep its causal
pass exactly the parent and adapt only the canvas pass. Each `LoRALinear` then follows the pass the model is in
(`canvas_pass`); the prompt cache is the parent's, the causal pass needs no backward in training, and the same
weights still decode autoregressively. For inference `cache_canvas_weights` keeps base + delta merged beside the
base weight, so the canvas pass costs what a merged model costs. `merge_lora` bakes the
adapters back into plain nn.Linear layers for export. `save_adapter` / `load_adapter` write and read
adapter_model.safetensors + adapter_config.json with PEFT's tensor names and keys.
(Our own small module: peft itself pulls in transformers.)
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from canvaslm.errors import CheckpointError
from canvaslm.models.quant import PackedWeight, forget_bound_layers

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# never adapted: canvaslm models read lm_head.weight directly (an adapter there would do nothing); train the head in
# full with modules_to_save instead
OUTPUT_LAYERS = ("lm_head",)
ADAPTERS_FOUND = "_canvas_adapters"  # where `set_canvas_pass` keeps a model's adapters


class LoRALinear(nn.Module):
    """nn.Linear plus a trainable low-rank update; the wrapped layer stays at `.base`, frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init for A; B = 0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.canvas_pass = True          # False: act as the base layer (the causal pass of canvas-only adapters)
        self.canvas_weight: Tensor | None = None  # base + delta, kept by `cache_canvas_weights` for inference
        self.canvas_packed: PackedWeight | None = None  # canvas_weight packed by canvaslm.models.quant.quantize
        self._autocast_base: tuple[tuple[int, int, torch.dtype], Tensor] | None = None  # see `_frozen_base`

    @property
    def weight(self) -> Tensor:
        """The base weight, for code that reads `.weight` directly (it does not see the adapter)."""
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        if not self.canvas_pass:
            return self._frozen_base(x)
        if self.canvas_weight is not None and not torch.is_grad_enabled():
            y = None if self.canvas_packed is None else self.canvas_packed.apply(x)
            if y is not None:
                return y if self.base.bias is None else y + self.base.bias
            return nn.functional.linear(x, self.canvas_weight, self.base.bias)
        update = nn.functional.linear(nn.functional.linear(self.dropout(x), self.lora_A), self.lora_B)
        return self._frozen_base(x) + update * self.scaling

    def _frozen_base(self, x: Tensor) -> Tensor:
        """base(x). Under autocast, a frozen base weight is cast once and kept: autocast caches only the casts of
        weights that require grad, so it would cast every frozen weight again on every call (9% of a bf16 CPU
        training step). The kept copy is what autocast would compute, so the result is the same bit for bit."""
        weight = self.base.weight
        device = x.device.type
        if weight.requires_grad or not torch.is_autocast_enabled(device):
            return self.base(x)
        dtype = torch.get_autocast_dtype(device)
        key = (weight.data_ptr(), weight._version, dtype)  # a changed or reloaded base weight is cast again
        if self._autocast_base is None or self._autocast_base[0] != key:
            self._autocast_base = key, weight.detach().to(dtype)
        return nn.functional.linear(x, self._autocast_base[1], self.base.bias)

    def delta(self) -> Tensor:
        """scale * B @ A, the weight update the adapter stands for (computed in float32)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


def set_canvas_pass(model: nn.Module, canvas: bool) -> None:
    """Put every adapter of `model` in the canvas pass (adapters on) or the causal pass (adapters off).

    The adapters are looked up once and kept on `model` (`_set_module`, the one place that adds or removes them,
    forgets the list): walking SmolLM2's 795 modules took 2.1 ms, and a model switches before most passes. The
    flag is a plain attribute, set past `nn.Module.__setattr__`, which checks its parameter, buffer and module
    dictionaries on every call (0.6 ms for 210 adapters)."""
    for module in adapters_of(model):
        object.__setattr__(module, "canvas_pass", canvas)


def adapters_of(model: nn.Module) -> list[LoRALinear]:
    """`model`'s adapters, looked up once and kept (see `set_canvas_pass`)."""
    adapters = model.__dict__.get(ADAPTERS_FOUND)
    if adapters is None:
        adapters = [module for module in model.modules() if isinstance(module, LoRALinear)]
        model.__dict__[ADAPTERS_FOUND] = adapters
    return adapters


def cache_canvas_weights(model: nn.Module) -> None:
    """Keep each adapter's merged weight (base + delta, in the base dtype) for no-grad canvas passes: inference
    then runs one matmul per layer, not three. Call again after the adapters change."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            weight = module.base.weight
            module.canvas_weight = (weight.float() + module.delta()).to(weight.dtype).detach()
            module.canvas_packed = None  # packed from the old weight: `quantize` packs the new one
    forget_bound_layers(model)


def lora_targets(model: nn.Module, targets: str | Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """Names of the nn.Linear modules to adapt: all of them for "all-linear", else those whose name ends with one
    of `targets` (a module-name suffix such as "q_proj" or "mlp.down_proj"); never the output layer, nor modules
    inside `exclude` (trained in full instead)."""
    if isinstance(targets, str) and targets != "all-linear":
        targets = [targets]
    names = []
    for name, module in model.named_modules():
        if (not isinstance(module, nn.Linear) or name.split(".")[-1] in OUTPUT_LAYERS
                or any(_within(name, e) for e in exclude)):
            continue
        if targets == "all-linear" or any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    return names


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               targets: str | Sequence[str] = "all-linear", modules_to_save: Sequence[str] = ()) -> list[str]:
    """Wrap the targeted linears in place and freeze all weights but the adapters and `modules_to_save`.
    Returns the adapted module names; raises CheckpointError when nothing matches."""
    names = lora_targets(model, targets, modules_to_save)
    if not names:
        raise CheckpointError("lora", "no nn.Linear module matches the LoRA targets", field="targets",
                              expected="'all-linear' or module-name suffixes such as 'q_proj'", found=targets)
    missing = [m for m in modules_to_save if not _has_module(model, m)]
    if missing:
        raise CheckpointError("lora", "no module of that name in the model", field="modules_to_save",
                              found=missing[0])
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _set_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    for name in modules_to_save:
        model.get_submodule(name).requires_grad_(True)
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Bake every adapter into its base weight and put the plain nn.Linear back (in place; returns `model`)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            with torch.no_grad():
                weight = module.base.weight
                weight.copy_((weight.float() + module.delta()).to(weight.dtype))
            _set_module(model, name, module.base)
    return model


def adapter_state(model: nn.Module, modules_to_save: Sequence[str] = ()) -> dict[str, Tensor]:
    """The trained tensors under our own names: every lora_A / lora_B and the `modules_to_save` weights."""
    return {name: p for name, p in model.named_parameters()
            if name.endswith((".lora_A", ".lora_B")) or any(_within(name, m) for m in modules_to_save)}


def save_adapter(model: nn.Module, directory: str | Path, *, rank: int, alpha: float, dropout: float,
                 modules_to_save: Sequence[str] = (), base_model: str | None = None,
                 hf_names: Mapping[str, str] | None = None) -> None:
    """Write adapter_model.safetensors + adapter_config.json (PEFT layout). `hf_names` maps our module names to
    the checkpoint's (see `hf_module_names`), so that PEFT can apply the adapter to the transformers model."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {_peft_name(name, hf_names): t.detach().to("cpu").contiguous()
               for name, t in adapter_state(model, modules_to_save).items()}
    save_file(tensors, path / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    adapted = sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, LoRALinear)})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": adapted,
              "modules_to_save": [_hf_module(m, hf_names) for m in modules_to_save] or None, "bias": "none",
              "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "inference_mode": True}
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_adapter(model: nn.Module, directory: str | Path, hf_names: Mapping[str, str] | None = None) -> None:
    """Load adapter tensors saved by `save_adapter` into a model already wrapped by `apply_lora` (same names)."""
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(path, "adapter weights are missing", expected=ADAPTER_WEIGHTS)
    ours = {name: p for name, p in model.named_parameters() if p.requires_grad}
    by_peft_name = {_peft_name(name, hf_names): name for name in ours}
    tensors = load_file(str(path))
    for peft_name in sorted(tensors.keys() ^ by_peft_name.keys()):
        problem = "unexpected adapter tensor" if peft_name in tensors else "missing adapter tensor"
        raise CheckpointError(path, problem, field=peft_name)
    with torch.no_grad():
        for peft_name, tensor in tensors.items():
            target = ours[by_peft_name[peft_name]]
            if target.shape != tensor.shape:
                raise CheckpointError(path, "adapter tensor has the wrong shape", field=peft_name,
                                      expected=tuple(target.shape), found=tuple(tensor.shape))
            target.copy_(tensor)


def attach_adapter(model: nn.Module, directory: str | Path, hf_names: Mapping[str, str] | None = None) -> None:
    """Wrap `model` as the adapter in `directory` describes (its adapter_config.json: r, lora_alpha,
    target_modules, modules_to_save) and load the adapter's tensors; the model stays unmerged and frozen.
    `hf_names` (from `hf_module_names`, taken before wrapping) maps our module names to the file's."""
    file = Path(directory) / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
        rank, alpha, targets = int(config["r"]), float(config["lora_alpha"]), config["target_modules"]
    except FileNotFoundError:
        raise CheckpointError(file, "adapter config is missing", expected=ADAPTER_CONFIG) from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(file, f"not a LoRA adapter config ({e})", expected="r, lora_alpha, target_modules")
    reverse = {theirs: ours for ours, theirs in (hf_names or {}).items()}
    to_save = [reverse.get(m, m) for m in config.get("modules_to_save") or []]
    apply_lora(model, rank, alpha, 0.0, targets, to_save)
    load_adapter(model, directory, hf_names)
    model.requires_grad_(False)


@contextlib.contextmanager
def without_adapters(model: nn.Module) -> Iterator[list[tuple[str, LoRALinear]]]:
    """Put the base layers back in place of the adapters for the duration (to read or write the base weights
    under their own names); yields the (name, adapter) pairs taken out, and restores them afterwards."""
    adapters = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, module in adapters:
        _set_module(model, name, module.base)
    try:
        yield adapters
    finally:
        for name, module in adapters:
            _set_module(model, name, module)


def hf_module_names(model: nn.Module) -> dict[str, str]:
    """Our module name -> the checkpoint's, for models with `hf_tensors()` (its keys follow state_dict order);
    empty for other models. Call it before `apply_lora`, which renames the wrapped weights."""
    if not hasattr(model, "hf_tensors"):
        return {}
    ours_names, their_names = list(model.state_dict()), list(model.hf_tensors())
    if len(ours_names) != len(their_names):  # not one name per tensor: no safe pairing
        return {}
    names = {}
    for ours, theirs in zip(ours_names, their_names, strict=True):
        module, _, leaf = ours.rpartition(".")
        their_module, _, their_leaf = theirs.rpartition(".")
        if leaf == their_leaf:
            names[module] = their_module
    return names


# ---- names --------------------------------------------------------------------------------------------------------

def _peft_name(param: str, hf_names: Mapping[str, str] | None) -> str:
    """PEFT's key: layers.0.q_proj.lora_A -> base_model.model.<hf module>.lora_A.weight."""
    module, _, leaf = param.rpartition(".")
    if leaf in ("lora_A", "lora_B"):
        return f"{PEFT_PREFIX}{_hf_module(module, hf_names)}.{leaf}.weight"
    return f"{PEFT_PREFIX}{_hf_module(module, hf_names)}.{leaf}"


def _hf_module(name: str, hf_names: Mapping[str, str] | None) -> str:
    return (hf_names or {}).get(name, name)


def _within(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
    model.__dict__.pop(ADAPTERS_FOUND, None)  # adapters came or went: `set_canvas_pass` looks them up again
    forget_bound_layers(model)
