"""OpenAI's presence and frequency penalties in every decoding: autoregressive (library, grammar and engine), verified
(still exactly the AR distribution, now the penalized one) and the canvases (the committed text and the tokens a
canvas keeps)."""

from __future__ import annotations

import dataclasses
import queue

import pytest
import torch

from canvaslm.diffusion.sampling import DiffusionSampling, held_of, penalize, penalize_rows, stack_rows
from canvaslm.diffusion.step import denoise_step, first_from_causal, start_canvas
from canvaslm.engine.core import Engine
from canvaslm.engine.request import Request, Sequence
from canvaslm.engine.runners import record_answer, start_answer
from canvaslm.errors import GenerationError
from tests.engine.test_verified import PROMPTS, chi_square_p, exact_joint, first_tokens, shift_llama, tokens_of

PENALTIES = {"presence_penalty": 1.5, "frequency_penalty": 0.5}


def test_penalize_subtracts_presence_once_and_frequency_per_time():
    logits = torch.zeros(2, 4)
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    assert torch.equal(penalize(logits, counts, 1.5, 0.5), torch.tensor([[0.0, -2.0, -3.0, 0.0],
                                                                         [-2.5, 0.0, 0.0, 0.0]]))
    assert penalize(logits, counts, 0.0, 0.0) is logits and penalize(logits, None, 1.0, 1.0) is logits
    # presence alone takes a shorter path: the same values, bit for bit, in bf16 and float32, per row too
    generator = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 3, (3, 1, 500), generator=generator).float()
    for dtype in (torch.bfloat16, torch.float32):
        logits = (torch.randn(3, 1, 500, generator=generator) * 5).to(dtype)
        for presence in (0.4, 1.0, torch.tensor([0.4, 1.0, 0.0])[:, None, None]):
            by_formula = logits - (presence * (counts > 0) + 0.0 * counts).to(dtype)
            assert torch.equal(penalize(logits, counts, presence, 0.0), by_formula)


def test_rows_penalized_together_get_what_each_gets_alone_bit_for_bit():
    """`penalize_rows` works out only the positions of the tokens each row's answer holds ({token: times}, kept by
    the engine beside its counts): every row gets exactly what `penalize` gives it alone, in bf16 and float32, with
    presence alone or frequency too, a middle dimension, -inf logits, rows without penalties or counts; and the
    input is left as it was."""
    generator = torch.Generator().manual_seed(1)
    vocab = 300
    counts = [torch.randint(0, 3, (1, vocab), generator=generator).float() * (torch.rand(1, vocab) < 0.1)
              for _ in range(6)]
    counts[4] = torch.zeros(1, vocab)  # an answer with nothing yet
    counts[5] = None
    held = [held_of(c) for c in counts]
    assert held[4] == {} and held[5] is None and held[0] == {t: float(counts[0][0, t]) for t in
                                                               counts[0][0].nonzero().squeeze(1).tolist()}
    for dtype in (torch.bfloat16, torch.float32):
        for middle in (1, 3):
            logits = (torch.randn(6, middle, vocab, generator=generator) * 5).to(dtype)
            logits[0, :, 7] = float("-inf")
            before = logits.clone()
            for frequency in ([0.0] * 6, [0.5, 0.0, 0.25, 1.0, 0.5, 0.5]):
                presence = [1.0, 0.4, 0.0, 1.5, 1.0, 1.0]
                together = penalize_rows(logits, held, presence, frequency)
                for i in range(6):
                    alone = penalize(logits[i:i + 1], None if counts[i] is None else counts[i][:, None],
                                     presence[i], frequency[i])
                    assert torch.equal(together[i:i + 1], alone), (dtype, middle, frequency, i)
                assert not torch.equal(together[0], logits[0]) and torch.equal(logits, before)
    assert penalize_rows(logits, [None, {}] + [None] * 4, [1.0] * 6, [0.0] * 6) is logits


def test_the_engines_answer_record_keeps_its_tokens_as_the_counts_hold_them():
    """`record_answer` keeps a penalized sequence's tokens twice: counts [1, V] and {token: times}; they agree."""
    lm = shift_llama()
    seq = Sequence(Request([1, 2], 8, lambda _: None, sampling=PENALTIES), torch.Generator(), None,
                   lm.diffusion_settings(PENALTIES))
    start_answer(lm, seq)
    for tokens in ([[5, 6, 5]], [[6]], [[9, 5]]):
        record_answer(seq, torch.tensor(tokens))
    assert seq.held == held_of(seq.counts) == {5: 3.0, 6: 2.0, 9: 1.0}


