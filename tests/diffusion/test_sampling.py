"""The sampler's pure functions on hand-made logits, with the expected numbers written beside them."""

import math

import pytest
import torch

from canvaslm.diffusion.sampling import (
    DiffusionSampling,
    entropy,
    entropy_bound_accept,
    renoise,
    stable_and_confident,
    temperature_at,
)
from canvaslm.errors import GenerationError


def test_defaults_match_the_reference_generation_config():
    s = DiffusionSampling()
    assert (s.max_denoising_steps, s.entropy_bound, s.t_min, s.t_max) == (48, 0.1, 0.4, 0.8)
    assert (s.stability_threshold, s.confidence_threshold) == (1, 0.005)


@pytest.mark.parametrize("bad", [dict(max_denoising_steps=0), dict(entropy_bound=0.0), dict(t_min=-1.0),
                                 dict(t_min=0.9), dict(stability_threshold=-1), dict(confidence_threshold=0.0),
                                 dict(max_denoising_steps=2.5)])
def test_out_of_range_settings_are_refused(bad):
    with pytest.raises(GenerationError):
        DiffusionSampling().replace(**bad)


def test_unknown_option_names_the_known_ones():
    with pytest.raises(GenerationError, match="entropy_bound"):
        DiffusionSampling().replace(entropy_bund=0.2)


def test_linear_temperature_schedule():
    s = DiffusionSampling(max_denoising_steps=4)
    assert [round(float(temperature_at(k, s)), 6) for k in (4, 3, 2, 1)] == [0.8, 0.7, 0.6, 0.5]


def test_entropy_of_uniform_and_one_hot():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    h = entropy(logits)
    assert h[0, 0].item() == pytest.approx(math.log(4), abs=1e-6)
    assert h[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_bound_accepts_lowest_entropy_tokens_up_to_the_bound():
    # entropies 0.30, 0.01, 0.05, 0.02: sorted 0.01, 0.02, 0.05, 0.30
    # cumsum - current: 0.00, 0.01, 0.03, 0.08 -> bound 0.02 keeps the two most certain, 0.1 keeps all four
    h = torch.tensor([[0.30, 0.01, 0.05, 0.02]])
    assert entropy_bound_accept(h, 0.02).tolist() == [[False, True, False, True]]
    assert entropy_bound_accept(h, 0.1).tolist() == [[True, True, True, True]]
    # the most certain token is always accepted, even when all are uncertain
    assert entropy_bound_accept(torch.tensor([[5.0, 4.0, 6.0]]), 1e-9).tolist() == [[False, True, False]]


def test_renoise_keeps_accepted_and_redraws_the_rest():
    canvas = torch.full((2, 64), 7)
    accepted = torch.zeros(2, 64, dtype=torch.bool)
    accepted[:, :10] = True
    out = renoise(canvas, accepted, 1000, torch.Generator().manual_seed(0))
    assert (out[:, :10] == 7).all()
    assert (out[:, 10:] != 7).float().mean() > 0.9


def test_stop_needs_both_stability_and_confidence():
    history = torch.full((1, 2, 3), -1)
    argmax = torch.tensor([[1, 2, 3], [4, 5, 6]])
    low = torch.full((2, 3), 1e-4)
    stop, history = stable_and_confident(history, argmax, low, 0.005)
    assert stop.tolist() == [False, False]  # nothing to compare with yet
    stop, history = stable_and_confident(history, torch.tensor([[1, 2, 3], [4, 5, 0]]), low, 0.005)
    assert stop.tolist() == [True, False]  # row 1 changed a token
    high = torch.full((2, 3), 0.5)
    stop, _ = stable_and_confident(history, torch.tensor([[1, 2, 3], [4, 5, 0]]), high, 0.005)
    assert stop.tolist() == [False, False]  # stable but not confident


def test_zero_stability_threshold_means_confidence_alone():
    stop, _ = stable_and_confident(torch.empty(0, 1, 2, dtype=torch.long), torch.tensor([[1, 2]]),
                                   torch.tensor([[1e-4, 1e-4]]), 0.005)
    assert stop.tolist() == [True]


def test_carry_over_keeps_unmasked_tokens_with_certainty():
    from canvaslm.diffusion.sampling import carry_over

    logits = torch.zeros(1, 3, 5)
    canvas = torch.tensor([[4, 2, 4]])  # 4 is the mask token
    out = carry_over(logits, canvas, mask_token_id=4)
    assert torch.equal(out[0, 0], logits[0, 0]) and torch.equal(out[0, 2], logits[0, 2])
    assert out[0, 1].argmax() == 2 and entropy(out)[0, 1] < 1e-6


def test_pinning_writes_what_a_full_certain_canvas_would_and_passes_gradients_to_free_positions():
    from canvaslm.diffusion.sampling import pin

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(2, 5, 11, generator=g) * 4).to(dtype).requires_grad_()
        fixed = torch.tensor([[-1, 3, 0, -1, 10], [7, -1, -1, 7, -1]])
        out = pin(logits, fixed)
        certain = torch.full_like(logits, -1e4).scatter(-1, fixed.clamp(min=0)[..., None], 0.0)
        expected = torch.where((fixed >= 0)[..., None], certain, logits)  # the plain definition
        assert out.dtype == dtype and torch.equal(out, expected)
        (grad,) = torch.autograd.grad((out * torch.arange(11.0).to(dtype)).sum(), logits)
        free = (fixed < 0)[..., None].expand_as(grad)
        assert torch.equal(grad[free], torch.arange(11.0).to(dtype).expand_as(grad)[free]) and (grad[~free] == 0).all()


