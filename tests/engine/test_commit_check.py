"""`commit_check`: the causal pass that commits a canvas drops the first token after the canvas's first that it gives
less than the threshold, with the rest of the canvas. Checked here on the default model's layout (a tiny random
shift-trained Llama, canvases of 4), against an independent causal pass over each finished answer: no kept token is
under the threshold, rows of one batch keep different lengths at their own positions, a threshold that never fires
changes nothing, and the engine serves and streams what LM.generate writes."""

from __future__ import annotations

import pytest
import torch

from canvaslm.diffusion.generate import CanvasCommitted, DiffusionResult, commit_check
from canvaslm.diffusion.step import Constraint
from canvaslm.engine.core import Engine
from canvaslm.errors import GenerationError
from tests.engine.test_batching import LEFT_TO_RIGHT, PROMPTS, alone_and_together, received, run, shift_lm

SETTINGS = dict(LEFT_TO_RIGHT, first_token="causal")
EPS = 0.05  # the random model gives its 32 tokens ~1/32 each: some canvases pass whole, most drop something


@pytest.fixture(scope="module")
def lm():
    return shift_lm()


def causal_probabilities(lm, prompt: list[int], answer: list[int]) -> list[float]:
    """The probability the model's causal pass, run once over prompt + answer from an empty cache, gives each
    answer token after the text before it."""
    ids = torch.tensor([prompt + answer])
    with torch.inference_mode():
        hidden = lm.network.encode(ids, lm.network.new_cache(1), torch.ones_like(ids, dtype=torch.bool))
        logits = lm.network.logits(hidden).float()
    probs = logits[0, len(prompt) - 1:-1].softmax(-1)
    return probs.gather(-1, torch.tensor(answer)[:, None])[:, 0].tolist()


def commits(lm, prompts: list[list[int]], max_new_tokens: int, seed: int, settings=SETTINGS, **options):
    """Per row, the canvases it kept (lists of tokens, each canvas's first token first), and the result."""
    rows: list[list[list[int]]] = [[] for _ in prompts]
    for event in lm.generate_steps(prompts, max_new_tokens, seed=seed, **settings, **options):
        if isinstance(event, CanvasCommitted):
            for b, row in enumerate(rows):
                kept = event.tokens.shape[1] if event.kept is None else int(event.kept[b])
                if kept:
                    row.append(event.tokens[b, :kept].tolist())
        elif isinstance(event, DiffusionResult):
            return rows, event
    raise AssertionError("no result")


def test_no_token_after_a_canvas_first_is_kept_under_the_threshold_and_rows_keep_their_own_lengths(lm):
    """A batch of 3 prompts: every kept token after its canvas's first has probability >= EPS under a fresh causal
    pass over the row's answer alone (so each row's positions in the shared, rolled-back cache were its own), the
    rows' canvases are cut at different lengths, and the answers are what the canvases kept, in order. The same
    seed without the check keeps tokens under EPS, which the assertion would catch."""
    prompts, dropped_somewhere = PROMPTS[:3], False
    for seed in range(3):
        rows, result = commits(lm, prompts, 16, seed, commit_check=EPS)
        for b, (prompt, canvases) in enumerate(zip(prompts, rows, strict=True)):
            answer = [t for canvas in canvases for t in canvas]
            generated = result.sequences[b, max(map(len, prompts)):].tolist()
            assert generated[:len(answer)] == answer and set(generated[len(answer):]) <= {lm.pad_token_id}
            assert len(answer) >= 16
            assert int(result.commit_passes[b]) == len(canvases)  # one causal pass checked each canvas it kept from
            probs = causal_probabilities(lm, prompt, answer)
            start = 0
            for canvas in canvases:
                assert all(p >= EPS * 0.999 for p in probs[start + 1:start + len(canvas)]), (seed, b, canvas)
                start += len(canvas)
            dropped_somewhere |= any(len(c) < 4 for c in canvases[:-1])
        kept_lengths = {tuple(len(c) for c in canvases) for canvases in rows}
        assert len(kept_lengths) > 1  # the rows went their own ways
    assert dropped_somewhere

    rows, _ = commits(lm, prompts, 16, 0)
    under = [p < EPS for b, canvases in enumerate(rows)
             for p in causal_probabilities(lm, prompts[b], [t for c in canvases for t in c])[1:]]
    assert any(under)


