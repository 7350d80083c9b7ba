"""A tiny random grid diffusion model (the shape of the bundled Sudoku model) for the solver's tests."""

from __future__ import annotations

import pytest
import torch

from canvaslm.models import llama
from canvaslm.sudoku import board as sudoku

CONFIG = {"model_type": "llama", "vocab_size": 14, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
          "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "canvas_length": 81, "canvas_grid": [9, 9, 3, 3],
          "canvas_grid_attention": True, "mask_token_id": 13}


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    model = llama.Model(llama.Config.from_hf(CONFIG, "test")).to_diffusion(81).eval()
    torch.nn.init.normal_(model.canvas_grid.relation_bias, std=1.0)
    return model


def decode(network, canvas: torch.Tensor, self_conditioning=None) -> torch.Tensor:
    """The network's logits for canvases [B, 81] after `<bos>`."""
    cache = network.new_cache(canvas.shape[0])
    network.encode(torch.full((canvas.shape[0], 1), sudoku.BOS), cache, torch.ones(canvas.shape[0], 1, dtype=bool))
    return network.decode(canvas, cache, self_conditioning)