def test_threshold_rule_keeps_confident_tokens_and_always_the_best():
    from canvaslm.diffusion.sampling import threshold_accept

    probs = torch.tensor([[[0.95, 0.05], [0.6, 0.4], [0.91, 0.09]], [[0.5, 0.5], [0.7, 0.3], [0.6, 0.4]]])
    assert threshold_accept(probs.amax(-1), 0.9).tolist() == [[True, False, True], [False, True, False]]


def test_top_k_rule_keeps_the_k_lowest_entropies():
    from canvaslm.diffusion.sampling import top_k_accept

    h = torch.tensor([[0.3, 0.1, 0.9, 0.2]])
    assert top_k_accept(h, 2).tolist() == [[False, True, False, True]]
    assert top_k_accept(h, 9).all()  # k larger than the canvas keeps everything


def test_top_k_grows_by_k_tokens_per_step():
    from canvaslm.diffusion.sampling import accept

    logits = torch.randn(2, 16, 10, generator=torch.Generator().manual_seed(0))
    settings = DiffusionSampling(acceptance="top_k", accept_k=3)
    assert [int(accept(logits, entropy(logits), settings, step).sum(-1)[0]) for step in (1, 2, 5, 6)] == [3, 6, 15, 16]


def test_factor_rule_accepts_the_longest_prefix_under_the_parallel_decoding_bound():
    from canvaslm.diffusion.sampling import factor_accept

    # sorted top probabilities 0.99, 0.8, 0.7: n=1 needs >= 0.5, n=2 >= 2/3, n=3 >= 0.75 -> the first two
    probs = torch.tensor([[[0.7, 0.3], [0.99, 0.01], [0.8, 0.2]]])
    assert factor_accept(probs.amax(-1), 1.0).tolist() == [[False, True, True]]
    assert factor_accept(probs.amax(-1), 2.0).tolist() == [[True, True, True]]  # slack 2: n=3 needs >= 0.5


@pytest.mark.parametrize("rule", ["entropy_bound", "threshold", "top_k", "adaptive"])
def test_every_rule_accepts_at_least_one_token_per_row(rule):
    from canvaslm.diffusion.sampling import accept

    logits = torch.randn(3, 16, 10, generator=torch.Generator().manual_seed(0))
    settings = DiffusionSampling(acceptance=rule, accept_probability=1.0, accept_k=1, entropy_bound=1e-6)
    kept = accept(logits, entropy(logits), settings)
    assert kept.shape == (3, 16) and bool((kept.sum(-1) >= 1).all())


def test_adaptive_rule_is_a_superset_of_the_entropy_bound_rule():
    from canvaslm.diffusion.sampling import accept

    logits = 4 * torch.randn(4, 32, 50, generator=torch.Generator().manual_seed(1))
    h = entropy(logits)
    eb = accept(logits, h, DiffusionSampling())
    adaptive = accept(logits, h, DiffusionSampling(acceptance="adaptive"))
    assert bool((adaptive | ~eb).all()) and int(adaptive.sum()) >= int(eb.sum())


@pytest.mark.parametrize("bad", [dict(acceptance="greedy"), dict(accept_probability=0.0), dict(accept_k=0),
                                 dict(accept_factor=-1.0)])
def test_bad_acceptance_settings_are_refused(bad):
    with pytest.raises(GenerationError):
        DiffusionSampling().replace(**bad)


def test_fast_sampler_draws_from_the_same_distribution_with_the_same_entropy():
    from canvaslm.diffusion.sampling import propose

    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, float("-inf")]]]).expand(4000, 2, 4)
    reference = DiffusionSampling()
    fast = reference.replace(sampler="fast")
    tokens_ref, h_ref = propose(logits, reference, torch.Generator().manual_seed(0))
    tokens_fast, h_fast = propose(logits, fast, torch.Generator().manual_seed(0))
    assert torch.allclose(h_ref, h_fast, atol=1e-6)
    probs = logits[0].softmax(-1)
    for position in range(2):
        frequencies = torch.bincount(tokens_fast[:, position], minlength=4).float() / 4000
        assert torch.allclose(frequencies, probs[position], atol=0.03)
    assert not (tokens_fast[:, 1] == 3).any()  # a forbidden (-inf) token is never drawn
    with pytest.raises(GenerationError, match="sampler"):
        reference.replace(sampler="gumbel")