def test_rows_roll_back_on_sliding_window_layers(tmp_path):
    """A tiny DiffusionGemma (canvases of 8, a sliding window of 6, no shift, the reference's sampler): rows of a
    batch cut their canvases at different lengths, and a fresh causal pass over each answer still finds every kept
    token after a canvas's first at or above the threshold, so the window's keys a rollback restores were the right
    ones. (Its random causal pass is sure of one token at a time: the threshold is tiny.)"""
    import canvaslm
    from tests.reference import tiny_checkpoint

    tiny_checkpoint(tmp_path, canvas_length=8)
    gemma, least = canvaslm.load(tmp_path, device="cpu"), 1e-9
    prompts = PROMPTS[:3]
    rows, result = commits(gemma, prompts, 24, 0, settings={}, commit_check=least)
    assert len({tuple(map(len, canvases)) for canvases in rows}) == 3
    assert any(1 < len(c) < 8 for canvases in rows for c in canvases)  # cut inside a canvas
    assert result.commit_passes.tolist() == [len(canvases) for canvases in rows]
    for prompt, canvases in zip(prompts, rows, strict=True):
        answer = [t for canvas in canvases for t in canvas]
        probs = causal_probabilities(gemma, prompt, answer)
        start = 0
        for canvas in canvases:
            ends = [i for i, t in enumerate(canvas) if t in gemma.eos_token_ids]
            checked = ends[0] + 1 if ends else len(canvas)  # the pad after a row's EOS is not text
            assert all(p >= least * 0.99 for p in probs[start + 1:start + checked]), canvas
            start += len(canvas)


def test_a_threshold_that_never_fires_changes_nothing(lm):
    """The check encodes each canvas before it is yielded, rolls nothing back and draws nothing: the tokens and the
    decoder passes are those without it, in a batch and alone."""
    for prompts in (PROMPTS[:1], PROMPTS[:3]):
        off = lm.generate(prompts, 12, seed=1, **SETTINGS)
        on = lm.generate(prompts, 12, seed=1, commit_check=1e-30, **SETTINGS)
        assert torch.equal(off.sequences, on.sequences)
        assert torch.equal(off.forward_passes, on.forward_passes)


def test_a_constraint_is_never_checked_and_a_model_without_a_pad_token_is_refused(lm):
    """Pins sit at fixed positions of the canvases, so a constrained generation runs as without the check; a model
    with no pad token cannot fill what a row drops, and says so."""
    pins = torch.tensor([[-1, -1, 7, -1, -1, -1, -1, 9]])
    off = lm.generate_steps([PROMPTS[0]], 8, seed=2, constraint=Constraint(pins), **SETTINGS)
    on = lm.generate_steps([PROMPTS[0]], 8, seed=2, constraint=Constraint(pins), commit_check=0.4, **SETTINGS)
    assert torch.equal(list(off)[-1].sequences, list(on)[-1].sequences)
    lm.pad_token_id, pad = None, lm.pad_token_id
    try:
        with pytest.raises(GenerationError, match="commit_check needs the model's pad token"):
            lm.generate([PROMPTS[0]], 8, seed=0, commit_check=EPS, **SETTINGS)
    finally:
        lm.pad_token_id = pad


