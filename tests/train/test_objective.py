"""Training batches and the block-diffusion loss: hand-computed values on a stub model, then real tiny models."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from canvaslm.errors import TrainingError
from canvaslm.train.batch import DiffusionBatch, collate
from canvaslm.train.objective import ObjectiveOptions, accuracy_at_noise, block_diffusion_loss, corrupt, udlm_nelbo
from tests.models.test_masks import tiny_gemma, tiny_llama

EOS, PAD = 1, 0


class Stub:
    """A 'model' returning chosen logits and recording every call it gets."""

    def __init__(self, encoder_logits: torch.Tensor, canvas_logits: torch.Tensor, canvas_length: int) -> None:
        self.vocab_size, self.canvas_length = canvas_logits.shape[-1], canvas_length
        self.encoder_logits = encoder_logits.clone().requires_grad_()
        self.canvas_logits = canvas_logits.clone().requires_grad_()
        self.calls: list[dict] = []

    def forward_block_diffusion(self, input_ids, valid, prompt_length, noised, self_conditioning_logits,
                                self_conditioning_rows=None, hidden_states=False):
        self.calls.append(dict(input_ids=input_ids.clone(), noised=noised.clone(), sc=self_conditioning_logits,
                               rows=self_conditioning_rows, grad=torch.is_grad_enabled()))
        copies = noised.shape[0] // self.canvas_logits.shape[0]  # complementary copies of each row
        return self.encoder_logits, self.canvas_logits.repeat(copies, 1, 1)  # "hidden states" = the logits

    def logits(self, hidden):
        return hidden


# -- collate ------------------------------------------------------------------------------------------------------

def test_collate_left_pads_prompts_and_fills_canvases_with_eos():
    batch = collate([([5, 6], [7, 8, 9, 10]),      # 4 tokens + EOS fill -> 2 canvases of 3
                     ([4], []),                    # empty response -> one canvas of EOS, then a pad canvas
                     ([3, 3, 3], [9] * 7)],        # too long for 2 canvases: cut to 6, no EOS
                    canvas_length=3, eos_token_id=EOS, pad_token_id=PAD, max_canvases=2)
    assert batch.prompt_length == 3 and batch.response_length == 6
    assert batch.input_ids.tolist() == [[PAD, 5, 6, 7, 8, 9, 10, EOS, EOS],
                                        [PAD, PAD, 4, EOS, EOS, EOS, PAD, PAD, PAD],
                                        [3, 3, 3, 9, 9, 9, 9, 9, 9]]
    assert batch.valid.int().tolist() == [[0, 1, 1, 1, 1, 1, 1, 1, 1],
                                          [0, 0, 1, 1, 1, 1, 0, 0, 0],
                                          [1, 1, 1, 1, 1, 1, 1, 1, 1]]
    assert torch.equal(batch.supervised, batch.valid[:, 3:])  # EOS fill supervised, pad canvases not


def test_a_response_that_fills_its_canvases_gets_a_canvas_of_eos():
    batch = collate([([2], [7, 8, 9])], canvas_length=3, eos_token_id=EOS, pad_token_id=PAD)
    assert batch.input_ids.tolist() == [[2, 7, 8, 9, EOS, EOS, EOS]]  # inference stops only on an EOS


def test_collate_refuses_bad_input():
    with pytest.raises(TrainingError, match="at least one"):
        collate([], canvas_length=4, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(TrainingError, match="canvas_length"):
        collate([([1], [2])], canvas_length=0, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(TrainingError, match="max_canvases"):
        collate([([1], [2])], canvas_length=4, eos_token_id=EOS, pad_token_id=PAD, max_canvases=0)


# -- the loss on hand-made logits ---------------------------------------------------------------------------------

def hand_batch() -> DiffusionBatch:
    """Vocabulary 4, canvases of 2: row 0 = prompt [2, 3], response [3, 2, 3] + EOS; row 1 = prompt [3], empty
    response (a canvas of EOS) and a pad canvas. 6 supervised positions; AR pairs: 5 in row 0, 2 in row 1."""
    return collate([([2, 3], [3, 2, 3]), ([3], [])], canvas_length=2, eos_token_id=EOS, pad_token_id=PAD)


def test_flat_loss_is_the_mean_cross_entropy_of_all_supervised_positions():
    batch = hand_batch()
    assert batch.input_ids.tolist() == [[2, 3, 3, 2, 3, EOS], [PAD, 3, EOS, EOS, PAD, PAD]]
    canvas = torch.zeros(2, 4, 4)
    canvas[0, 0, 3] = math.log(3)      # target 3 gets p = 3/6: CE = ln 2; every other position: uniform, ln 4
    canvas[1, 2:, 2] = 100.0           # the pad canvas: wildly wrong, and never scored
    encoder = torch.zeros(2, 6, 4)
    encoder[0, 0, 3] = math.log(3)     # predicts position 1 (token 3): ln 2
    encoder[1, 0, 2] = 100.0           # a pad position: not a pair, never scored
    stub = Stub(encoder, canvas, canvas_length=2)
    options = ObjectiveOptions(self_conditioning_p=0.0, ar_weight=0.5)
    loss, metrics = block_diffusion_loss(stub, batch, options, torch.Generator().manual_seed(0))
    flat, ar = (math.log(2) + 5 * math.log(4)) / 6, (math.log(2) + 6 * math.log(4)) / 7
    assert metrics["diffusion_loss"] == pytest.approx(flat, abs=1e-6)
    assert metrics["ar_loss"] == pytest.approx(ar, abs=1e-6)
    assert loss.item() == pytest.approx(flat + 0.5 * ar, abs=1e-6) == metrics["loss"]
    assert metrics["token_accuracy"] == pytest.approx(1 / 6)  # argmax 3 at row 0 position 0; elsewhere argmax 0
    assert 1e-3 <= metrics["mean_t"] <= 1
    assert len(stub.calls) == 1 and stub.calls[0]["sc"] is None and stub.calls[0]["grad"]
    loss.backward()
    assert stub.canvas_logits.grad[1, 2:].abs().sum() == 0 and stub.canvas_logits.grad[0, 0].abs().sum() > 0


def test_corruption_touches_only_supervised_canvas_tokens_and_the_encoder_sees_the_clean_sequence():
    batch = hand_batch()
    stub = Stub(torch.zeros(2, 6, 4), torch.zeros(2, 4, 4), canvas_length=2)
    options = ObjectiveOptions(self_conditioning_p=0.0, t_min=0.999)  # nearly every supervised token redrawn
    block_diffusion_loss(stub, batch, options, torch.Generator().manual_seed(1))
    call = stub.calls[0]
    assert torch.equal(call["input_ids"], batch.input_ids)  # prompt and clean response, uncorrupted
    clean = batch.input_ids[:, batch.prompt_length:]
    assert torch.equal(call["noised"][~batch.supervised], clean[~batch.supervised])  # pad canvas untouched
    assert not torch.equal(call["noised"], clean)


def test_noise_level_zero_leaves_the_canvases_clean_and_one_masks_every_supervised_token():
    batch = hand_batch()
    clean = batch.input_ids[:, batch.prompt_length:]
    stub = Stub(torch.zeros(2, 6, 5), torch.zeros(2, 4, 5), canvas_length=2)
    assert accuracy_at_noise(stub, batch, 0.0, torch.Generator().manual_seed(0)) == pytest.approx(0.0)
    assert torch.equal(stub.calls[-1]["noised"], clean)
    masked = ObjectiveOptions(kind="masked", mask_token_id=4)
    accuracy_at_noise(stub, batch, 1.0, torch.Generator().manual_seed(0), masked)
    assert torch.equal(stub.calls[-1]["noised"], torch.where(batch.supervised, 4, clean))
    noised, replaced = corrupt(clean, batch.supervised, torch.zeros(clean.shape), 5, None, None)
    assert torch.equal(noised, clean) and not replaced.any()


def test_masked_loss_scores_masked_positions_weighted_by_one_over_t():
    batch = collate([([2, 3], [2, 3, 2, 3, 2, 3, 2])], canvas_length=8, eos_token_id=EOS, pad_token_id=PAD)
    stub = Stub(torch.zeros(1, 10, 5), torch.zeros(1, 8, 5), canvas_length=8)  # every CE is ln 5
    options = ObjectiveOptions(kind="masked", mask_token_id=4, self_conditioning_p=0.0, ar_weight=0.0)
    loss, metrics = block_diffusion_loss(stub, batch, options, torch.Generator().manual_seed(0))
    masked = int((stub.calls[0]["noised"] == 4).sum())
    assert 0 < masked < 8
    t = metrics["mean_t"]  # one canvas, one noise level
    assert loss.item() == pytest.approx(masked * math.log(5) / t / 8, rel=1e-5)


def test_complementary_copies_corrupt_each_supervised_token_exactly_once():
    batch = collate([([2, 3], [2, 3, 2, 3, 2, 3, 2]), ([3], [2, 2])], canvas_length=4, eos_token_id=EOS,
                    pad_token_id=PAD)
    stub = Stub(torch.zeros(2, 10, 5), torch.zeros(2, 8, 5), canvas_length=4)
    options = ObjectiveOptions(kind="masked", mask_token_id=4, self_conditioning_p=0.0, ar_weight=0.0,
                               complementary=True, full_mask_p=0.5)
    loss, metrics = block_diffusion_loss(stub, batch, options, torch.Generator().manual_seed(0))
    noised = stub.calls[0]["noised"]
    assert stub.calls[0]["input_ids"].shape[0] == 2 and noised.shape[0] == 4  # one encoder pass, two copies
    first, second = noised[:2] == 4, noised[2:] == 4
    assert torch.equal(first ^ second, batch.supervised) and not (first & second).any()
    assert math.isfinite(loss.item()) and loss.item() > 0


def test_masked_kind_needs_a_mask_token_in_the_vocabulary():
    with pytest.raises(TrainingError, match="mask_token_id"):
        ObjectiveOptions(kind="masked")
    stub = Stub(torch.zeros(2, 6, 4), torch.zeros(2, 4, 4), canvas_length=2)
    with pytest.raises(TrainingError, match="not in the vocabulary"):
        block_diffusion_loss(stub, hand_batch(), ObjectiveOptions(kind="masked", mask_token_id=4), None)


@pytest.mark.parametrize("field, value", [("kind", "bd3"), ("t_min", 0.0), ("self_conditioning_p", 1.5),
                                          ("ar_weight", -1.0)])
def test_bad_options_name_the_field(field, value):
    with pytest.raises(TrainingError, match=field):
        ObjectiveOptions(**{field: value})


def test_self_conditioning_runs_a_first_pass_without_gradient_and_feeds_its_logits():
    batch = hand_batch()
    stub = Stub(torch.zeros(2, 6, 4), torch.randn(2, 4, 4), canvas_length=2)
    block_diffusion_loss(stub, batch, ObjectiveOptions(self_conditioning_p=1.0), torch.Generator().manual_seed(0))
    first, second = stub.calls
    assert first["sc"] is None and not first["grad"] and second["grad"]
    assert torch.equal(second["sc"], stub.canvas_logits) and not second["sc"].requires_grad
    assert second["rows"].tolist() == [True, True]
    assert torch.equal(first["noised"], second["noised"])


def test_shift_scores_each_token_with_the_output_one_position_earlier():
    batch = hand_batch()
    ids, prompt = batch.input_ids, batch.prompt_length
    next_token = F.pad(ids[:, 1:], (0, 1), value=PAD)  # a perfect next-token predictor everywhere
    encoder = 10.0 * F.one_hot(next_token, 4).float()
    canvas = encoder[:, prompt:]
    stub = Stub(encoder, canvas, canvas_length=2)
    options = ObjectiveOptions(self_conditioning_p=0.0)
    generator = torch.Generator().manual_seed(0)
    assert accuracy_at_noise(stub, batch, 0.5, generator, ObjectiveOptions(shift=True)) == 1.0
    assert accuracy_at_noise(stub, batch, 0.5, generator, options) < 1.0
    _, metrics = block_diffusion_loss(stub, batch, ObjectiveOptions(shift=True, self_conditioning_p=0.0), generator)
    assert metrics["token_accuracy"] == 1.0 and metrics["diffusion_loss"] < 1e-3


def naive_udlm(logits: torch.Tensor, x: int, z: int, alpha: float, alpha_prime: float) -> float:
    """Research notes §1.3 written out over the vocabulary, in float64."""
    k = logits.shape[-1]
    xbar = k * alpha * F.one_hot(torch.tensor(x), k).double() + (1 - alpha)
    xbar_th = k * alpha * logits.double().softmax(-1) + (1 - alpha)
    total = sum(xbar[j] / xbar[z] * torch.log(xbar[j] * xbar_th[z] / (xbar_th[j] * xbar[z])) for j in range(k))
    return float(alpha_prime / (k * alpha) * (k / xbar[z] - k / xbar_th[z] - total))


def test_udlm_nelbo_matches_the_formula_is_nonnegative_and_vanishes_for_a_perfect_model():
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(2, 6, 7, generator=g)
    clean = torch.randint(0, 7, (2, 6), generator=g)
    noised = torch.where(torch.arange(6) % 2 == 0, (clean + 3) % 7, clean)  # half the tokens replaced
    alpha = 0.01 + 0.98 * torch.rand(2, 6, generator=g)
    alpha_prime = torch.full_like(alpha, -0.999)
    ours = udlm_nelbo(logits, clean, noised, alpha, alpha_prime)
    expected = torch.tensor([[naive_udlm(logits[b, i], int(clean[b, i]), int(noised[b, i]), float(alpha[b, i]),
                                         -0.999) for i in range(6)] for b in range(2)])
    torch.testing.assert_close(ours, expected.float(), atol=1e-5, rtol=1e-5)
    assert (ours >= 0).all()
    perfect = udlm_nelbo(60 * F.one_hot(clean, 7).float(), clean, noised, alpha, alpha_prime)
    assert perfect.abs().max() < 1e-5


def test_udlm_loss_runs_end_to_end():
    stub = Stub(torch.zeros(2, 6, 4), torch.randn(2, 4, 4), canvas_length=2)
    loss, metrics = block_diffusion_loss(stub, hand_batch(), ObjectiveOptions(kind="udlm"),
                                         torch.Generator().manual_seed(0))
    assert math.isfinite(loss.item()) and metrics["diffusion_loss"] >= 0


# -- real tiny models ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["llama", "diffusion_gemma"])
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return tiny_llama() if request.param == "llama" else tiny_gemma()


def test_gradients_reach_the_encoder_pass_through_the_decoder(model):
    """The diffusion loss alone (ar_weight 0) must train the encoder pass too: the decoder reads its keys."""
    batch = collate([([5, 6, 7], [11, 12, 13, 14, 15]), ([4], [8])], canvas_length=4, eos_token_id=EOS,
                    pad_token_id=PAD)
    outputs: list[torch.Tensor] = []

    def record(module, inputs, output):
        if output.requires_grad:  # the passes with gradient: encoder, then decoder
            output.retain_grad()
            outputs.append(output)

    hook = model.layers[0].register_forward_hook(record)
    model.zero_grad()
    try:
        options = ObjectiveOptions(ar_weight=0.0, self_conditioning_p=1.0)
        loss, metrics = block_diffusion_loss(model, batch, options, torch.Generator().manual_seed(0))
        loss.backward()
    finally:
        hook.remove()
    assert set(metrics) == {"loss", "diffusion_loss", "token_accuracy", "mean_t"}  # ar_weight 0: no AR head pass
    encoder_out, decoder_out = outputs
    assert encoder_out.shape[1] == batch.input_ids.shape[1] and decoder_out.shape[1] == batch.response_length
    assert encoder_out.grad.abs().sum() > 0 and decoder_out.grad.abs().sum() > 0
    assert model.self_conditioning.down_proj.weight.grad.abs().sum() > 0  # the second pass was conditioned
    assert 0 <= accuracy_at_noise(model, batch, 0.3, torch.Generator().manual_seed(0)) <= 1


def test_anchored_canvases_keep_their_first_token_and_mask_the_rest():
    """anchor_p trains the canvas as verified decoding drafts in it: the first token known, the others masked."""
    batch = collate([([2, 3], [2, 3, 2, 3, 2, 3, 2, 3]), ([3], [3, 2, 3, 2, 2, 3])], canvas_length=4,
                    eos_token_id=EOS, pad_token_id=PAD)
    clean = batch.input_ids[:, batch.prompt_length:]
    stub = Stub(torch.zeros(2, 14, 5), torch.zeros(2, 12, 5), canvas_length=4)
    options = ObjectiveOptions(kind="masked", mask_token_id=4, self_conditioning_p=0.0, ar_weight=0.0,
                               anchor_p=1.0, complementary=True)
    loss, metrics = block_diffusion_loss(stub, batch, options, torch.Generator().manual_seed(0))
    noised = stub.calls[0]["noised"]
    first = torch.zeros_like(batch.supervised)
    first[:, ::4] = True
    anchored = noised[:2]
    assert torch.equal(anchored[first], clean[first])                       # the anchors stay
    assert bool((anchored[batch.supervised & ~first] == 4).all())           # everything after them is masked
    assert bool((noised[2:][batch.supervised & first] == 4).all())          # the complement scores the anchors
    assert metrics["mean_t"] == pytest.approx(0.5) and math.isfinite(loss.item())  # 3/4 and its complement 1/4
    with pytest.raises(TrainingError, match="anchor_p"):
        ObjectiveOptions(anchor_p=1.5)
    with pytest.raises(TrainingError, match="anchor_p needs"):
        ObjectiveOptions(kind="udlm", anchor_p=0.5)


@pytest.mark.parametrize("kind", ["masked", "flat"])
def test_position_decay_weights_the_k_th_token_after_an_anchor(kind):
    """With one canvas position scored, the decayed loss is exactly exp(-(k - 1) / gamma) / mean weight times the
    plain one (same draws: the weights consume none); the anchor itself keeps weight 1, and a canvas not drawn as
    anchored keeps weight 1 everywhere."""
    torch.manual_seed(0)
    batch = collate([([2, 3], [2, 3, 2, 3, 2, 3, 2, 3]), ([3], [3, 2, 3, 2, 2, 3, 3, 2])], canvas_length=4,
                    eos_token_id=EOS, pad_token_id=PAD)
    stub = Stub(torch.randn(2, 14, 5), torch.randn(2, 12, 5), canvas_length=4)
    options = dict(kind=kind, mask_token_id=4, self_conditioning_p=0.0, ar_weight=0.0, anchor_p=1.0)
    for k in range(4):
        only = dataclasses.replace(batch, supervised=batch.supervised & (torch.arange(12) % 4 == k))
        losses = [block_diffusion_loss(stub, only, ObjectiveOptions(**options, position_decay=gamma),
                                       torch.Generator().manual_seed(1))[0].item() for gamma in (0.0, 2.0)]
        if kind == "masked" and k == 0:
            assert losses == [0.0, 0.0]  # the anchor is never masked, so never scored
        else:
            mean = sum(math.exp(-j / 2.0) for j in range(3)) / 3
            weight = 1.0 if k == 0 else math.exp(-(k - 1) / 2.0) / mean
            assert losses[1] == pytest.approx(weight * losses[0], rel=1e-5)
            assert losses[0] > 0
    if kind == "masked":  # half the canvases anchored: the third token weighs less in those alone
        only = dataclasses.replace(batch, supervised=batch.supervised & (torch.arange(12) % 4 == 3))
        mixed = [block_diffusion_loss(stub, only, ObjectiveOptions(**dict(options, anchor_p=0.5), position_decay=g),
                                      torch.Generator().manual_seed(2))[0].item() for g in (0.0, 2.0)]
        weight = math.exp(-1.0) / (sum(math.exp(-j / 2.0) for j in range(3)) / 3)
        assert weight * mixed[0] < mixed[1] * 0.99 and mixed[1] < mixed[0] * 0.99
    with pytest.raises(TrainingError, match="needs anchor_p > 0"):
        ObjectiveOptions(kind="masked", mask_token_id=4, position_decay=4.0)
    with pytest.raises(TrainingError, match="position_decay must be >= 0"):
        ObjectiveOptions(kind="masked", mask_token_id=4, anchor_p=0.5, position_decay=-1.0)


def test_prefix_canvases_keep_a_clean_prefix_and_mask_everything_after_it():
    """prefix_p trains the canvas as left-to-right decoding sees it: k clean tokens, then masks to the canvas end;
    k varies from canvas to canvas, and the 1/t weight is the share masked."""
    batch = collate([([2, 3], [2, 3, 2, 3, 2, 3, 2, 3] * 4), ([3], [3, 2, 3, 2, 2, 3] * 5)], canvas_length=8,
                    eos_token_id=EOS, pad_token_id=PAD)
    clean = batch.input_ids[:, batch.prompt_length:]
    length = clean.shape[1]
    stub = Stub(torch.zeros(2, batch.input_ids.shape[1], 5), torch.zeros(2, length, 5), canvas_length=8)
    options = ObjectiveOptions(kind="masked", mask_token_id=4, self_conditioning_p=0.0, ar_weight=0.0, prefix_p=1.0)
    loss, metrics = block_diffusion_loss(stub, batch, options, torch.Generator().manual_seed(0))
    noised, supervised = stub.calls[0]["noised"], batch.supervised
    prefixes, shares = [], []
    for row in range(2):
        for block in range(length // 8):
            cells, scored = noised[row, 8 * block:8 * block + 8], supervised[row, 8 * block:8 * block + 8]
            if not bool(scored.any()):
                continue
            masked = (cells == 4) & scored
            k = int((~masked).long().cumprod(dim=0).sum())                        # the clean prefix
            assert not bool((~masked[k:] & scored[k:]).any())                     # nothing clean after it
            assert torch.equal(cells[:k], clean[row, 8 * block:8 * block + k])   # the prefix is the clean text
            prefixes.append(k)
            shares.append((8 - k) / 8)
    assert len(set(prefixes)) > 2 and max(prefixes) < 8                         # k drawn per canvas, never all 8
    assert metrics["mean_t"] == pytest.approx(sum(shares) / len(shares)) and math.isfinite(loss.item())
    with pytest.raises(TrainingError, match="prefix_p must be in"):
        ObjectiveOptions(kind="masked", mask_token_id=4, prefix_p=2.0)
    with pytest.raises(TrainingError, match='prefix_p needs objective kind "masked"'):
        ObjectiveOptions(kind="flat", prefix_p=0.5)