def test_greedy_sampler_proposes_the_argmax_with_the_same_entropy():
    from canvaslm.diffusion.sampling import propose

    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 0.0, float("-inf")]]]).expand(50, 2, 4)
    tokens, h = propose(logits, DiffusionSampling(sampler="greedy"), torch.Generator().manual_seed(0))
    _, h_ref = propose(logits, DiffusionSampling(), torch.Generator().manual_seed(0))
    assert (tokens == torch.tensor([0, 1])).all() and torch.allclose(h, h_ref, atol=1e-6)


def test_a_masked_canvas_keeps_a_new_token_every_step_under_every_rule():
    """A masked model's kept tokens and pins are certain (probability 1): the rules that always keep "the most
    confident" token must find it among the undecided positions, or a step keeps nothing new (and, greedy, every
    later step too: the canvas would stall until max_denoising_steps)."""
    from canvaslm.diffusion.sampling import accept, carry_over, factor_accept, threshold_accept

    mask = 4
    canvas = torch.tensor([[2, mask, 1, mask]])
    logits = carry_over(torch.tensor([[[0.0, 0.3, 0.1, 0.0, -9.0]] * 4]), canvas, mask)
    probs = logits.softmax(-1)
    free = canvas == mask
    assert threshold_accept(probs.amax(-1), 0.9)[free].sum() == 0  # without `free`: nothing new
    assert threshold_accept(probs.amax(-1), 0.9, free)[free].sum() == 1
    assert factor_accept(probs.amax(-1), 1.0, free)[free].sum() >= 1
    for rule in ("threshold", "adaptive", "entropy_bound"):
        settings = DiffusionSampling(acceptance=rule, accept_probability=0.99, entropy_bound=1e-6)
        assert accept(logits, entropy(logits), settings, 1, free)[free].sum() >= 1, rule


def test_revision_changes_kept_tokens_the_model_is_sure_are_wrong():
    from canvaslm.diffusion.sampling import revise

    mask, vocab = 4, 5
    previous = torch.tensor([[1, 1, 1, mask, 2]])
    pins = torch.tensor([[-1, -1, -1, -1, 2]])
    logits = torch.full((1, 5, vocab), -9.0)
    logits[0, 0, 3] = 9.0    # sure it is 3, not 1: revised
    logits[0, 1, [1, 3]] = 0.0  # 1 or 3 at even odds: kept
    logits[0, 2, 1] = 9.0    # agrees: kept
    logits[0, 3, 0] = 9.0    # still masked: not a revision (acceptance decides)
    logits[0, 4, 0] = 9.0    # a pin: never revised
    canvas = previous.clone()
    canvas[0, 3] = 0         # what this step accepted
    out, revised = revise(canvas, previous, logits, pins, mask, 0.9)
    assert revised.tolist() == [[True, False, False, False, False]]
    assert out.tolist() == [[3, 1, 1, 0, 2]]


def test_a_revising_canvas_stops_only_after_a_pass_that_changes_nothing():
    from canvaslm.diffusion.step import denoise_step, start_canvas

    mask, vocab = 4, 5
    settings = DiffusionSampling(sampler="greedy", t_max=1.0, t_min=0.99, acceptance="threshold",
                                 revise_probability=0.9)
    state = start_canvas(1, 3, vocab, settings, None, torch.device("cpu"), mask)
    state.canvas = torch.tensor([[1, 1, mask]])
    sure = torch.full((1, 3, vocab), -9.0)
    sure[0, :, 1] = 9.0
    sure[0, 0, 1], sure[0, 0, 2] = -9.0, 9.0       # position 0 should be 2
    outcome = denoise_step(state, sure, settings, None, vocab_size=vocab, mask_token_id=mask)
    assert outcome.state.canvas.tolist() == [[2, 1, 1]] and not bool(outcome.state.stopped.any())
    again = denoise_step(outcome.state, sure, settings, None, vocab_size=vocab, mask_token_id=mask)
    assert again.state.canvas.tolist() == [[2, 1, 1]] and bool(again.state.stopped.all())
    plain = denoise_step(state, sure, settings.replace(revise_probability=0.0), None, vocab_size=vocab,
                         mask_token_id=mask)
    assert plain.state.canvas.tolist() == [[1, 1, 1]] and bool(plain.state.stopped.all())  # kept tokens stand


