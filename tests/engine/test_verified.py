"""Verified decoding: the canvas drafts, the causal pass checks. Lossless: greedy, the tokens are the model's own
autoregressive ones (batched prompts of different lengths, sliding windows, rows that accept different lengths);
sampling, the distribution of the first tokens is the AR one (a chi-square test that the plain canvas sampler
fails)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import canvaslm
from canvaslm.diffusion.sampling import penalize
from canvaslm.engine.lm import LM
from canvaslm.engine.verified import accept_greedy, accept_sampled, draft_size, verified_generate
from canvaslm.errors import GenerationError, UnsupportedError
from canvaslm.models import llama
from canvaslm.models.lora import LoRALinear, apply_lora
from tests.reference import tiny_checkpoint
from tests.train.toy_config import MODEL_INIT

PROMPTS = [[2, 10, 11, 12], [2, 20, 21, 22, 23, 24, 25, 26, 27, 28], [2, 30], [2, 5, 9, 13, 17, 4, 8]]


def shift_llama(canvas: int = 8, gain: float = 1.0, vocab: int = 32) -> LM:
    """The default model's layout (masked noise, shift, canvas-only adapters) on a tiny random Llama."""
    torch.manual_seed(0)
    config = llama.Config.from_hf({"model_type": "llama", **MODEL_INIT, "vocab_size": vocab, "eos_token_id": 1,
                                   "pad_token_id": 0}, "t")
    network = llama.Model(config).to_diffusion(canvas)
    network.config = dataclasses.replace(network.config, canvas_shift=True, mask_token_id=3, canvas_adapters=True)
    apply_lora(network, rank=2, alpha=4.0)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, LoRALinear):
                torch.nn.init.normal_(module.lora_B, std=0.2)
        network.embed_tokens.weight.mul_(gain)
    return LM(network.eval(), None, "shift")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> LM:
    path = tmp_path_factory.mktemp("dg")
    tiny_checkpoint(path, canvas_length=4, logit_gain=1.0)  # sliding window 6: shorter than the prompts
    return canvaslm.load(path, device="cpu")


@pytest.mark.parametrize("which", ["gemma", "shift_llama"])
def test_greedy_verified_equals_the_models_own_autoregressive_decoding(which, gemma):
    lm = gemma if which == "gemma" else shift_llama()
    for prompts in (PROMPTS, PROMPTS[1:2]):
        ar = lm.generate(prompts, 40, decoding="autoregressive", temperature=0.0)
        verified = lm.generate(prompts, 40, decoding="verified", temperature=0.0)
        assert torch.equal(verified.sequences, ar.sequences)
        assert bool((verified.forward_passes > 1).all())


@pytest.mark.parametrize("which", ["gemma", "shift_llama"])
def test_short_drafts_write_the_same_tokens(which, gemma):
    """A packed model drafts `small_pass_rows` tokens a round instead of a whole canvas (`draft_size`): fewer
    tokens a round, the same greedy tokens, in the library and in the serving engine (sliding layers included)."""
    import queue

    from canvaslm.engine.core import Engine
    from canvaslm.engine.request import Request

    lm = gemma if which == "gemma" else shift_llama()
    whole = lm.generate(PROMPTS, 40, decoding="verified", temperature=0.0)
    lm.network.small_pass_rows = 3
    try:
        assert draft_size(lm.network) == 3
        short = lm.generate(PROMPTS, 40, decoding="verified", temperature=0.0)
        assert torch.equal(short.sequences, whole.sequences)
        input_ids, valid = lm.batch(PROMPTS)
        out = verified_generate(lm.network, input_ids, valid, 40, temperature=0.0, eos_token_ids=[], pad_token_id=0)
        assert bool((out.new_tokens <= 3 * out.rounds).all())  # at most 2 drafts and the next token a round
        # before the engine starts: its thread and this one must not run the network at the same time
        alone = lm.generate([PROMPTS[1]], 40, decoding="autoregressive", temperature=0.0).sequences[0]
        engine = Engine(lm, pin_settled=False).start()
        try:
            inbox = queue.Queue()
            engine.submit(Request(PROMPTS[1], 40, inbox.put, sampling={"temperature": 0.0}, decoding="verified"))
            assert tokens_of(inbox) == lm.decode_new(alone, len(PROMPTS[1]))[0][:40]
        finally:
            engine.stop()
    finally:
        lm.network.small_pass_rows = None