def test_rows_of_one_tensor_stack_as_a_view():
    """`stack_rows`: rows lying one after another in one tensor come back as a view of it (no copy); others as
    `torch.cat` gives them."""
    base = torch.randn(5, 1, 7)
    rows = [base[i:i + 1] for i in range(1, 4)]
    stacked = stack_rows(rows)
    assert torch.equal(stacked, base[1:4]) and stacked.data_ptr() == base[1].data_ptr()
    for others in ([base[2:3], base[1:2]], [base[0:1], base[2:3]], [base[0:1], torch.randn(1, 1, 7)]):
        assert torch.equal(stack_rows(others), torch.cat(others)) and stack_rows(others).data_ptr() != base.data_ptr()


def greedy_by_hand(lm, prompt: list[int], steps: int, adjust) -> list[int]:
    """Greedy decoding that re-reads the whole text each step (no cache); `adjust(logits [V], out)` changes each
    step's logits in place, by hand, from the answer so far."""
    out: list[int] = []
    for _ in range(steps):
        ids = torch.tensor([prompt + out])
        with torch.no_grad():
            hidden = lm.network.encode(ids, lm.network.new_cache(1), torch.ones_like(ids, dtype=torch.bool))
            logits = lm.network.logits(hidden)[0, -1].float()
        adjust(logits, out)
        out.append(int(logits.argmax()))
    return out


def naive_greedy(lm, prompt: list[int], n: int, presence: float, frequency: float) -> list[int]:
    """Greedy decoding that penalizes by hand."""
    def penalize_by_hand(logits: torch.Tensor, out: list[int]) -> None:
        for token in set(out):
            logits[token] -= presence + frequency * out.count(token)

    return greedy_by_hand(lm, prompt, n, penalize_by_hand)


@pytest.mark.parametrize("decoding", ["autoregressive", "verified"])
def test_greedy_penalized_decoding_matches_a_hand_penalized_loop(decoding):
    """The AR loop and verified decoding (whose checks penalize each position by the drafts before it) write the
    tokens of a loop that recomputes everything and subtracts the penalties by hand; without them the text differs."""
    lm = shift_llama(gain=3.0)
    lm.eos_token_ids = []
    for prompt in PROMPTS:
        want = naive_greedy(lm, prompt, 24, **{k.split("_")[0]: v for k, v in PENALTIES.items()})
        out = lm.generate([prompt], 24, decoding=decoding, temperature=0.0, **PENALTIES)
        assert lm.decode_new(out.sequences[0], len(prompt))[0] == want
    plain = lm.generate(PROMPTS, 24, decoding=decoding, temperature=0.0).sequences
    assert not torch.equal(plain, lm.generate(PROMPTS, 24, decoding=decoding, temperature=0.0, **PENALTIES).sequences)
    batched = lm.generate(PROMPTS, 24, decoding=decoding, temperature=0.0, **PENALTIES)
    for row, prompt in enumerate(PROMPTS):  # rows of one batch count their own tokens
        width = max(map(len, PROMPTS))
        assert lm.decode_new(batched.sequences[row], width)[0] == naive_greedy(lm, prompt, 24, 1.5, 0.5)


def test_sampled_penalized_verified_tokens_have_the_penalized_autoregressive_distribution():
    """Three tokens, 6000 draws, a 12-token vocabulary with peaked logits: verified decoding with penalties fits
    the penalized AR joint (as AR sampling does), and the unpenalized joint is far from it."""
    lm = shift_llama(canvas=4, gain=3.0, vocab=12)
    lm.eos_token_ids = []
    prompt, n, samples = [2, 5, 7], 3, 6000
    expected = exact_joint(lm, prompt, n, 1.5, 0.5).flatten() * samples
    plain = exact_joint(lm, prompt, n).flatten() * samples

    def counts(decoding: str, seed: int) -> torch.Tensor:
        out = lm.generate([prompt] * samples, n, seed=seed, decoding=decoding, temperature=1.0, **PENALTIES)
        tokens = out.sequences[:, len(prompt):len(prompt) + n]
        return torch.bincount((tokens * torch.tensor([144, 12, 1])).sum(dim=1), minlength=12 ** 3).double()

    verified = counts("verified", 0)
    assert chi_square_p(verified, expected) > 1e-3
    assert chi_square_p(counts("autoregressive", 1), expected) > 1e-3
    assert chi_square_p(verified, plain) < 1e-6
    unpenalized = first_tokens(lm, prompt, n, samples, "verified", 0)
    index = (unpenalized * torch.tensor([144, 12, 1])).sum(dim=1)
    assert chi_square_p(torch.bincount(index, minlength=12 ** 3).double(), expected) < 1e-6


