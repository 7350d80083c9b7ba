"""`no_repeat_ngram_size` in every decoding: no n-gram of generated tokens comes twice. Autoregressive (library,
grammar and engine) and verified decoding ban the token that would complete one, so verified stays exactly the AR
distribution under the rule; a canvas bans it where the tokens before a position are known and makes a token drawn
beside undecided neighbours wait for a pass that sees them."""

from __future__ import annotations

import dataclasses
import queue

import pytest
import torch

from canvaslm.diffusion.sampling import (DiffusionSampling, append_written, repeated_ngram_bans, repeated_ngrams,
                                         without_next_repeats)
from canvaslm.diffusion.step import denoise_step, first_from_causal, start_canvas
from canvaslm.engine.core import Engine
from canvaslm.engine.request import Request
from canvaslm.errors import GenerationError
from tests.engine.test_penalties import greedy_by_hand
from tests.engine.test_verified import PROMPTS, chi_square_p, exact_joint, shift_llama, tokens_of


def ngrams_twice(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    """The n-grams that come more than once in tokens."""
    seen, twice = set(), []
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i:i + n])
        if gram in seen:
            twice.append(gram)
        seen.add(gram)
    return twice


def test_the_bans_and_the_check_read_only_known_ngrams_that_end_earlier():
    """Row 0 holds 5 6 7 8 5 6 then two unknowns: position 6 may not be 7 (5 6 7 came before); position 7 has an
    unknown before it, so nothing is banned there. Row 1, 1 2 3 1 2 3 1 ?: its known 7th token already repeats
    2 3 1 (a caller bans only unknown positions) and its last may not be 2."""
    text = torch.tensor([[5, 6, 7, 8, 5, 6, -1, -1], [1, 2, 3, 1, 2, 3, 1, -1]])
    assert repeated_ngram_bans(text, 3, 6).tolist() == [[0, 0, 7], [1, 0, 1], [1, 1, 2]]
    assert repeated_ngram_bans(text[:, :2], 3, 0).shape == (0, 3)  # shorter than an n-gram
    assert repeated_ngram_bans(torch.tensor([[4, 5, 4, -1]]), 1, 3).tolist() == [[0, 0, 4], [0, 0, 5]]
    # the check: 5 6 7 at positions 4-6 repeats 0-2; 8 at 7 ends 6 7 9's... nothing; an unknown ends nothing
    assert repeated_ngrams(torch.tensor([[5, 6, 7, 8, 5, 6, 7, 9]]), 3, 4).tolist() == [[False, False, True, False]]
    assert repeated_ngrams(torch.tensor([[5, 6, 5, 6, -1, 6]]), 2, 2).tolist() == [[False, True, False, False]]
    # an n-gram only ever repeats one that ended before it, never a later one
    assert repeated_ngrams(torch.tensor([[5, 6, 5, 6]]), 2, 0).tolist() == [[False, False, False, True]]
    logits = torch.zeros(1, 12)
    banned = without_next_repeats(logits, torch.tensor([[9, 4, 9]]), 2)
    assert banned.isinf().nonzero().tolist() == [[0, 4]]
    assert without_next_repeats(logits, torch.tensor([[9]]), 0) is logits


def test_answers_stay_in_order_with_the_unknowns_on_the_left():
    written = torch.tensor([[-1, 4], [5, 6]])
    out = append_written(written, torch.tensor([[7, 8, 9], [1, -1, -1]]), torch.tensor([2, 3]))
    assert out.tolist() == [[-1, -1, 4, 7, 8], [-1, -1, 5, 6, 1]]
    assert append_written(None, torch.tensor([[1]])) is None


def naive_greedy(lm, prompt: list[int], steps: int, n: int) -> list[int]:
    """Greedy decoding that bans by hand every token that would complete an n-gram the answer holds."""
    def ban_by_hand(logits: torch.Tensor, out: list[int]) -> None:
        tail = out[len(out) - n + 1:] if n > 1 else []
        for i in range(len(out) - n + 1):
            if out[i:i + n - 1] == tail:
                logits[out[i + n - 1]] = float("-inf")

    return greedy_by_hand(lm, prompt, steps, ban_by_hand)