def test_rows_stop_at_their_own_eos_and_budget():
    lm = shift_llama()
    ar = lm.generate(PROMPTS, 30, decoding="autoregressive", temperature=0.0)
    # pretend a token every row writes early is the end of turn: rows stop at different places
    eos = int(ar.sequences[0, -25])
    lm.eos_token_ids = [eos]
    try:
        ar = lm.generate(PROMPTS, 30, decoding="autoregressive", temperature=0.0)
        verified = lm.generate(PROMPTS, 30, decoding="verified", temperature=0.0)
    finally:
        lm.eos_token_ids = [1]
    assert torch.equal(verified.sequences, ar.sequences)
    assert bool((ar.sequences[:, -30:] == eos).any(dim=1).any())


def test_drafts_are_accepted_and_rows_accept_different_lengths():
    """The shift layout drafts the token after the anchor from the anchor's own position, as AR does: some drafts
    pass the check, and the rows of one batch keep different numbers of them (the cache rollback per row)."""
    lm = shift_llama()
    input_ids, valid = torch.tensor([[0] * 6 + PROMPTS[0], PROMPTS[1], [0] * 8 + PROMPTS[2]]), None
    valid = input_ids != 0
    out = verified_generate(lm.network, input_ids, valid, 48, temperature=0.0, eos_token_ids=[], pad_token_id=0)
    assert int(out.accepted.sum()) > 0 and len(set(out.accepted.tolist())) > 1
    assert bool((out.new_tokens == 48).all())
    assert torch.equal(out.forward_passes, 1 + 2 * out.rounds)
    # the rounds by accepted length add up to the rounds and the accepted drafts, and more than one length occurred
    lengths = out.accepted_lengths
    assert len(lengths) == draft_size(lm.network) and int(lengths.sum()) == int(out.rounds.sum())
    assert int((lengths * torch.arange(len(lengths))).sum()) == int(out.accepted.sum())
    assert int((lengths > 0).sum()) > 1


def test_the_acceptance_rules():
    logits = torch.full((2, 4, 5), -10.0)
    for row, best in enumerate([[1, 2, 3, 4], [1, 0, 3, 4]]):
        logits[row, torch.arange(4), torch.tensor(best)] = 0.0
    k, y = accept_greedy(torch.tensor([[1, 2, 3], [1, 2, 3]]), logits)
    assert k.tolist() == [3, 1] and y.tolist() == [4, 0]
    # p = q: every draft passes and the bonus comes from the last p
    p = torch.softmax(torch.randn(3, 4, 6), dim=-1)
    draft = torch.tensor([[0, 1, 2], [3, 4, 5], [1, 1, 1]])
    k, _ = accept_sampled(draft, p[:, :3], p, torch.Generator().manual_seed(0))
    assert k.tolist() == [3, 3, 3]
    # a draft token the check gives no mass is always rejected, and the replacement is never it
    p = torch.zeros(1, 2, 3)
    p[0, :, 1] = 1.0
    q = torch.full((1, 1, 3), 1 / 3)
    for seed in range(5):
        k, y = accept_sampled(torch.tensor([[0]]), q, p, torch.Generator().manual_seed(seed))
        assert k.tolist() == [0] and y.tolist() == [1]


def tokens_of(inbox) -> list[int]:
    """The tokens an engine request sent to `inbox` (a queue.Queue), once it finished."""
    from canvaslm.engine.output import Finished, Tokens

    events = [inbox.get(timeout=60)]
    while not isinstance(events[-1], Finished):
        events.append(inbox.get(timeout=60))
    return [t for e in events if isinstance(e, Tokens) for t in e.ids]


