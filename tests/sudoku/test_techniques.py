from collections import Counter

from canvaslm.sudoku import board, techniques

# Arto Inkala's "world's hardest Sudoku" (2012): no rung of the ladder moves it to a full grid.
INKALA = "8..........36......7..9.2...5...7.......457.....1...3...1....68..85...1..9....4.."


def test_one_blank_needs_singles_only():
    solution = board.parse(next(board.puzzles("easy", 1, seed=3))[1])
    puzzle = solution.copy()
    puzzle[40] = 0
    cells, grade = techniques.deduce(puzzle)
    assert (cells, grade) == (solution, "singles")


def test_a_puzzle_that_needs_trial_is_beyond_the_ladder():
    cells, grade = techniques.deduce(board.parse(INKALA))
    assert grade == "beyond" and not all(cells)
    solution = board.solve(board.parse(INKALA))
    assert all(v == 0 or v == s for v, s in zip(cells, solution))  # what it did place is right


def test_every_deduction_on_hard_puzzles_agrees_with_the_unique_solution_and_every_rung_is_used():
    grades = Counter()
    for puzzle, solution in board.puzzles("hard", 60, seed=11):
        cells, grade = techniques.deduce(board.parse(puzzle))
        grades[grade] += 1
        assert all(v == 0 or v == s for v, s in zip(cells, board.parse(solution)))
        assert (grade == "beyond") == (not all(cells))
    assert grades["singles"] and grades["beyond"] and grades["locked candidates"] + grades["pairs and triples"]
    assert set(grades) <= set(techniques.GRADES)
