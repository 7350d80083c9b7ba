"""How each digit was kept: the solver records, per cell, the pass that kept it and the probability the model gave
it then; `sudoku eval` counts from them the guesses (digits kept below the acceptance threshold) up to a puzzle's
first wrong digit, and whether that first wrong digit was a guess or a confident error."""

from __future__ import annotations

import pytest
import torch

import canvaslm
from canvaslm.sudoku import board as sudoku
from canvaslm.sudoku.cli import guesses
from canvaslm.sudoku.solver import DECODING, Answer, solve
from tests.sudoku.conftest import decode


def test_each_blank_records_the_pass_that_kept_it_and_how_sure_the_model_was(network):
    lm = canvaslm.LM(network, sudoku.tokenizer(), "tiny-grid")
    puzzle = sudoku.parse(next(sudoku.puzzles("medium", 1, seed=3))[0])
    blanks = [i for i in range(81) if puzzle[i] == 0]
    answer = solve(lm, [puzzle], **DECODING)[0]  # its first pass runs at temperature t_max = 1
    # a random model is never 0.999 sure: every pass keeps just its most likely blank
    assert sorted(answer.kept_at[i] for i in blanks) == list(range(1, answer.forward_passes + 1))
    assert answer.forward_passes == len(blanks)
    assert all(answer.kept_at[i] == 0 and answer.certainty[i] == 1.0 for i in range(81) if puzzle[i])
    assert all(0 < answer.certainty[i] < 0.999 for i in blanks)
    canvas = torch.tensor([[sudoku.MASK if c == 0 else 3 + c for c in puzzle]])
    with torch.inference_mode():
        probs = decode(network, canvas)[0, :, 4:13].float().softmax(-1)  # [81, 9] the digits, as the solver allows
    first = next(i for i in blanks if answer.kept_at[i] == 1)
    assert first == max(blanks, key=lambda i: float(probs[i].max()))
    assert answer.solution[first] == str(int(probs[first].argmax()) + 1)
    assert answer.certainty[first] == pytest.approx(float(probs[first].max()), rel=1e-4)


def test_eval_counts_guesses_up_to_the_first_wrong_digit_and_what_that_digit_was():
    puzzle, solution = next(sudoku.puzzles("easy", 1, seed=2))
    blanks = [i for i in range(81) if puzzle[i] == "."]

    def answer(wrong_from: int) -> Answer:  # one blank kept per pass; even passes are guesses
        cells, kept_at, certainty = list(solution), [0] * 81, [1.0] * 81
        for n, i in enumerate(blanks, 1):
            kept_at[i], certainty[i] = n, 0.9 if n % 2 == 0 else 0.9995
            if n >= wrong_from:
                cells[i] = str(int(solution[i]) % 9 + 1)
        return Answer("".join(cells), wrong_from > len(blanks), len(blanks), certainty, kept_at)

    # solved; first wrong at pass 4 (a guess, digits after it wrong too); first wrong at pass 5 (a sure digit)
    got = guesses([answer(100), answer(4), answer(5)], [(puzzle, solution)] * 3, 0.999)
    every = len(blanks) // 2
    assert got["per_puzzle"] == pytest.approx((every + 2 + 2) / 3)
    assert got["right"] == pytest.approx((every + 1 + 2) / (every + 2 + 2))
    assert got["wrong_first_at_a_guess"] == got["wrong_first_at_a_sure_digit"] == pytest.approx(1 / 3)