def first_tokens(lm: LM, prompt: list[int], n: int, samples: int, decoding: str, seed: int) -> torch.Tensor:
    out = lm.generate([prompt] * samples, n, seed=seed, decoding=decoding, temperature=1.0)
    return out.sequences[:, len(prompt):len(prompt) + n]


def exact_joint(lm: LM, prompt: list[int], n: int, presence: float = 0.0, frequency: float = 0.0,
                no_token_twice: bool = False) -> torch.Tensor:
    """p(t_1 .. t_n | prompt) of the causal pass sampled at temperature 1 (with these penalties, `penalize`; with
    every token the answer holds banned, `no_repeat_ngram_size` = 1) for every sequence of n tokens, [V] * n."""
    vocab = lm.network.vocab_size
    grid = torch.cartesian_prod(*[torch.arange(vocab)] * n).reshape(-1, n)
    ids = torch.cat([torch.tensor(prompt).expand(len(grid), -1), grid], dim=1)
    with torch.inference_mode():
        cache = lm.network.new_cache(len(ids))
        logits = lm.network.logits(lm.network.encode(ids, cache, torch.ones_like(ids, dtype=torch.bool)))
        logits = logits.float()[:, len(prompt) - 1:-1]                                         # [N, n, V]
    held = torch.nn.functional.one_hot(grid, vocab).float().cumsum(dim=1)
    held = torch.cat([torch.zeros_like(held[:, :1]), held[:, :-1]], dim=1)  # position i holds the tokens before it
    logits = penalize(logits, held, presence, frequency)
    if no_token_twice:
        logits = logits.masked_fill(held > 0, float("-inf"))
    log_probs = logits.log_softmax(dim=-1)
    joint = log_probs.gather(2, grid[:, :, None]).squeeze(2).sum(dim=1).exp()
    return joint.reshape([vocab] * n)