def test_the_rule_keeps_up_to_the_first_checked_token_under_the_threshold():
    """commit_check on hand-made logits: position 0 is never checked, unchecked positions (after an EOS, held) pass,
    and a threshold per row is read per row."""
    tokens = torch.tensor([[5, 1, 2, 3], [5, 1, 2, 3], [5, 1, 2, 3]])
    given = torch.tensor([0.9, 0.05, 0.9])  # what row i gives token i + 1: token 2 (position 2) is the unlikely one
    probs = ((1 - given[:, None]) / 7).expand(3, 8).clone()
    probs[[0, 1, 2], [1, 2, 3]] = given
    probs = probs.expand(3, 3, 8)
    checked = torch.ones(3, 4, dtype=torch.bool)
    checked[1, 2] = False
    kept = commit_check(probs.log(), tokens, checked, torch.tensor([0.1, 0.1, 0.01]))
    assert kept.tolist() == [2, 4, 4]
    assert commit_check(probs.log(), tokens, checked, 0.1).tolist() == [2, 4, 2]


@pytest.mark.parametrize("pin", [False, True])
def test_the_engine_serves_and_streams_only_what_the_check_kept(lm, pin):
    """Requests with the check, alone or sharing steps with one without it, get LM.generate's tokens, rows of the
    batch rolled back by different lengths; with settled-prefix streaming on, a checked request's text is sent at
    its commits only, so nothing sent is ever dropped."""
    checked = dict(SETTINGS, commit_check=EPS)
    if not pin:
        alone, together = alone_and_together(lm, [checked, SETTINGS, checked])
        assert together == alone
        assert alone[0] != lm.decode_new(lm.generate([PROMPTS[0]], 12, seed=0, **SETTINGS).sequences[0],
                                         len(PROMPTS[0]))[0][:12]  # the check changed the answer
        return
    engine = Engine(lm, pin_settled=True).start()
    try:
        for seed, prompt in enumerate(PROMPTS[:3]):
            expected = lm.decode_new(lm.generate([prompt], 12, seed=seed, **checked).sequences[0], len(prompt))[0]
            tokens, _, _ = run(engine, [dict(prompt=prompt, max_new_tokens=12, seed=seed, sampling=checked)])[0]
            assert tokens == expected[:12]
    finally:
        engine.stop()


def test_drop_ends_a_canvas_at_a_token_equal_to_the_one_before_it_but_not_at_position_one():
    """adjacent_repeats = "drop" on hand-made logits that pass every token: a canvas is cut at the second of two equal
    neighbours drawn in the pass (positions 1 and up), not at a position 1 equal to the canvas's first token (which
    the decoder saw), not at an unchecked position, and only in the rows that ask for it."""
    tokens = torch.tensor([[5, 1, 1, 3], [5, 5, 2, 3], [5, 1, 2, 2], [5, 1, 1, 3], [5, 1, 1, 3]])
    logits = torch.zeros(5, 3, 8)  # every token 1/8: above the threshold
    checked = torch.ones(5, 4, dtype=torch.bool)
    checked[4, 2:] = False
    drop = torch.tensor([True, True, True, False, True])
    assert commit_check(logits, tokens, checked, 0.01, drop).tolist() == [2, 4, 3, 4, 4]
    assert commit_check(logits, tokens, checked, 0.01).tolist() == [4, 4, 4, 4, 4]


def test_through_the_loop_and_the_engine_drop_leaves_no_doubled_token_inside_a_canvas(lm):
    """With a check that never fires on probability, adjacent_repeats = "drop" keeps no canvas holding two equal
    neighbours after its first token, while "keep" on the same seeds does keep some (so the assertion can fail),
    and the engine serves LM.generate's tokens with it. Without the check it is refused."""
    def doubled(canvases):
        return any(c[i] == c[i - 1] for c in canvases for i in range(2, len(c)))

    prompts, found = PROMPTS[:3], False
    for seed in range(4):
        rows, _ = commits(lm, prompts, 24, seed, commit_check=1e-30, adjacent_repeats="drop")
        assert not any(doubled(canvases) for canvases in rows)
        rows, _ = commits(lm, prompts, 24, seed, commit_check=1e-30)
        found |= any(doubled(canvases) for canvases in rows)
    assert found
    checking = dict(SETTINGS, commit_check=1e-30)
    dropping = dict(checking, adjacent_repeats="drop")
    alone, together = alone_and_together(lm, [checking, dropping, SETTINGS])
    assert together == alone
    kept = lm.decode_new(lm.generate([PROMPTS[1]], 12, seed=1, **checking).sequences[0], len(PROMPTS[1]))[0][:12]
    assert alone[1] != kept  # the rule changed the second request's answer, which the engine then served
    with pytest.raises(GenerationError, match="adjacent_repeats = 'drop' is done by the commit check"):
        lm.generate([PROMPTS[0]], 8, seed=0, adjacent_repeats="drop", **SETTINGS)


