"""The Sudoku generator, checker, symmetry and encoding, and the solver's token restriction."""

import random

import pytest

from canvaslm.sudoku import board as sudoku
from canvaslm.sudoku.solver import allowed_tokens, givens

SOLVED = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"


@pytest.mark.parametrize("difficulty", sudoku.DIFFICULTIES)
def test_generated_puzzles_have_one_solution_and_the_right_clue_count(difficulty):
    low, high = sudoku.CLUES[difficulty]
    for puzzle, solution in sudoku.puzzles(difficulty, 5, seed=3):
        cells = sudoku.parse(puzzle)
        assert low <= sudoku.clue_count(puzzle) <= high
        assert sudoku.difficulty_of(puzzle) == difficulty
        assert sudoku.count_solutions(cells) == 1
        assert sudoku.is_solution(cells, sudoku.parse(solution))


def test_generation_is_reproducible_from_the_seed():
    assert list(sudoku.puzzles("medium", 3, 7)) == list(sudoku.puzzles("medium", 3, 7))
    assert list(sudoku.puzzles("medium", 3, 7)) != list(sudoku.puzzles("medium", 3, 8))


def test_checker_rejects_broken_grids():
    cells = sudoku.parse(SOLVED)
    assert sudoku.is_solution([0] * 81, cells)
    swapped = cells.copy()
    swapped[0], swapped[1] = swapped[1], swapped[0]
    assert not sudoku.is_solution([0] * 81, swapped)
    assert not sudoku.is_solution([1] + [0] * 80, cells)          # does not keep a given
    assert not sudoku.is_solution([0] * 81, cells[:80] + [0])     # incomplete
    assert sudoku.count_solutions([0] * 81, limit=2) == 2         # an empty grid has many


def test_symmetries_keep_validity_uniqueness_and_clues():
    rng = random.Random(0)
    puzzle, solution = next(sudoku.puzzles("hard", 1, 11))
    for _ in range(5):
        p, s = sudoku.transform(puzzle, solution, rng)
        assert (p, s) != (puzzle, solution)
        assert sudoku.clue_count(p) == sudoku.clue_count(puzzle)
        assert sudoku.count_solutions(sudoku.parse(p)) == 1
        assert sudoku.is_solution(sudoku.parse(p), sudoku.parse(s))


@pytest.mark.parametrize("text, message", [
    ("1" * 80, "81 characters"), ("x" * 81, "only hold digits"), ("11" + "." * 79, "twice in row 1"),
    ("1" + "." * 8 + "1" + "." * 71, "twice in column 1"), ("1" + "." * 9 + "1" + "." * 70, "twice in box 1"),
])
def test_malformed_puzzles_are_named(text, message):
    with pytest.raises(sudoku.PuzzleError, match=message):
        sudoku.parse(text)


def test_encoding_puts_each_cell_82_positions_after_its_given():
    puzzle = "." * 40 + "5" + "." * 40
    prompt, canvas = sudoku.encode_puzzle(puzzle), sudoku.encode_solution(SOLVED)
    assert len(prompt) == 82 and len(canvas) == 81 and prompt[0] == sudoku.BOS
    assert prompt[1 + 40] == 3 + 5 and prompt[1] == sudoku.BLANK
    assert sudoku.decode_cells(canvas) == sudoku.parse(SOLVED)
    tok = sudoku.tokenizer()
    assert tok.decode(canvas) == SOLVED


def test_solver_restriction_digits_only_and_rules_from_the_givens():
    cells = sudoku.parse("5" + "." * 80)
    plain, rules = allowed_tokens([cells], len(sudoku.VOCAB), False), allowed_tokens([cells], len(sudoku.VOCAB), True)
    assert plain[0, 1:, sudoku.DIGIT_IDS].all() and not plain[0, :, :4].any()  # blanks: any digit, nothing else
    for allowed in (plain, rules):
        assert allowed[0, 0].nonzero().flatten().tolist() == [3 + 5]  # a given keeps its digit
    assert givens([cells])[0, :2].tolist() == [3 + 5, -1]             # and is pinned in the canvas
    assert not rules[0, 8, 3 + 5] and not rules[0, 72, 3 + 5] and not rules[0, 20, 3 + 5]  # row, column, box
    assert rules[0, 80, 3 + 5]                                          # not a peer