def chi_square_p(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test, cells with expected count < 5 pooled into one."""
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]]).double()
    wanted = torch.cat([expected[big], expected[~big].sum()[None]]).double()
    observed, wanted = observed[wanted > 0], wanted[wanted > 0]
    statistic = float(((observed - wanted) ** 2 / wanted).sum())
    dof = len(wanted) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def test_sampled_verified_tokens_have_the_autoregressive_distribution():
    """Three tokens after a prompt, 6000 draws: the verified sampler fits the causal pass's exact joint (and so
    does plain AR sampling, the control); the canvas sampler, which draws a block's tokens independently, does
    not. A tiny vocabulary (12) with peaked logits makes the dependence between tokens strong."""
    lm = shift_llama(canvas=4, gain=3.0, vocab=12)
    lm.eos_token_ids = []
    prompt, n, samples = [2, 5, 7], 3, 6000
    joint = exact_joint(lm, prompt, n)
    expected = joint.flatten() * samples

    def p_value(tokens: torch.Tensor) -> float:
        index = (tokens * torch.tensor([144, 12, 1])).sum(dim=1)
        return chi_square_p(torch.bincount(index, minlength=12 ** 3).double(), expected)

    assert p_value(first_tokens(lm, prompt, n, samples, "verified", 0)) > 1e-3
    assert p_value(first_tokens(lm, prompt, n, samples, "autoregressive", 1)) > 1e-3
    diffusion = lm.generate([prompt] * samples, n, seed=2, decoding="diffusion", max_denoising_steps=1,
                            t_max=1.0, t_min=0.5, entropy_bound=100.0)
    assert p_value(diffusion.sequences[:, len(prompt):len(prompt) + n]) < 1e-6


def test_decoding_modes_are_checked(gemma, tmp_path):
    with pytest.raises(GenerationError, match="decoding must be one of"):
        gemma.generate([PROMPTS[0]], 4, decoding="speculative")
    from canvaslm.diffusion.step import Constraint

    with pytest.raises(UnsupportedError, match="need diffusion decoding"):
        gemma.generate_steps([PROMPTS[0]], 4, constraint=Constraint(torch.tensor([[-1, 5, -1, -1]])),
                             decoding="verified").__next__()
    with pytest.raises(GenerationError, match="take"):
        gemma.generate([PROMPTS[0]], 4, decoding="verified", entropy_bound=0.5)
    ar = LM(llama.Model(llama.Config.from_hf({"model_type": "llama", **MODEL_INIT}, "t")).eval(), None, "ar")
    with pytest.raises(UnsupportedError, match="needs a block-diffusion model"):
        ar.generate([PROMPTS[0]], 4, decoding="verified")
    assert ar.generate([PROMPTS[0]], 4, decoding="autoregressive", temperature=0.0).sequences.shape[1] == 8


def test_the_serving_engine_runs_every_decoding_of_a_diffusion_model_side_by_side():
    """Verified, autoregressive and diffusion requests on one engine: each alone writes what LM.generate writes
    for its seed and decoding (greedy and sampled), and verified rows that accept different lengths share passes."""
    import queue

    from canvaslm.engine.core import Engine
    from canvaslm.engine.request import Request

    lm = shift_llama()
    cases = [(PROMPTS[0], "verified", {"temperature": 0.0}, 0), (PROMPTS[1], "verified", {"temperature": 1.0}, 3),
             (PROMPTS[2], "autoregressive", {"temperature": 1.0}, 5), (PROMPTS[3], "verified", {"temperature": 0.0}, 1),
             (PROMPTS[3], None, {}, 2)]
    expected = []
    for prompt, decoding, options, seed in cases:
        out = lm.generate([prompt], 24, seed=seed, decoding=decoding, **options)
        expected.append(lm.decode_new(out.sequences[0], len(prompt))[0][:24])
    batches = []
    engine = Engine(lm, pin_settled=False, on_step=lambda b, _: batches.append(b), max_draft_batch=8).start()
    try:
        inboxes = [queue.Queue() for _ in cases]
        for inbox, (prompt, decoding, options, seed) in zip(inboxes, cases, strict=True):
            engine.submit(Request(prompt, 24, inbox.put, sampling=options, seed=seed, decoding=decoding))
        for inbox, want in zip(inboxes, expected, strict=True):
            assert tokens_of(inbox) == want
    finally:
        engine.stop()
    assert max(batches) >= 3  # the three verified requests in one pass
    with pytest.raises(UnsupportedError, match="verified decoding cannot see"):
        Engine(lm).submit(Request(PROMPTS[0], 8, print, suffix=[5, 6], decoding="verified"))
    with pytest.raises(GenerationError, match="apply to autoregressive"):
        Engine(lm).submit(Request(PROMPTS[0], 8, print, sampling={"temperature": 0.5}))


def test_more_verified_sequences_than_max_draft_batch_take_autoregressive_steps_of_the_same_distribution():
    """Above `max_draft_batch` running sequences a verified step is one AR step for all (a draft's rows cost on a
    CPU): greedy, the AR tokens still, with rounds only for a sequence alone; sampled, a verified request that
    never drafts writes what an autoregressive request with its seed writes, token for token."""
    import queue

    from canvaslm.engine.core import Engine
    from canvaslm.engine.request import Request

    lm = shift_llama()

    def served(cases, **engine_options):
        """Each case's tokens (prompt, budget, decoding, options, seed), all submitted before the engine's first
        step; the kept drafts of each verified round (a list per round); the rows of each pass."""
        rounds, passes = [], []
        engine = Engine(lm, pin_settled=False, on_verified=lambda kept, _: rounds.append(kept),
                        on_step=lambda rows, _: passes.append(rows), **engine_options).start()
        try:
            inboxes = [queue.Queue() for _ in cases]
            with engine._wake:  # the engine thread waits on this lock: it admits them all at once
                for inbox, (prompt, budget, decoding, options, seed) in zip(inboxes, cases, strict=True):
                    engine.submit(Request(prompt, budget, inbox.put, sampling=options, seed=seed, decoding=decoding,
                                          ignore_eos=True))
            return [tokens_of(inbox) for inbox in inboxes], rounds, passes
        finally:
            engine.stop()

    greedy = [(PROMPTS[i], budget, "verified", {"temperature": 0.0}, 0) for i, budget in enumerate((8, 16, 40))]
    got, rounds, passes = served(greedy, max_draft_batch=1)
    want, _, _ = served([(p, n, "autoregressive", o, s) for p, n, _, o, s in greedy])
    assert got == want and [len(t) for t in got] == [8, 16, 40]
    assert rounds and all(len(kept) == 1 for kept in rounds)  # only the last one, alone, drafted
    assert 3 in passes and 2 in passes  # one AR pass over all three, then over two
    _, rounds, _ = served(greedy, max_draft_batch=3)
    assert max(len(kept) for kept in rounds) == 3  # under the limit all three draft, in one round

    sampled = [(PROMPTS[i], 24, "verified", {"temperature": 1.0}, 7 + i) for i in range(2)]
    got, rounds, _ = served(sampled, max_draft_batch=1)
    want, _, _ = served([(p, n, "autoregressive", o, s) for p, n, _, o, s in sampled])
    assert got == want and not rounds
    with pytest.raises(GenerationError, match="max_draft_batch must be >= 1"):
        Engine(lm, max_draft_batch=0)
    assert Engine(lm)._runners["verified"].max_draft_batch == 1  # this CPU's default


def test_chunked_prompts_give_the_same_verified_tokens(gemma, monkeypatch):
    """Prompts encoded in chunks of 3 positions (longer than the sliding window in all): still the AR tokens."""
    from canvaslm.models import cache

    whole = gemma.generate(PROMPTS, 24, decoding="verified", temperature=0.0).sequences
    monkeypatch.setattr(cache.encode_chunked, "__defaults__", (3,))
    assert torch.equal(gemma.generate(PROMPTS, 24, decoding="verified", temperature=0.0).sequences, whole)
    assert torch.equal(gemma.generate(PROMPTS, 24, decoding="autoregressive", temperature=0.0).sequences, whole)


def test_verified_requests_joining_a_running_batch_on_sliding_window_layers(gemma):
    """DiffusionGemma's sliding layers through the engine's verified runner: requests join the shared cache after
    others have rolled back checks (stacked with slack), and each still writes LM.generate's tokens."""
    import queue
    import time

    from canvaslm.engine.core import Engine
    from canvaslm.engine.request import Request

    expected = [gemma.decode_new(gemma.generate([p], 30, decoding="verified", temperature=0.0).sequences[0],
                                 len(p))[0][:30] for p in PROMPTS]
    engine = Engine(gemma, pin_settled=False, max_draft_batch=8).start()  # rounds, not AR steps, while joining
    try:
        inboxes = []
        for prompt in PROMPTS:
            inbox = queue.Queue()
            engine.submit(Request(prompt, 30, inbox.put, sampling={"temperature": 0.0}, decoding="verified"))
            inboxes.append(inbox)
            time.sleep(0.05)  # later requests join while the first ones are mid-way
        for inbox, want in zip(inboxes, expected, strict=True):
            assert tokens_of(inbox) == want
    finally:
        engine.stop()


def test_a_grammar_llguidance_refuses_is_refused_on_submit():
    from canvaslm.engine.core import Engine
    from canvaslm.engine.guided import GuidedDecodingError
    from canvaslm.engine.request import Request

    lm = canvaslm.load("smol-ar")
    with pytest.raises(GuidedDecodingError, match="refused the grammar"):
        Engine(lm).submit(Request([1, 2], 8, print, grammar="start: ((("))