def test_think_passes_keep_nothing_on_a_stuck_canvas_then_keep_the_most_confident_token():
    """think_passes = n: a canvas where no undecided token reaches the threshold re-reads its beliefs for n passes
    that keep nothing, then keeps its most confident token anyway; a pass that keeps something starts the count
    again. 0 (the default) keeps the most confident token at once."""
    from canvaslm.diffusion.step import denoise_step, start_canvas

    mask, vocab = 4, 5
    settings = DiffusionSampling(sampler="greedy", t_max=1.0, t_min=0.99, acceptance="threshold",
                                 accept_probability=0.999, think_passes=2)
    unsure = torch.zeros(2, 3, vocab)
    unsure[:, :, 1] = 2.0
    unsure[:, 2, 1] = 3.0  # the most confident position of both rows, still far below 0.999
    sure = unsure.clone()
    sure[0, 0, 1] = 20.0   # row 0 becomes sure of position 0; row 1 stays stuck

    def kept(state):
        return (state.canvas != mask).tolist()

    state = start_canvas(2, 3, vocab, settings, None, torch.device("cpu"), mask)
    seen = []
    for logits in (unsure, unsure, sure, unsure, unsure, unsure):
        state = denoise_step(state, logits, settings, None, vocab_size=vocab, mask_token_id=mask).state
        seen.append(kept(state))
    assert seen == [[[False] * 3] * 2,                                     # think pass 1
                    [[False] * 3] * 2,                                     # think pass 2
                    [[True, False, False], [False, False, True]],          # row 0 sure; row 1 keeps its best
                    [[True, False, False], [False, False, True]],          # both count from 0 again
                    [[True, False, False], [False, False, True]],
                    [[True, False, True], [True, False, True]]]            # forced again after 2 passes
    assert not bool(state.stopped.any())
    plain = start_canvas(2, 3, vocab, settings, None, torch.device("cpu"), mask)
    plain = denoise_step(plain, unsure, settings.replace(think_passes=0), None, vocab_size=vocab,
                         mask_token_id=mask).state
    assert kept(plain) == [[False, False, True]] * 2


@pytest.mark.parametrize("acceptance", ["entropy_bound", "threshold", "top_k", "adaptive"])
def test_sub_blocks_fill_a_masked_canvas_left_to_right_in_chunks(acceptance):
    """sub_block = 2 on a masked canvas of 6: a step keeps tokens only in the first pair that still holds a mask,
    however sure the model is of later positions; 0 (the default) keeps the surest anywhere."""
    from canvaslm.diffusion.step import denoise_step, start_canvas

    mask, vocab = 4, 5
    settings = DiffusionSampling(sampler="greedy", t_max=1.0, t_min=0.99, acceptance=acceptance,
                                 accept_probability=0.9, accept_k=1, entropy_bound=0.5, sub_block=2)
    logits = torch.zeros(1, 6, vocab)
    logits[0, :, 1] = torch.tensor([3.0, 4.0, 30.0, 30.0, 30.0, 30.0])  # sure of 2..5, unsure of 0 and 1
    state = start_canvas(1, 6, vocab, settings, None, torch.device("cpu"), mask)
    seen = []
    for _ in range(4):
        state = denoise_step(state, logits, settings, None, vocab_size=vocab, mask_token_id=mask).state
        seen.append((state.canvas != mask).int().tolist()[0])
    assert seen[0][2:] == [0, 0, 0, 0] and 1 <= sum(seen[0]) <= 2           # only the first pair
    assert next(s for s in seen if s[:2] == [1, 1])[4:] == [0, 0]          # pair 2 opens after pair 1 is full
    # the later pairs are sure and stable, so the stop test ends the canvas with them drafted
    assert bool(state.stopped.all()) and state.draft.tolist() == [[1] * 6]
    whole = denoise_step(start_canvas(1, 6, vocab, settings, None, torch.device("cpu"), mask), logits,
                         settings.replace(sub_block=0), None, vocab_size=vocab, mask_token_id=mask).state
    assert (whole.canvas[0, 2:] != mask).any()  # without sub-blocks a sure later position goes first