def test_under_a_constraint_drop_waits_instead_in_the_loop_and_the_engine(lm):
    """A constrained canvas is never checked, so a doubled token that "drop" leaves to the check waits for a pass
    that sees its neighbour ("wait") instead, in LM.generate and in the engine. The seed is one where "keep" writes a
    doubled token that "wait" does not, so the fallback shows."""
    pins = torch.tensor([[-1, -1, 7, -1, -1, -1, -1, 9, -1, -1, -1, -1, -1, -1, -1, -1]])
    one_pass = dict(SETTINGS, accept_probability=0.01)  # the random model's ~1/32 passes it: whole canvases at once

    def written(**options):
        result = list(lm.generate_steps([PROMPTS[1]], 16, seed=4, constraint=Constraint(pins), **one_pass,
                                        **options))[-1]
        return result.sequences[0, len(PROMPTS[1]):].tolist()

    waiting, kept = written(adjacent_repeats="wait"), written()
    assert waiting != kept and any(a == b for a, b in zip(kept, kept[1:]))
    assert written(adjacent_repeats="drop", commit_check=0.4) == waiting
    engine = Engine(lm, pin_settled=False).start()
    try:
        sampling = dict(one_pass, adjacent_repeats="drop", commit_check=0.4)
        tokens, _, _ = run(engine, [dict(prompt=PROMPTS[1], max_new_tokens=16, seed=4, sampling=sampling,
                                         constraint=Constraint(pins))])[0]
    finally:
        engine.stop()
    assert tokens == lm.decode_new(torch.tensor(PROMPTS[1] + waiting), len(PROMPTS[1]))[0]


def test_above_max_draft_batch_checked_canvases_hold_one_token_the_causal_passes(lm):
    """While more than `max_draft_batch` checked sequences run, each new canvas holds one token, drawn from the
    causal pass that committed the text before it: an AR step, with no decoder pass (vLLM stops drafting above a
    batch size; a canvas costs two passes of its size). Three requests admitted at once under the limit 1: the two
    shorter write exactly what LM.generate writes in canvases of one token for their seeds, at one pass a token;
    the longest writes the same while the others run, then, alone, drafts canvases of 4 (decoder passes of one
    row). Under the limit 3 every one drafts and writes its default canvases."""
    import queue

    from canvaslm.engine.request import Request

    import copy

    lm = copy.copy(lm)
    lm.eos_token_ids = [lm.network.vocab_size]  # an end-of-turn no token is: every answer runs to its budget
    checked, budgets = dict(SETTINGS, commit_check=EPS), (8, 12, 24)

    def served(limit):
        rows = []
        engine = Engine(lm, pin_settled=False, max_draft_batch=limit, on_step=lambda n, _: rows.append(n)).start()
        try:
            inboxes = [queue.Queue() for _ in budgets]
            with engine._wake:  # the engine thread waits on this lock: it admits all three at once
                for i, (inbox, budget) in enumerate(zip(inboxes, budgets, strict=True)):
                    engine.submit(Request(PROMPTS[i], budget, inbox.put, sampling=checked, seed=i))
            results = [received(inbox)[:2] for inbox in inboxes]
        finally:
            engine.stop()
        return results, rows[1:]  # the first timed pass is the prompts'

    def generated(i, **options):
        out = lm.generate([PROMPTS[i]], budgets[i], seed=i, **dict(checked, **options))
        return out.sequences[0, len(PROMPTS[i]):].tolist(), int(out.forward_passes[0])

    results, decoder_rows = served(1)
    for i in (0, 1):
        tokens, passes = generated(i, canvas_size=1)
        assert results[i][0] == tokens and passes == results[i][1].forward_passes == budgets[i]  # a pass a token
    alone = generated(2, canvas_size=1)[0]
    assert results[2][0][:budgets[1]] == alone[:budgets[1]] and len(results[2][0]) == budgets[2]
    assert decoder_rows and set(decoder_rows) == {1}  # the last one drafted, alone, once the others were done

    results, decoder_rows = served(3)
    assert [tokens for tokens, _ in results] == [generated(i)[0][:budgets[i]] for i in range(3)]
    assert 3 in decoder_rows
    assert Engine(lm)._runners["diffusion"].max_draft_batch == 1  # this CPU's default, verified decoding's


