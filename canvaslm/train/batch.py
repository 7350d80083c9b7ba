"""Training batches for block diffusion: left-padded prompts, then responses cut into whole canvases.

Layout of one row (P = longest prompt, C = canvas length, K = most canvases of any row, R = K * C):

    [pad … pad prompt][response … EOS EOS][pad canvas]…     length P + R
     not valid         valid, supervised   not valid

Every response ends with at least one EOS, filled up to its canvas boundary, so the model learns to close a
canvas with EOS (a response that exactly fills its canvases gets one more canvas of EOS, which is what
inference must produce to stop). Prompts are left-padded like inference's, so every row's response starts at
position P and canvas b covers positions P + b*C … P + (b+1)*C - 1 in all rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from canvaslm.errors import TrainingError


@dataclass
class DiffusionBatch:
    input_ids: Tensor    # [B, P + R] clean sequence: left-padded prompt, response + EOS fill, pad canvases
    valid: Tensor        # [B, P + R] bool: real tokens (prompt, response, EOS fill)
    prompt_length: int   # P, shared by all rows
    supervised: Tensor   # [B, R] bool: response + EOS fill (the positions the losses score)

    @property
    def response_length(self) -> int:
        """R = K * C, the width of the canvas region."""
        return self.supervised.shape[1]

    def to(self, device: torch.device | str) -> DiffusionBatch:
        return dataclasses.replace(self, input_ids=self.input_ids.to(device), valid=self.valid.to(device),
                                   supervised=self.supervised.to(device))


def collate(examples: Sequence[tuple[Sequence[int], Sequence[int]]], canvas_length: int, eos_token_id: int,
            pad_token_id: int, max_canvases: int | None = None) -> DiffusionBatch:
    """Batch (prompt ids, response ids) pairs.

    A response is followed by EOS up to the end of its last canvas (an empty response is one canvas of EOS).
    A response that does not fit in `max_canvases` canvases together with its EOS is cut to exactly
    `max_canvases * canvas_length` tokens and gets no EOS: it was not finished."""
    if not examples:
        raise TrainingError("collate needs at least one (prompt, response) example, got none")
    if canvas_length < 1:
        raise TrainingError(f"canvas_length must be >= 1, got {canvas_length}")
    if max_canvases is not None and max_canvases < 1:
        raise TrainingError(f"max_canvases must be >= 1 or None, got {max_canvases}")
    responses = [_fill_canvases(list(response), canvas_length, eos_token_id, max_canvases)
                 for _, response in examples]
    prompt_length = max(len(prompt) for prompt, _ in examples)
    response_length = max(len(r) for r in responses)
    ids, valid = [], []
    for (prompt, _), response in zip(examples, responses):
        left, right = prompt_length - len(prompt), response_length - len(response)
        ids.append([pad_token_id] * left + list(prompt) + response + [pad_token_id] * right)
        valid.append([False] * left + [True] * (len(prompt) + len(response)) + [False] * right)
    valid_tensor = torch.tensor(valid, dtype=torch.bool)
    return DiffusionBatch(input_ids=torch.tensor(ids, dtype=torch.long), valid=valid_tensor,
                          prompt_length=prompt_length, supervised=valid_tensor[:, prompt_length:].clone())


def _fill_canvases(response: list[int], canvas_length: int, eos_token_id: int, max_canvases: int | None) -> list[int]:
    """The response, then EOS up to its canvas boundary (at least one EOS), or cut when it does not fit."""
    canvases = len(response) // canvas_length + 1  # room for at least one EOS
    if max_canvases is not None and canvases > max_canvases:
        return response[:max_canvases * canvas_length]
    return response + [eos_token_id] * (canvases * canvas_length - len(response))