def test_left_to_right_order_keeps_a_prefix_of_the_undecided_positions_under_every_rule():
    """order = left_to_right on hand-made distributions: position 1 is decided, 0 and 4 are unsure, 2, 3 and 5
    sure. By certainty the rules would keep 5 (and 2, 3) before 0; along the canvas they keep 0 first, then each next
    position while the rule holds over the run, and stop at the first that breaks it."""
    from canvaslm.diffusion.sampling import left_to_right_accept

    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [1.0, 0, 0, 0], [0.95, 0.05 / 3, 0.05 / 3, 0.05 / 3],
                          [0.97, 0.01, 0.01, 0.01], [0.5, 0.5, 0, 0], [0.999, 0.0005, 0.0005, 0]])[None]
    logits = probs.log()
    h = entropy(logits)
    assert torch.allclose(h[0, [0, 2, 3, 4]], torch.tensor([1.2799, 0.2534, 0.1677, 0.6931]), atol=1e-4)
    free = torch.tensor([[True, False, True, True, True, True]])
    base = DiffusionSampling(order="left_to_right")

    def kept(force=None, **rule):
        return left_to_right_accept(logits, h, base.replace(**rule), free, force).int().tolist()[0]

    # threshold 0.9: 0 goes first whatever its confidence, 2 and 3 pass, 4 (0.5) ends the run
    assert kept(acceptance="threshold", accept_probability=0.9) == [1, 1, 1, 1, 0, 0]
    # entropy bound: the run's sum minus its largest is 0, 0.25 (2), 0.42 (3), 1.11 (4), 1.12 (5)
    assert kept(entropy_bound=0.5) == [1, 1, 1, 1, 0, 0]
    assert kept(entropy_bound=1.1) == [1, 1, 1, 1, 0, 0] and kept(entropy_bound=1.2) == [1] * 6
    assert kept(entropy_bound=0.1) == [1, 1, 0, 0, 0, 0]
    assert kept(acceptance="top_k", accept_k=2) == [1, 1, 1, 0, 0, 0]  # two new tokens a step
    # adaptive: bound 0.1 alone stops at 2; the factor rule keeps the 2nd (0.95 >= 1 - 1/3) and 3rd (0.97 >= 0.75)
    # undecided tokens, not the 4th (0.5 < 0.8)
    assert kept(acceptance="adaptive", entropy_bound=0.1, accept_factor=1.0) == [1, 1, 1, 1, 0, 0]
    # a row not forced keeps nothing new when its first undecided token fails (a think pass), only what is decided
    no = torch.tensor([False])
    assert kept(no, acceptance="threshold", accept_probability=0.9) == [0, 1, 0, 0, 0, 0]
    by_certainty = DiffusionSampling(acceptance="threshold", accept_probability=0.9)
    from canvaslm.diffusion.sampling import accept
    assert accept(logits, h, by_certainty, 1, free).int().tolist()[0] == [0, 1, 1, 1, 0, 1]


def test_a_token_drawn_for_two_neighbouring_undecided_positions_waits_for_a_pass_that_sees_the_first():
    """adjacent_repeats = wait: all six positions sure, position 1 decided. The pass drew 7 for 2 and 3 and 9 for 4
    and 5: the run ends at 3 (its neighbour 2 was drawn in the same pass), though the rule holds there. A token that
    repeats a decided neighbour (position 2 drawing the 5 that position 1 holds) never waits: it saw that neighbour."""
    from canvaslm.diffusion.sampling import left_to_right_accept

    logits = torch.tensor([[0.99, 0.01 / 3, 0.01 / 3, 0.01 / 3]]).log().expand(1, 6, 4)
    h = entropy(logits)
    free = torch.tensor([[True, False, True, True, True, True]])
    settings = DiffusionSampling(order="left_to_right", acceptance="threshold", accept_probability=0.9)

    def kept(proposal, **rule):
        return left_to_right_accept(logits, h, settings.replace(**rule), free, None, None,
                                    torch.tensor([proposal])).int().tolist()[0]

    assert kept([3, 5, 7, 7, 9, 9]) == [1] * 6                                  # keep: as drawn
    assert kept([3, 5, 7, 7, 9, 9], adjacent_repeats="wait") == [1, 1, 1, 0, 0, 0]
    assert kept([3, 5, 5, 7, 9, 8], adjacent_repeats="wait") == [1] * 6           # 2 repeats the decided 1
    free_first = torch.tensor([[False, True, True, True, True, True]])
    assert left_to_right_accept(logits, h, settings.replace(adjacent_repeats="wait"), free_first, None, None,
                                torch.tensor([[4, 4, 6, 8, 8, 1]])).int().tolist()[0] == [1, 1, 1, 1, 0, 0]
    with pytest.raises(GenerationError, match="adjacent_repeats must be one of"):
        settings.replace(adjacent_repeats="twice")
    # "drop" acts at the commit check (tests/engine/test_commit_check.py): in the pass it keeps as drawn
    assert kept([3, 5, 7, 7, 9, 9], adjacent_repeats="drop", commit_check=0.01) == [1] * 6


