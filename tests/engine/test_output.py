"""The engine's output: where a sequence's tokens stop (end-of-turn, budget) and the text released as it grows
(stop strings cut, nothing released that a later token could change)."""

from __future__ import annotations

import pytest

from canvaslm.engine.output import TextOutput, cut


@pytest.mark.parametrize("ids, budget, expected", [
    ([5, 6, 7], 10, ([5, 6, 7], None)),       # goes on
    ([5, 2, 7], 10, ([5], "stop")),           # end-of-turn: not sent, the rest dropped
    ([5, 6, 7], 2, ([5, 6], "length")),       # the budget
    ([5, 6, 2], 2, ([5, 6], "stop")),         # an end-of-turn right at the budget is a stop
    ([5, 6, 7, 2], 2, ([5, 6], "length")),    # one past the budget is not
    ([], 0, ([], "length")),
    ([2], 5, ([], "stop")),
])
def test_cut(ids, budget, expected):
    assert cut(ids, {2}, budget) == expected


class Chars:
    """A tokenizer whose token i is chr(i); 0xFFFD stands for half a UTF-8 character."""

    @staticmethod
    def decode(ids: list[int]) -> str:
        return "".join(map(chr, ids))


def tokens(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_text_is_released_only_where_no_stop_string_can_begin():
    out = TextOutput(0, stops=["END"])
    out.add(tokens("hello E"), Chars)
    assert out.release() == "hello "          # "E" may begin "END"
    out.add(tokens("ND and more"), Chars)
    assert out.finish == "stop" and out.text == "hello "
    assert out.release() == ""


def test_a_prefix_that_does_not_become_a_stop_is_released_later():
    out = TextOutput(0, stops=["END"])
    out.add(tokens("aE"), Chars)
    assert out.release() == "a"
    out.add(tokens("x"), Chars)
    assert out.release() == "Ex"
    out.add(tokens("\ufffd"), Chars)           # half a character: held back until the rest arrives
    assert out.release() == ""
    out.finish = "length"
    assert out.release() == "\ufffd"
    assert out.text == "aEx\ufffd" and out.sent == len(out.text)