@pytest.mark.parametrize("decoding", ["autoregressive", "verified"])
def test_greedy_decoding_without_repeats_matches_a_loop_that_bans_by_hand(decoding):
    """The AR loop and verified decoding (whose checks ban each position's tokens given the drafts before it) write
    the tokens of a loop that recomputes everything and bans by hand; the plain text repeats bigrams, this never."""
    lm = shift_llama(gain=3.0)
    lm.eos_token_ids = []
    plain = lm.generate(PROMPTS, 24, decoding=decoding, temperature=0.0).sequences
    assert any(ngrams_twice(lm.decode_new(row, plain.shape[1] - 24)[0], 2) for row in plain)
    batched = lm.generate(PROMPTS, 24, decoding=decoding, temperature=0.0, no_repeat_ngram_size=2)
    width = max(map(len, PROMPTS))
    for row, prompt in enumerate(PROMPTS):  # rows of one batch read their own answers
        got = lm.decode_new(batched.sequences[row], width)[0]
        assert got == naive_greedy(lm, prompt, 24, 2) and not ngrams_twice(got, 2)


def test_sampled_verified_tokens_keep_the_autoregressive_distribution_under_the_rule():
    """Three tokens, 6000 draws, a 12-token vocabulary: with no token twice (n = 1) verified decoding fits the AR
    joint with those tokens banned, as AR sampling does, and is far from the plain joint."""
    lm = shift_llama(canvas=4, gain=3.0, vocab=12)
    lm.eos_token_ids = []
    prompt, n, samples = [2, 5, 7], 3, 6000
    joint = exact_joint(lm, prompt, n)
    grid = torch.cartesian_prod(*[torch.arange(12)] * n)
    distinct = (grid[:, 0] != grid[:, 1]) & (grid[:, 0] != grid[:, 2]) & (grid[:, 1] != grid[:, 2])
    # p(a) p(b | a, b != a) p(c | a b, c not in {a, b}): the AR joint with the banned tokens' mass renormalized
    banned = exact_joint(lm, prompt, n, no_token_twice=True).flatten()
    assert float(banned[~distinct].sum()) == 0.0 and not torch.allclose(banned, joint.flatten())

    def counts(decoding: str, seed: int) -> torch.Tensor:
        out = lm.generate([prompt] * samples, n, seed=seed, decoding=decoding, temperature=1.0,
                          no_repeat_ngram_size=1)
        tokens = out.sequences[:, len(prompt):len(prompt) + n]
        return torch.bincount((tokens * torch.tensor([144, 12, 1])).sum(dim=1), minlength=12 ** 3).double()

    verified = counts("verified", 0)
    assert chi_square_p(verified, banned * samples) > 1e-3
    assert chi_square_p(counts("autoregressive", 1), banned * samples) > 1e-3
    assert chi_square_p(verified, joint.flatten() * samples) < 1e-6


def test_a_canvas_bans_where_it_knows_the_context_and_waits_where_it_does_not():
    """n = 3, a greedy left-to-right canvas that keeps everything it draws. The first token from the causal pass,
    after committed text ending 5 6 that holds 5 6 7, may not be 7. In a canvas 7 ? ?: position 1 knows its context
    (the text's last token, then 7) and is banned what would repeat; position 2, drawn beside it, is checked
    after the draw and waits when the three tokens repeat, kept otherwise."""
    vocab, mask = 10, 3
    settings = DiffusionSampling(sampler="greedy", acceptance="threshold", accept_probability=0.01,
                                 order="left_to_right", first_token="causal", max_denoising_steps=4, t_min=1.0,
                                 t_max=1.1, no_repeat_ngram_size=3)
    fresh = start_canvas(1, 3, vocab, settings, None, torch.device("cpu"), mask, None)
    written = torch.tensor([[5, 6, 7, 9, 5, 6]])
    logits = torch.zeros(1, 3, vocab)
    logits[..., 7], logits[..., 8] = 2.0, 1.0
    first = first_from_causal(fresh, logits[:, :1], settings, None, mask_token_id=mask, written=written)
    assert int(first.canvas[0, 0]) == 8  # 5 6 7 again is banned
    assert int(first_from_causal(fresh, logits[:, :1], settings, None, mask_token_id=mask).canvas[0, 0]) == 7
    canvas = torch.tensor([[7, mask, mask]])
    state = dataclasses.replace(fresh, canvas=canvas, draft=canvas.clone(), step=1)
    logits = torch.zeros(1, 3, vocab)
    logits[:, 1, 9], logits[:, 1, 8] = 3.0, 1.0
    logits[:, 2, 5] = 3.0

    def canvas_after(text: list[int]) -> list[int]:
        step = denoise_step(state, logits, settings, None, vocab_size=vocab, mask_token_id=mask, sc_dtype=None,
                            written=torch.tensor([text]))
        return step.state.canvas[0].tolist()

    assert canvas_after([5, 6, 7, 9, 5, 6]) == [7, 8, 5]     # 6 7 9 was written: 9 is banned at 1, 8 comes
    assert canvas_after([7, 9, 5, 1]) == [7, 9, mask]        # 1 7 9 is new; 7 9 5 is not, so 5 waits
    assert canvas_after([9, 5, 2, 1]) == [7, 9, 5]           # nothing repeats
    assert denoise_step(state, logits, settings, None, vocab_size=vocab, mask_token_id=mask,
                        sc_dtype=None).state.canvas[0].tolist() == [7, 9, 5]  # no text: the rule is off