def test_through_the_step_no_pass_keeps_a_token_twice_in_a_row_and_the_canvas_still_fills():
    """A model whose every position is sure of one token (a canvas that would be "7 7 7 7 ..." in one pass): with
    adjacent_repeats = wait each pass keeps one new token, the one after a decided position, and the canvas still
    fills; with keep, one pass keeps them all. The canvas is sure and stable after a pass, yet must not stop early
    while the draft it would commit holds such a doubled token."""
    from canvaslm.diffusion.step import denoise_step, start_canvas

    mask, vocab, length = 4, 9, 6
    logits = torch.full((1, length, vocab), -10.0)
    logits[..., 7] = 10.0
    # wait: one token a pass; the canvas stops early (sure and stable) only once its last undecided position has a
    # decided neighbour, so the draft it commits doubles nothing that one pass drew
    for repeats, passes in (("keep", 1), ("wait", length - 1)):
        settings = DiffusionSampling(sampler="fast", acceptance="threshold", accept_probability=0.9,
                                     order="left_to_right", max_denoising_steps=16, adjacent_repeats=repeats)
        generator = torch.Generator().manual_seed(0)
        state = start_canvas(1, length, vocab, settings, generator, torch.device("cpu"), mask)
        kept = []
        while bool((state.canvas == mask).any()) and not bool(state.stopped.all()):
            before = int((state.canvas != mask).sum())
            state = denoise_step(state, logits, settings, generator, vocab_size=vocab, mask_token_id=mask).state
            kept.append(int((state.canvas != mask).sum()) - before)
        assert kept == [length] if repeats == "keep" else kept == [1] * passes
        assert bool(state.stopped.all()) and state.draft.tolist() == [[7] * length]


@pytest.mark.parametrize("acceptance", ["entropy_bound", "threshold", "top_k", "adaptive"])
def test_a_masked_canvas_fills_left_to_right_as_a_prefix(acceptance):
    """Through the denoising step: with order = left_to_right every step's kept tokens form a prefix of the canvas,
    the canvas fills completely, and a step always keeps at least one new token."""
    from canvaslm.diffusion.step import denoise_step, start_canvas

    mask, vocab, length = 4, 5, 8
    torch.manual_seed(0)
    settings = DiffusionSampling(sampler="fast", acceptance=acceptance, accept_probability=0.6, accept_k=2,
                                 entropy_bound=0.5, order="left_to_right", max_denoising_steps=8)
    logits = torch.randn(2, length, vocab) * 3
    generator = torch.Generator().manual_seed(0)
    state = start_canvas(2, length, vocab, settings, generator, torch.device("cpu"), mask)
    before = 0
    for _ in range(length):
        state = denoise_step(state, logits, settings, generator, vocab_size=vocab, mask_token_id=mask).state
        filled = (state.canvas != mask).int()
        counts = filled.sum(dim=-1)
        assert all(row[:n].all() and not row[n:].any() for row, n in zip(filled, counts.tolist()))  # a prefix
        assert bool((counts > before).all() | (counts == length).all()) and bool((counts > before).any())
        before = counts
        if bool((counts == length).all()):
            break
    assert bool((state.canvas != mask).all())


def test_fast_exp_of_a_pinned_canvas_is_exact_and_zero_below_the_normal_range():
    from canvaslm.diffusion.sampling import exp_probabilities, pin, propose

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 300, generator=g) * 3
    logits[0, 0, :40] = torch.linspace(-120.0, -60.0, 40)  # across -87 (normal) and -104 (zero in float32)
    pinned = pin(logits, torch.tensor([[-1, 7, -1, 9, 9, -1], [3, -1, -1, -1, 5, -1]]))  # -1e4 elsewhere
    log_probs = pinned.log_softmax(dim=-1)
    (fast, floor), plain = exp_probabilities(log_probs), log_probs.exp()
    assert torch.equal(floor, log_probs.clamp(min=-87.0))
    normal = log_probs > -87.0
    assert torch.equal(fast[normal], plain[normal])                      # bit for bit where exp is a normal float
    assert (fast[~normal] == 0).all() and (plain[~normal] < 1.2e-38).all()  # what is dropped was < 1.2e-38
    # the proposal and entropy of every position (pinned ones included) are those of the plain exp
    settings = DiffusionSampling(sampler="fast")
    tokens, h = propose(pinned, settings, torch.Generator().manual_seed(1))
    cdf = plain.cumsum(dim=-1)
    u = torch.rand(*plain.shape[:-1], 1, generator=torch.Generator().manual_seed(1)) * cdf[..., -1:]
    assert torch.equal(tokens, torch.searchsorted(cdf, u, right=True).squeeze(-1))
    assert torch.equal(tokens[0, [1, 3, 4]], torch.tensor([7, 9, 9])) and (h[0, [1, 3, 4]] == 0).all()
    assert torch.allclose(h, -(plain * log_probs.clamp(min=-3e38)).sum(-1), atol=1e-6)


