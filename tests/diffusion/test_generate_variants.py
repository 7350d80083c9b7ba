"""Sampling for models trained with the shift trick or with absorbing (mask) noise, on a stub model whose
predictions are known: canvas token i must come from output i - 1 (token 0 from the last encoded position),
and a masked model must start from, and re-noise to, its mask token."""

from __future__ import annotations

import torch

from canvaslm.diffusion.generate import DenoisingStep, generate, generate_steps
from canvaslm.diffusion.sampling import DiffusionSampling
from canvaslm.models.cache import KVCache

VOCAB, CANVAS = 12, 4


class Stub(torch.nn.Module):
    """Decoder output i favours token i + 3; the encoder's last position is certain of token 9."""

    def __init__(self, shift: bool = False, mask_token_id: int | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.canvas_length, self.vocab_size = CANVAS, VOCAB
        self.canvas_shift, self.mask_token_id = shift, mask_token_id
        self.seen: list[torch.Tensor] = []

    def new_cache(self, batch_size, device=None):
        return KVCache([None], batch_size, device or "cpu")

    def encode(self, input_ids, cache, valid):
        cache.commit(valid)
        return torch.zeros(*input_ids.shape, 1)

    def logits(self, hidden):
        return 50.0 * torch.nn.functional.one_hot(torch.full(hidden.shape[:2], 9), VOCAB).float()

    def decode(self, canvas, cache, self_conditioning_logits):
        self.seen.append(canvas.clone())
        targets = (torch.arange(CANVAS) + 3).expand(canvas.shape[0], -1)
        return 5.0 * torch.nn.functional.one_hot(targets, VOCAB).float()  # confident, not certain


def run(model):
    return generate(model, torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.bool), CANVAS,
                    DiffusionSampling(), [], None, torch.Generator().manual_seed(0))


def test_unshifted_model_writes_its_outputs_in_place():
    assert run(Stub()).sequences[0, 2:].tolist() == [3, 4, 5, 6]


def test_shifted_model_reads_token_i_from_output_i_minus_1():
    assert run(Stub(shift=True)).sequences[0, 2:].tolist() == [9, 3, 4, 5]


def test_masked_model_starts_from_and_renoises_to_the_mask_token():
    model = Stub(mask_token_id=11)
    events = list(generate_steps(model, torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.bool), CANVAS,
                                 DiffusionSampling(entropy_bound=1e-9), [], None, torch.Generator().manual_seed(0)))
    assert model.seen[0].tolist() == [[11, 11, 11, 11]]
    # one token accepted per step (a tiny bound), the rest re-masked, accepted ones carried over
    assert (model.seen[1] == 11).sum() == 3
    assert events[-1].sequences[0, 2:].tolist() == [3, 4, 5, 6]
    assert any(isinstance(e, DenoisingStep) for e in events)
