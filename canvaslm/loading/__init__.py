"""Loading: a registered name, an asset folder, an HF-layout directory or a .gguf file -> `LM`.

Orchestration above the engine and the file formats: `registry` says where a name's files are, `assets` builds a
shipped delta into a full model once, `files` reads a model from disk."""

from __future__ import annotations

from pathlib import Path

import torch

from canvaslm.engine.lm import LM
from canvaslm.errors import CheckpointError
from canvaslm.loading import assets, registry
from canvaslm.loading.files import load_path


def load(source: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LM:
    """Load a model from an HF-layout directory, a .gguf file, an asset folder (a delta on a registered base,
    built once into the cache dir) or a registered name (`smol-ar`, `smol`)."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype if dtype is not None else torch.bfloat16 if device.type == "cuda" else torch.float32
    path = registry.resolve(str(source)) or Path(source)
    if assets.is_asset(path):
        path = assets.materialize(path, registry.cache_dir())
    if not path.exists():
        raise CheckpointError(source, "not found: expected an HF-layout directory, a .gguf file, an asset folder "
                              f"or one of the registered names {sorted(registry.NAMES)}")
    return load_path(path, device, dtype, str(source))