@pytest.mark.parametrize("sampler", ["fast", "greedy"])
def test_proposing_only_the_open_positions_gives_what_the_whole_canvas_gives(sampler):
    from canvaslm.diffusion.sampling import pin, propose

    g = torch.Generator().manual_seed(3)
    settings = DiffusionSampling(sampler=sampler)
    for fixed in (torch.tensor([[-1, 5, -1, 9, 9, -1], [3, -1, -1, -1, 0, -1]]),   # some kept
                  torch.full((2, 6), -1), torch.tensor([[1, 2, 3, 4, 5, 6]] * 2)):  # none, all
        logits = pin(torch.randn(2, 6, 40, generator=g) * 3, fixed)
        logits[..., 7] = float("-inf")  # the mask token, as denoise_step forbids it
        whole = propose(logits, settings, torch.Generator().manual_seed(1))
        some = propose(logits, settings, torch.Generator().manual_seed(1), fixed)
        assert torch.equal(some[0], whole[0]) and torch.equal(some[1], whole[1])
        assert torch.equal(torch.signbit(some[1]), torch.signbit(whole[1]))  # even the -0.0 of a kept position
    # the random stream goes on alike: the next draw after either is the same
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    propose(logits, settings, a), propose(logits, settings, b, fixed)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))


def test_the_first_token_from_the_causal_pass_is_drawn_as_the_first_step_draws_it():
    """`first_from_causal` samples the first position from the causal logits at the first step's temperature
    (t_max; `first_token_temperature` when set), never the mask token nor a token the constraint forbids; the rest
    of the canvas stays masked, the step counts as done, and rows that stopped or whose first position is pinned
    keep theirs."""
    from canvaslm.diffusion.step import first_from_causal, start_canvas

    rows, vocab, mask = 40000, 6, 5
    settings = DiffusionSampling(sampler="fast", first_token="causal", t_max=0.8, t_min=0.4, max_denoising_steps=4)
    before = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5, 9.0]).expand(rows, 1, vocab)
    allowed = torch.ones(rows, 4, vocab, dtype=torch.bool)
    allowed[:, 0, 3] = False
    state = start_canvas(rows, 4, vocab, settings, None, torch.device("cpu"), mask)
    after = first_from_causal(state, before, settings, torch.Generator().manual_seed(0), mask_token_id=mask,
                              allowed=allowed)
    assert after.step == 1 and bool((after.canvas[:, 1:] == mask).all()) and torch.equal(after.draft, after.canvas)
    expected = (before[0, 0] / 0.8).masked_fill(torch.tensor([False, False, False, True, False, True]),
                                                float("-inf")).softmax(-1)
    seen = torch.bincount(after.canvas[:, 0], minlength=vocab).float() / rows
    assert seen[3] == 0 and seen[mask] == 0
    assert torch.allclose(seen, expected, atol=0.01), (seen, expected)
    warm = first_from_causal(state, before, settings.replace(first_token_temperature=1.6),
                             torch.Generator().manual_seed(0), mask_token_id=mask, allowed=allowed)
    expected = (before[0, 0] / 1.6).masked_fill(torch.tensor([False, False, False, True, False, True]),
                                                float("-inf")).softmax(-1)  # its own temperature, not t_max
    seen = torch.bincount(warm.canvas[:, 0], minlength=vocab).float() / rows
    assert torch.allclose(seen, expected, atol=0.01), (seen, expected)

    pins = torch.tensor([[4, -1, -1, -1], [-1, -1, -1, -1], [-1, -1, -1, -1]])
    state = start_canvas(3, 4, vocab, settings, None, torch.device("cpu"), mask, pins,
                         stopped=torch.tensor([False, True, False]))
    after = first_from_causal(state, before[:3], settings, torch.Generator().manual_seed(0), mask_token_id=mask)
    assert after.canvas[:2].tolist() == state.canvas[:2].tolist() and int(after.canvas[2, 0]) != mask
    for unchanged in (settings.replace(first_token="decoder"), settings.replace(max_denoising_steps=1)):
        assert first_from_causal(state, before[:3], unchanged, None, mask_token_id=mask) is state
    assert first_from_causal(state, None, settings, None, mask_token_id=mask) is state