def test_a_canvas_step_penalizes_the_committed_text_and_the_tokens_it_keeps():
    """A greedy canvas step whose two best tokens are one the committed text holds (7) and one the canvas keeps
    (5) writes neither under a presence penalty; the first token drawn from the causal pass neither."""
    vocab, mask = 10, 3
    settings = DiffusionSampling(sampler="greedy", acceptance="threshold", accept_probability=0.01,
                                 order="left_to_right", first_token="causal", max_denoising_steps=4, t_min=1.0,
                                 t_max=1.1, presence_penalty=2.0)
    fresh = start_canvas(1, 3, vocab, settings, None, torch.device("cpu"), mask, None)
    canvas = torch.tensor([[5, mask, mask]])
    state = dataclasses.replace(fresh, canvas=canvas, draft=canvas.clone(), step=1)
    logits = torch.zeros(1, 3, vocab)
    logits[..., 7], logits[..., 5], logits[..., 8] = 1.5, 1.2, 1.0
    counts = torch.zeros(1, vocab)
    counts[0, 7] = 1
    step = denoise_step(state, logits, settings, None, vocab_size=vocab, mask_token_id=mask, counts=counts,
                        sc_dtype=None)
    assert step.state.draft[0, 1:].tolist() == [8, 8]
    plain = denoise_step(state, logits, settings, None, vocab_size=vocab, mask_token_id=mask, sc_dtype=None)
    assert plain.state.draft[0, 1:].tolist() == [7, 7]
    first = first_from_causal(fresh, logits[:, :1], settings, None, mask_token_id=mask, counts=counts)
    assert int(first.canvas[0, 0]) == 5  # 7 is held; 5 is not kept yet in a fresh canvas


def test_each_decoding_in_the_engine_alone_draws_what_generate_draws_with_penalties():
    """Sampled, with penalties: an autoregressive, a verified and a canvas request, each alone on the engine,
    write what LM.generate writes for their seeds; a canvas request's penalties change its text."""
    lm = shift_llama(gain=3.0)
    cases = [(PROMPTS[0], "autoregressive", {"temperature": 1.0, **PENALTIES}, 3),
             (PROMPTS[1], "verified", {"temperature": 1.0, **PENALTIES}, 4),
             (PROMPTS[2], None, {"max_denoising_steps": 4, **PENALTIES}, 5),
             (PROMPTS[2], None, {"max_denoising_steps": 4}, 5)]
    got = []
    for prompt, decoding, options, seed in cases:
        out = lm.generate([prompt], 24, seed=seed, decoding=decoding, **options)
        want = lm.decode_new(out.sequences[0], len(prompt))[0][:24]
        engine = Engine(lm, pin_settled=False).start()
        try:
            inbox = queue.Queue()
            engine.submit(Request(prompt, 24, inbox.put, sampling=options, seed=seed, decoding=decoding))
            got.append(tokens_of(inbox))
        finally:
            engine.stop()
        assert got[-1] == want
    assert got[2] != got[3]
    with pytest.raises(GenerationError, match="presence_penalty must be a number in"):
        lm.generate([PROMPTS[0]], 4, presence_penalty=2.5)


def test_a_diffusion_models_generation_config_penalizes_its_canvases_not_its_causal_pass():
    """`smol`'s asset sets a presence penalty for its canvases; its AR and verified decodings stay the parent's."""
    from canvaslm.engine.lm import LM

    network = shift_llama().network
    lm = LM(network, None, "x", {"presence_penalty": 1.0, "t_max": 0.45, "t_min": 0.4})
    assert lm.diffusion_defaults.presence_penalty == 1.0
    assert lm.ar_defaults["presence_penalty"] == 0.0
    assert lm.resolve_sampling({}, "verified")["presence_penalty"] == 0.0
