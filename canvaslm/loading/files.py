"""A model from files on disk: an HF-layout directory or a .gguf file -> `LM`. Names and assets are `load`'s."""

from __future__ import annotations

from pathlib import Path

import torch

from canvaslm.checkpoints import hf
from canvaslm.checkpoints.tokenizer import Tokenizer
from canvaslm.engine.lm import LM
from canvaslm.errors import CheckpointError


def load_path(path: Path, device: torch.device, dtype: torch.dtype, source: str | None = None) -> LM:
    """The model in `path` (a .gguf file or an HF-layout directory); `source` is the name it was asked by."""
    source = str(path) if source is None else source
    if path.suffix == ".gguf" and path.is_file():
        return _load_gguf(path, device, dtype, source)
    if path.is_dir():
        _, network = hf.load_model(path, device=device, dtype=dtype)
        tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
        return LM(network, tokenizer, source, hf.load_generation_config(path))
    raise CheckpointError(source, "not found: expected an HF-layout directory, a .gguf file, an asset folder or a "
                          "registered name (canvaslm models lists them)")


def _load_gguf(path: Path, device: torch.device, dtype: torch.dtype, source: str) -> LM:
    from canvaslm.checkpoints.gguf import load_gguf
    from canvaslm.models import llama

    checkpoint = load_gguf(path)
    config = llama.Config.from_hf(checkpoint.config, path)
    with torch.device("meta"):
        network = llama.Model(config)
    tensors = {k: t.to(device=device, dtype=dtype) for k, t in checkpoint.tensors.items()}
    network.load_hf_tensors(tensors, path)
    return LM(network.eval(), checkpoint.tokenizer, source)