def test_first_tokens_drawn_together_are_those_each_row_draws_alone():
    """`first_from_causal_each` (the serving engine's canvases that start in one step): rows with their own
    settings (penalties, temperatures, samplers, allowed tokens, `no_repeat_ngram_size`) and generators get, token
    for token, what `first_from_causal` draws for each alone, and each generator ends where it would have; rows the
    rule does not apply to come back as they were. Bf16 logits, as the packed model's head gives them."""
    from canvaslm.diffusion.step import first_from_causal, first_from_causal_each, start_canvas

    vocab, mask, cpu = 50, 3, torch.device("cpu")
    base = DiffusionSampling(sampler="fast", first_token="causal", t_max=0.5, t_min=0.3, max_denoising_steps=4)
    settings = [base, base.replace(presence_penalty=1.0), base.replace(frequency_penalty=0.5, t_max=0.9),
                base.replace(first_token_temperature=1.3, presence_penalty=0.4), base.replace(sampler="reference"),
                base.replace(no_repeat_ngram_size=2), base, base.replace(first_token="decoder"), base] * 3
    generator = torch.Generator().manual_seed(0)
    befores = [(torch.randn(1, 1, vocab, generator=generator) * 3).bfloat16() for _ in settings]
    counts = [torch.randint(0, 3, (1, vocab), generator=generator).float() if i % 3 else None
              for i in range(len(settings))]
    written = [torch.randint(4, vocab, (1, 6), generator=generator) for _ in settings]
    allowed = [None] * len(settings)
    allowed[6] = torch.rand(1, 4, vocab, generator=generator) > 0.5
    states = [start_canvas(1, 4, vocab, o, None, cpu, mask) for o in settings]
    seeds = list(range(100, 100 + len(settings)))
    alone_gens = [torch.Generator().manual_seed(s) for s in seeds]
    alone = [first_from_causal(st, b, o, g, mask_token_id=mask, allowed=a, counts=c, written=w)
             for st, b, o, g, a, c, w in zip(states, befores, settings, alone_gens, allowed, counts, written)]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    together = first_from_causal_each(states, befores, settings, gens, mask_token_id=mask, allowed=allowed,
                                      counts=counts, written=written)
    for a, t, ga, gt in zip(alone, together, alone_gens, gens, strict=True):
        assert torch.equal(a.canvas, t.canvas) and torch.equal(a.draft, t.draft) and a.step == t.step
        assert torch.equal(a.stopped, t.stopped)
        assert torch.equal(torch.rand(2, generator=ga), torch.rand(2, generator=gt))
    assert together[7] is states[7] and len({int(t.canvas[0, 0]) for t in together}) > 3


@pytest.mark.parametrize("rule", [dict(order="left_to_right", acceptance="threshold", accept_probability=0.3),
                                  dict(acceptance="threshold", accept_probability=0.3),
                                  dict(acceptance="adaptive", entropy_bound=0.5),
                                  dict(acceptance="entropy_bound", entropy_bound=2.0),
                                  dict(acceptance="top_k", accept_k=2),
                                  dict(order="left_to_right", acceptance="threshold", sub_block=4, sampler="greedy")])
def test_a_step_from_the_masked_positions_logits_alone_is_the_step_from_the_whole_canvas(rule):
    """`denoise_step` given only the masked positions' logits [n, V] (the rows a kept position would never have
    read) takes the very step it takes from the whole canvas's [B, C, V]: same tokens kept, canvas, draft, entropy
    and random draws, under every rule, with allowed tokens and pins."""
    from canvaslm.diffusion.step import denoise_step, start_canvas

    mask, vocab, length = 9, 10, 8
    settings = DiffusionSampling(sampler="fast", max_denoising_steps=8).replace(**rule)
    pins = torch.tensor([[-1, -1, -1, 5, -1, -1, -1, -1], [-1] * 8, [2, -1, -1, -1, -1, -1, -1, 7]])
    state = start_canvas(3, length, vocab, settings, None, torch.device("cpu"), mask, pins)
    state.canvas[0, :2] = torch.tensor([1, 4])  # kept in earlier steps
    state.canvas[1, 5] = 3
    state.step = 2
    torch.manual_seed(0)
    logits = torch.randn(3, length, vocab) * 3
    allowed = torch.rand(3, length, vocab) > 0.2
    allowed[..., 0] = True
    masked = state.canvas == mask
    whole = denoise_step(state, logits, settings, torch.Generator().manual_seed(1), vocab_size=vocab,
                         mask_token_id=mask, allowed=allowed, sc_dtype=None)
    alone = denoise_step(state, logits[masked], settings, torch.Generator().manual_seed(1), vocab_size=vocab,
                         mask_token_id=mask, allowed=allowed, sc_dtype=None)
    for name in ("canvas", "draft", "stopped", "history"):
        assert torch.equal(getattr(whole.state, name), getattr(alone.state, name)), name
    assert torch.equal(whole.accepted, alone.accepted) and torch.equal(whole.entropy, alone.entropy)
    assert bool((alone.state.canvas != mask).sum() > (state.canvas != mask).sum())  # the step kept something
    with pytest.raises(ValueError, match="open-row logits"):
        denoise_step(state, logits[masked][1:], settings, None, vocab_size=vocab, mask_token_id=mask, sc_dtype=None)
    with pytest.raises(ValueError, match="reference sampler"):
        denoise_step(state, logits[masked], settings.replace(sampler="reference"), None, vocab_size=vocab,
                     mask_token_id=mask, sc_dtype=None)
