"""Model architectures, one module each, and the table that maps a config.json `model_type` to its module.

Every architecture module exposes `Config` (a dataclass with `from_hf(dict, path)` / `to_hf()`) and `Model`
(an nn.Module with `load_hf_tensors(tensors, path)` / `hf_tensors()`). Diffusion-capable models implement
`new_cache`, `encode` and `decode`; autoregressive ones implement `new_cache` and `forward`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

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
