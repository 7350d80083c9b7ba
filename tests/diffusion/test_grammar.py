"""Slot grammars on a hand-made vocabulary: the lifted token tables, the allowed tokens per position and the
Viterbi projection (always grammatical, and the most probable grammatical path)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from canvaslm.diffusion.grammar import (INTEGER, NUMBER, STRING, TokenGrammar, bounded_string, literals, number_range,
                                      token_texts)

TEXTS = ['"', "a", "b", " ", "1", "0", "-", ".", 'ab"', '"x', "12", None, "\\", 'a" ', "tr", "ue", "true"]


def paths(grammar: TokenGrammar, length: int) -> list[tuple[int, ...]]:
    """Every accepted token path of exactly `length` tokens (brute force)."""
    out = []
    for path in itertools.product(range(len(TEXTS)), repeat=length):
        state = grammar.start
        for t in path:
            state = int(grammar.table[state, t])
            if state < 0:
                break
        if state in grammar.accepting:
            out.append(path)
    return out


@pytest.mark.parametrize("make, length", [
    (lambda: TokenGrammar.lift(STRING, TEXTS), 3), (lambda: TokenGrammar.lift(INTEGER, TEXTS), 3),
    (lambda: TokenGrammar.lift(NUMBER, TEXTS), 3), (lambda: TokenGrammar.lift(literals(['"ab"', "true"]), TEXTS), 3),
    (lambda: bounded_string(TEXTS, 1, 3), 3)])
def test_allowed_tokens_and_projection_agree_with_brute_force(make, length):
    grammar = make()
    valid = paths(grammar, length)
    assert valid
    allowed = grammar.allowed_tokens(length)
    for p in range(length):
        assert set(allowed[p].nonzero().flatten().tolist()) == {path[p] for path in valid}
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        log_probs = torch.randn(length, len(TEXTS), generator=generator).log_softmax(-1)
        best = grammar.project(log_probs)
        def score(path, log_probs=log_probs):
            return sum(float(log_probs[p, t]) for p, t in enumerate(path))
        assert tuple(best) in valid and score(best) == pytest.approx(max(map(score, valid)))


def test_grammatical_values_parse_as_json():
    grammar = TokenGrammar.lift(NUMBER, TEXTS)
    for path in paths(grammar, 3):
        json.loads("".join(TEXTS[t] for t in path))
    for strings in (TokenGrammar.lift(STRING, TEXTS), bounded_string(TEXTS, 0, 64)):
        for path in paths(strings, 3):
            json.loads('"' + "".join(TEXTS[t] for t in path))


def test_bounded_strings_count_characters():
    grammar = bounded_string(TEXTS, 2, 3)
    for path in paths(grammar, 3):
        value = json.loads('"' + "".join(TEXTS[t] for t in path))
        assert 2 <= len(value) <= 3
    # the counted grammar accepts exactly the unbounded one's paths whose value has 2..3 characters
    unbounded = [p for p in paths(TokenGrammar.lift(STRING, TEXTS), 3)
                 if 2 <= len(json.loads('"' + "".join(TEXTS[t] for t in p))) <= 3]
    assert sorted(paths(grammar, 3)) == sorted(unbounded)


def test_a_slot_too_short_for_any_value_has_no_projection():
    grammar = TokenGrammar.lift(literals(['"abc"']), ['"', "a", "b", "c", " "])
    assert not grammar.fits(2) and grammar.project(torch.zeros(2, 5)) is None
    assert grammar.fits(5) and grammar.fits(6)


def test_token_texts_keep_leading_spaces_and_drop_specials():
    vocab = {0: "<s>", 1: "x", 2: " y", 3: "\ufffd"}
    decode = lambda ids: "".join("" if vocab[i] == "<s>" else vocab[i] for i in ids)  # noqa: E731
    assert token_texts(decode, 4, anchor=1) == [None, "x", " y", None]


def _accepts(automaton, text: str) -> bool:
    state = automaton.start
    for char in text:
        state = automaton.step(state, char)
        if state < 0:
            return False
    return state in automaton.accepting


@pytest.mark.parametrize("low, high", [(0, 120), (18, 99), (1900, 2030), (-15, 7), (-300, -20), (5, None),
                                       (None, 42), (None, None), (0, 0), (100, 1000)])
@pytest.mark.parametrize("fraction", [False, True])
def test_number_range_accepts_exactly_the_integers_in_range(low, high, fraction):
    automaton = number_range(low, high, fraction=fraction)
    for value in range(-1100, 2200):
        inside = (low is None or value >= low) and (high is None or value <= high)
        assert _accepts(automaton, str(value)) == inside, value
        assert _accepts(automaton, f"{value}  ") == inside  # filler after the value
    for text in ("00", "-0", "01", "1-", "--1", "", "-", "1.", ".5", "1e3"):
        assert not _accepts(automaton, text), text


@pytest.mark.parametrize("low, high", [(0, 10), (-3, 2), (1, None), (None, -2), (0, 1), (5, 5)])
def test_number_range_fractions_are_always_inside_the_range(low, high):
    automaton = number_range(low, high, fraction=True)
    accepted = 0
    for whole in range(-20, 20):
        for text in (f"{whole}.5", f"{whole}.05", f"{whole}.999"):
            if _accepts(automaton, text):
                accepted += 1
                value = float(text)
                assert (low is None or value >= low) and (high is None or value <= high), text
    # [I, I + 1) inside the range is allowed: e.g. 0.5 for [0, 10], -2.5 for [-3, 2]
    assert accepted > 0 or high == low
    assert not _accepts(number_range(0, 10), "0.5")  # integers only without `fraction`


def test_number_range_lifts_over_tokens_and_projects_a_value_in_range():
    texts = [str(d) for d in range(10)] + ["-", ".", " ", "12", "99", "a", None]
    grammar = TokenGrammar.lift(number_range(18, 99), texts)
    assert grammar.fits(3)
    log_probs = torch.full((3, len(texts)), -10.0)
    log_probs[0, 1] = 0.0  # the model wants "1" then "2" (12, below the minimum)
    log_probs[1, 2] = 0.0
    tokens = grammar.project(log_probs)
    value = int("".join(texts[t] for t in tokens).strip())
    assert 18 <= value <= 99
