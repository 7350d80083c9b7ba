"""Sampling for models trained with the shift trick or with absorbing (mask) noise, on a stub model whose
predictions are known: canvas token i must come from output i - 1 (token 0 from the last encoded position),
and a masked model must start from, and re-noise to, its mask token."""

from __future__ import annotations

import pytest
import torch

from canvaslm.diffusion.generate import DenoisingStep, generate, generate_steps
from canvaslm.diffusion.sampling import DiffusionSampling
from canvaslm.diffusion.step import Constraint
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
    # the 4th pass unmasks the last position and the canvas stops there: no 5th pass to confirm it
    assert len(model.seen) == CANVAS and events[-1].forward_passes.tolist() == [CANVAS]


def test_a_masked_canvas_commits_the_tokens_it_sampled_not_their_argmax():
    """Accepted tokens are draws: with a flat enough distribution a draw differs from the argmax (token i + 3),
    and the committed canvas holds the draws, as the next pass would have carried them over."""
    model = Stub(mask_token_id=11)
    settings = DiffusionSampling(entropy_bound=1e9, t_min=2.0, t_max=2.5)  # all accepted at once, hot
    sequences = {tuple(generate(model, torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.bool), CANVAS, settings,
                                [], None, torch.Generator().manual_seed(seed)).sequences[0, 2:].tolist())
                 for seed in range(8)}
    assert len(model.seen) == 8  # one pass per canvas
    assert len(sequences) > 1 and any(s != (3, 4, 5, 6) for s in sequences)


@pytest.mark.parametrize("acceptance", ["entropy_bound", "top_k"])
def test_fixed_tokens_sit_in_every_canvas_step_and_the_result(acceptance):
    model = Stub(mask_token_id=11)
    # position 1 of canvas 0 and position 0 of canvas 1 are fixed; the rest is free (-1)
    fixed = torch.tensor([[-1, 8, -1, -1, 7]])
    settings = DiffusionSampling(acceptance=acceptance, accept_k=1, entropy_bound=1e-9)
    events = list(generate_steps(model, torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.bool), 2 * CANVAS,
                                 settings, [], None, torch.Generator().manual_seed(0), Constraint(fixed)))
    assert model.seen[0].tolist() == [[11, 8, 11, 11]]  # written into the new canvas before the first pass
    assert all(canvas[0, 1] == 8 for canvas in model.seen[:3])
    steps = [e for e in events if isinstance(e, DenoisingStep)]
    assert all(bool(e.accepted[0, 1]) for e in steps if e.canvas == 0)
    assert events[-1].sequences[0, 2:].tolist() == [3, 8, 5, 6, 7, 4, 5, 6]


def test_a_canvas_with_nothing_free_costs_no_decoder_pass():
    """An infill whose suffix fills the second canvas and part of the third: only the first is denoised; the
    suffix is committed as given (positions past max_new_tokens are not generated)."""
    model = Stub()
    fixed = torch.tensor([[-1, -1, 9, 9, 7, 8, 7, 8, 6, 6]])
    events = list(generate_steps(model, torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.bool), 10,
                                 DiffusionSampling(), [], None, torch.Generator().manual_seed(0), Constraint(fixed)))
    result = events[-1]
    assert {e.canvas for e in events if isinstance(e, DenoisingStep)} == {0}
    assert int(result.forward_passes[0]) == len(model.seen)
    assert result.sequences[0, 4:12].tolist() == [9, 9, 7, 8, 7, 8, 6, 6]


def test_without_fixed_tokens_the_loop_is_unchanged():
    torch.manual_seed(0)
    free = torch.full((1, CANVAS), -1)
    plain, pinned_nowhere = run(Stub()), generate(
        Stub(), torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.bool), CANVAS, DiffusionSampling(), [], None,
        torch.Generator().manual_seed(0), Constraint(free))
    assert torch.equal(plain.sequences, pinned_nowhere.sequences)


class Counting(torch.nn.Module):
    """Wraps a network and records how many rows each decoder pass processed."""

    def __init__(self, network) -> None:
        super().__init__()
        self.network, self.rows = network, []
        self.canvas_length, self.vocab_size = network.canvas_length, network.vocab_size

    def new_cache(self, *args, **kwargs):
        return self.network.new_cache(*args, **kwargs)

    def encode(self, *args):
        return self.network.encode(*args)

    def logits(self, hidden):
        return self.network.logits(hidden)

    def decode(self, canvas, cache, sc):
        self.rows.append(canvas.shape[0])
        return self.network.decode(canvas, cache, sc)