def test_a_checked_canvas_of_one_token_is_encoded_only_if_its_sequence_goes_on(lm):
    """A checked canvas of one token (an AR step under load) holds nothing to check, so the engine encodes it only
    when its sequence goes on, as the AR runner never encodes the last token: the same number of causal passes
    as decoding="autoregressive" for the same budget (the prompt's and one a token after the first), and the tokens
    LM.generate writes in canvases of one."""
    import copy

    lm = copy.copy(lm)
    lm.eos_token_ids = [lm.network.vocab_size]  # no token ends a turn: every answer runs to its budget
    network, calls = lm.network, []
    encode = network.encode

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return encode(*args, **kwargs)

    sampling = dict(SETTINGS, commit_check=EPS, canvas_size=1)
    network.encode = counted
    try:
        engine = Engine(lm, pin_settled=False).start()
        try:
            served = {}
            for decoding in (None, "autoregressive"):
                calls.clear()
                tokens, finished, _ = run(engine, [dict(prompt=PROMPTS[0], max_new_tokens=6, seed=2, decoding=decoding,
                                                        sampling=sampling if decoding is None else {})])[0]
                served[decoding] = (tokens, len(calls))
        finally:
            engine.stop()
    finally:
        del network.encode
    budget = 6
    assert served[None][1] == served["autoregressive"][1] == budget  # the prompt's pass + budget - 1 steps
    expected = lm.generate([PROMPTS[0]], budget, seed=2, **sampling).sequences[0, len(PROMPTS[0]):].tolist()
    assert served[None][0] == lm.decode_new(torch.tensor(PROMPTS[0] + expected), len(PROMPTS[0]))[0]


@pytest.mark.parametrize("check", [0.0, EPS])
def test_a_canvas_of_one_token_is_an_ar_step_with_no_decoder_pass(lm, check, monkeypatch):
    """`canvas_size = 1` with the first token from the causal pass: every canvas is that token, so no decoder pass
    runs (each commit counts as the canvas's pass), and near temperature 0 the answer is the greedy AR answer of the
    same weights' causal pass, checked or not (a canvas of one has no position to check). Its commits count once,
    as its forward passes, so tokens a pass with the commits counted are 1 as well."""
    greedy = lm.generate([PROMPTS[1]], 12, decoding="autoregressive", temperature=0.0)
    decoded = []
    monkeypatch.setattr(lm.network, "decode", lambda *a, **k: decoded.append(1))
    out = lm.generate([PROMPTS[1]], 12, seed=0, **dict(SETTINGS, canvas_size=1, commit_check=check,
                                                         first_token_temperature=1e-6))
    assert not decoded and int(out.forward_passes[0]) == 12 and int(out.commit_passes[0]) == 0  # counted once
    assert out.sequences[0, :len(PROMPTS[1]) + 12].tolist() == greedy.sequences[0].tolist()
