"""Model architectures, one module each, and the table that maps a config.json `model_type` to its module.

Every architecture module exposes `Config` (a dataclass with `from_hf(dict, path)` / `to_hf()`) and `Model`
(an nn.Module with `load_hf_tensors(tensors, path)` / `hf_tensors()`). Diffusion-capable models implement
`new_cache`, `encode` and `decode`; autoregressive ones implement `new_cache` and `forward`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor, nn

# model_type in config.json -> module implementing it
ARCHITECTURES: dict[str, str] = {
    "diffusion_gemma": "canvaslm.models.diffusion_gemma",
    "llama": "canvaslm.models.llama",
    "qwen2": "canvaslm.models.llama",
    "mistral": "canvaslm.models.llama",
}


def architecture(model_type: str) -> ModuleType | None:
    """The module for `model_type`, or None when canvaslm does not know it."""
    name = ARCHITECTURES.get(model_type)
    return None if name is None else importlib.import_module(name)


# Random init on the meta device (a model built to take a checkpoint's weights) is skipped: `normal_` and `randn`
# on meta run Python decompositions whose first call imports torch._dynamo, 2.5 of the 5.9 s
# `canvaslm.load("smol")` took on a 2-core AMD EPYC.
def _on_meta() -> bool:
    return torch.get_default_device().type == "meta"


def embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """nn.Embedding(num_embeddings, dim), without its random init on the meta device."""
    if _on_meta():
        return nn.Embedding(num_embeddings, dim, _weight=torch.empty(num_embeddings, dim))
    return nn.Embedding(num_embeddings, dim)


def normal(*shape: int, std: float) -> Tensor:
    """torch.randn(*shape) * std, or an uninitialized tensor on the meta device."""
    return torch.empty(*shape) if _on_meta() else torch.randn(*shape) * std
