"""Slot grammars on a hand-made vocabulary: the lifted token tables, the allowed tokens per position and the
Viterbi projection (always grammatical, and the most probable grammatical path)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from canvaslm.diffusion.grammar import INTEGER, NUMBER, STRING, TokenGrammar, bounded_string, literals, token_texts

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