def test_skipping_finished_rows_keeps_the_tokens_and_saves_decoder_rows(tmp_path):
    import canvaslm
    from tests.reference import tiny_checkpoint

    tiny_checkpoint(tmp_path)
    network = canvaslm.load(tmp_path, device="cpu").network
    canvas = network.canvas_length
    ids = torch.randint(3, network.vocab_size, (4, 6), generator=torch.Generator().manual_seed(0))
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, :3] = False
    # rows stop once their mean entropy is under 0.5 nats (no stability needed): at different steps
    settings = DiffusionSampling(confidence_threshold=0.5, stability_threshold=0, max_denoising_steps=12)
    runs = {}
    for skip in (False, True):
        model = Counting(network)
        with torch.inference_mode():
            out = generate(model, ids, valid, canvas, settings, [], 0, torch.Generator().manual_seed(5),
                           skip_finished=skip)
        runs[skip] = (out, model.rows)
    (exact, exact_rows), (fast, fast_rows) = runs[False], runs[True]
    assert torch.equal(exact.sequences, fast.sequences)
    assert torch.equal(exact.forward_passes, fast.forward_passes)
    assert len(set(exact.forward_passes.tolist())) > 1            # rows did stop at different steps
    assert sum(fast_rows) == int(fast.forward_passes.sum()) < sum(exact_rows)


def _left_to_right(**overrides) -> DiffusionSampling:
    """The shipped default's rule, asking more (0.99) than the stub's outputs give at temperature ~1 (0.93): one
    token kept a pass."""
    return DiffusionSampling(order="left_to_right", acceptance="threshold", accept_probability=0.99,
                             max_denoising_steps=CANVAS, sampler="greedy", t_max=1.0, t_min=0.99, **overrides)


def test_the_first_token_from_the_causal_pass_saves_a_decoder_pass_per_canvas_and_the_first_pass_sees_it():
    """`first_token = "causal"`: each canvas's first token is the one the first decoder pass would read from the
    last encoded position anyway (token 9), drawn without that pass; the pass that follows sees it instead of a mask,
    and each canvas costs one decoder pass fewer for the same tokens."""
    written = {}
    for first in ("decoder", "causal"):
        model = Stub(shift=True, mask_token_id=11)
        result = generate(model, torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.bool), 2 * CANVAS,
                          _left_to_right(first_token=first), [], None, torch.Generator().manual_seed(0))
        written[first] = result.sequences[0, 2:].tolist()
        passes = CANVAS if first == "decoder" else CANVAS - 1  # one token kept a pass
        assert int(result.forward_passes[0]) == len(model.seen) == 2 * passes
        assert model.seen[0][0].tolist() == ([11] * CANVAS if first == "decoder" else [9] + [11] * (CANVAS - 1))
    assert written["decoder"] == written["causal"] == [9, 3, 4, 5] * 2


def test_the_first_token_stays_with_the_decoder_where_the_causal_pass_cannot_give_it():
    """No shift (the first output is the canvas's own), no mask, a pinned first position or a one-step budget: the
    loop runs as without the setting."""
    prompt, valid = torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.bool)
    for model_args, settings, constraint in [
            (dict(mask_token_id=11), {}, None),                       # unshifted
            (dict(shift=True), {}, None),                             # uniform noise, no mask
            (dict(shift=True, mask_token_id=11), {}, Constraint(torch.tensor([[7, -1, -1, -1]]))),
            (dict(shift=True, mask_token_id=11), dict(max_denoising_steps=1), None)]:
        runs = []
        for first in ("decoder", "causal"):
            model = Stub(**model_args)
            result = generate(model, prompt, valid, CANVAS, _left_to_right(first_token=first).replace(**settings),
                              [], None, torch.Generator().manual_seed(0), constraint)
            runs.append((result.sequences.tolist(), int(result.forward_passes[0]), [s.tolist() for s in model.seen]))
        assert runs[0] == runs[1], model_args