def test_canvases_never_write_an_ngram_twice_and_the_engine_draws_what_generate_draws():
    """Sampled canvases, AR and verified answers with the rule hold no 3-gram twice where the plain canvases do;
    each request alone on the engine writes what LM.generate writes for its seed."""
    lm = shift_llama(gain=3.0)
    lm.eos_token_ids = []
    canvas = {"max_denoising_steps": 4, "order": "left_to_right", "acceptance": "threshold", "sampler": "fast"}
    plain = lm.generate(PROMPTS, 48, seed=0, **canvas).sequences
    width = max(map(len, PROMPTS))
    assert any(ngrams_twice(lm.decode_new(row, width)[0], 3) for row in plain)
    cases = [(PROMPTS[0], "autoregressive", {"temperature": 1.0}, 3), (PROMPTS[1], "verified", {"temperature": 1.0}, 4),
             (PROMPTS[2], None, canvas, 5), (PROMPTS[3], None, {"max_denoising_steps": 4}, 6)]
    for prompt, decoding, options, seed in cases:
        options = {**options, "no_repeat_ngram_size": 3}
        out = lm.generate([prompt], 48, seed=seed, decoding=decoding, **options)
        want = lm.decode_new(out.sequences[0], len(prompt))[0][:48]
        assert not ngrams_twice(want, 3), (decoding, options)
        engine = Engine(lm, pin_settled=False).start()
        try:
            inbox = queue.Queue()
            engine.submit(Request(prompt, 48, inbox.put, sampling=options, seed=seed, decoding=decoding))
            assert tokens_of(inbox) == want
        finally:
            engine.stop()
    with pytest.raises(GenerationError, match="no_repeat_ngram_size must be an integer in"):
        lm.generate([PROMPTS[0]], 4, no_repeat_ngram_size=-1)


def test_a_uniform_noise_canvas_commits_a_draft_without_repeats(tmp_path):
    """DiffusionGemma's canvases decide nothing until they stop: the draft a canvas commits, when it stops or runs
    out of steps, takes at a repeating position its most likely token that does not repeat. With no token twice
    (n = 1), 40 tokens of an untrained 128-token model hold none twice, where the plain canvases do; the engine
    writes the same."""
    import canvaslm
    from tests.reference import tiny_checkpoint

    tiny_checkpoint(tmp_path, canvas_length=8)
    lm = canvaslm.load(tmp_path, device="cpu")
    assert getattr(lm.network, "mask_token_id", None) is None  # uniform noise
    lm.eos_token_ids = []
    prompt, options = [5, 6, 7], {"max_denoising_steps": 3}
    plain = lm.decode_new(lm.generate([prompt], 40, seed=1, **options).sequences[0], 3)[0]
    assert len(set(plain)) < len(plain)
    out = lm.decode_new(lm.generate([prompt], 40, seed=1, no_repeat_ngram_size=1, **options).sequences[0], 3)[0]
    assert len(out) == 40 and len(set(out)) == 40
    engine = Engine(lm, pin_settled=False).start()
    try:
        inbox = queue.Queue()
        engine.submit(Request(prompt, 40, inbox.put, sampling={**options, "no_repeat_ngram_size": 1}, seed=1))
        assert tokens_of(inbox) == out
    finally:
        engine.stop()
