"""Attention masks of the block-diffusion training forward (one encoder pass, one decoder pass).

The decoder pass denoises all K canvases of a batch at once. Its queries are the R = K*C noised canvas
positions; its keys are [encoder keys of the whole clean sequence (S = P + R) ; the noised canvas keys (R)].
Query q in canvas b may see exactly what inference shows it when canvas b is decoded after encoding the prompt
and canvases 0 … b-1 (docs/training.md draws it):

    encoder key k   iff valid and k < P + b*C     (prompt, canvases strictly before b; `<=` would leak b's
                                                   clean tokens into its own denoising)
                    and, on a sliding layer of window W, k >= P + b*C - W + 1 (the cache keeps W - 1 keys)
    canvas key j    iff valid and j is in canvas b (bidirectional inside the canvas, never windowed)

Padded queries keep their own diagonal so that no softmax row is empty. Masks are boolean, True = may attend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from canvaslm.errors import TrainingError
from canvaslm.models.cache import KVCache, encoder_mask


def causal_mask(valid: Tensor, window: int | None) -> Tensor:
    """Causal (and windowed) mask [B, 1, S, S] of the encoder pass over a whole sequence, valid [B, S].

    The same mask inference's encoder uses for a first chunk (an empty cache), so both compute the same keys."""
    return encoder_mask(KVCache([window], valid.shape[0], valid.device), 0, valid.bool())


def block_diffusion_mask(valid: Tensor, prompt_length: int, canvas_length: int, window: int | None) -> Tensor:
    """Decoder mask [B, 1, R, S + R] for queries = the R noised canvas positions, keys = [clean S ; canvas R].

    valid [B, S] marks real tokens of the clean sequence (S = prompt_length + R, R a multiple of
    canvas_length); `window` is the layer's sliding window (None for full attention)."""
    if valid.dim() != 2:
        raise TrainingError(f"valid must be [batch, sequence], got shape {tuple(valid.shape)}")
    seq = valid.shape[1]
    response = seq - prompt_length
    if not 0 <= prompt_length <= seq or response % canvas_length:
        raise TrainingError(f"a sequence of {seq} positions with a prompt of {prompt_length} does not end in "
                            f"whole canvases of {canvas_length}")
    valid = valid.bool()
    q = torch.arange(response, device=valid.device)
    block_start = prompt_length + q // canvas_length * canvas_length  # [R] first position of q's canvas
    k = torch.arange(seq, device=valid.device)
    encoder = k[None, :] < block_start[:, None]                        # [R, S] strictly earlier: no leak
    if window is not None:
        encoder &= k[None, :] > block_start[:, None] - window
    canvas = (q[:, None] // canvas_length) == (q[None, :] // canvas_length)  # [R, R] same canvas
    key_valid = torch.cat([valid, valid[:, prompt_length:]], dim=1)          # [B, S + R]
    mask = torch.cat([encoder, canvas], dim=1)[None] & key_valid[:, None, :]
    diagonal = F.pad(torch.eye(response, dtype=torch.bool, device=valid.device), (seq, 0))
    return (mask | diagonal[None])[:, None]


def check_training_inputs(input_ids: Tensor, noised: Tensor, prompt_length: int) -> tuple[int, int]:
    """(B, S) of a training forward's clean sequence [B, S], after checking that `noised` holds [k * B, S - P]:
    k corrupted copies of the batch (copy j = rows j * B .. (j + 1) * B - 1), all reading one encoder pass."""
    batch, seq = input_ids.shape
    rows, width = noised.shape
    if width != seq - prompt_length or rows % batch or not rows:
        raise TrainingError(f"noised canvases must be [k * {batch}, {seq - prompt_length}] (k copies of the "
                            f"sequence after the prompt of {prompt_length}), got {list(noised.shape)}")
    return batch, seq
