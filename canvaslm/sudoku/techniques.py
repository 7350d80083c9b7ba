"""How hard a puzzle is for a reasoner without search: the hardest human technique a puzzle needs.

A ladder of the classic deductions, each tried only when every simpler one is stuck: naked and hidden singles,
locked candidates (pointing and claiming), naked and hidden pairs and triples, X-wing. A puzzle's grade is the
rung it needed, or "beyond" when the ladder stalls before the grid is full (chains, trial and error). Used to read
`canvaslm sudoku eval` (which puzzles a model solves: the ones singles crack, or also the ones a human would need
chains for?); the model never calls it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations

from canvaslm.sudoku import board

GRADES = ("singles", "locked candidates", "pairs and triples", "x-wing", "beyond")

_ROWS, _COLS, _BOXES, _PEERS = board.ROWS, board.COLUMNS, board.BOXES, board.PEERS
_UNITS = _ROWS + _COLS + _BOXES


class _Grid:
    """Digits placed so far and each blank's candidates; every step keeps only what the givens imply."""

    def __init__(self, cells: Sequence[int]) -> None:
        self.cells = list(cells)
        self.candidates = [set() if v else set(range(1, 10)) - {self.cells[j] for j in _PEERS[i]}
                           for i, v in enumerate(self.cells)]

    def place(self, i: int, digit: int) -> None:
        self.cells[i] = digit
        self.candidates[i] = set()
        for j in _PEERS[i]:
            self.candidates[j].discard(digit)

    def remove(self, cells: Sequence[int], digits: set[int]) -> bool:
        """Drop `digits` from the candidates of `cells`; True when anything was dropped."""
        changed = False
        for i in cells:
            if self.candidates[i] & digits:
                self.candidates[i] -= digits
                changed = True
        return changed

    def broken(self) -> bool:
        return any(not v and not c for v, c in zip(self.cells, self.candidates))


def _singles(grid: _Grid) -> bool:
    """Naked singles (a blank with one candidate) and hidden singles (a digit with one place in a unit)."""
    for i, candidates in enumerate(grid.candidates):
        if len(candidates) == 1:
            grid.place(i, next(iter(candidates)))
            return True
    for unit in _UNITS:
        for digit in range(1, 10):
            places = [i for i in unit if digit in grid.candidates[i]]
            if len(places) == 1:
                grid.place(places[0], digit)
                return True
    return False


def _locked_candidates(grid: _Grid) -> bool:
    """A digit confined to one line within a box leaves the rest of that line (pointing), and a digit confined
    to one box within a line leaves the rest of that box (claiming)."""
    changed = False
    for box in _BOXES:
        for line in _ROWS + _COLS:
            shared = set(box) & set(line)
            if not shared:
                continue
            for digit in range(1, 10):
                in_box = {i for i in box if digit in grid.candidates[i]}
                in_line = {i for i in line if digit in grid.candidates[i]}
                if in_box and in_box <= shared:
                    changed |= grid.remove([i for i in line if i not in shared], {digit})
                if in_line and in_line <= shared:
                    changed |= grid.remove([i for i in box if i not in shared], {digit})
    return changed


def _subsets(grid: _Grid) -> bool:
    """Naked pairs/triples (k blanks of a unit holding only k digits) and hidden ones (k digits of a unit with
    only k places)."""
    changed = False
    for unit in _UNITS:
        blanks = [i for i in unit if not grid.cells[i]]
        for k in (2, 3):
            for cells in combinations(blanks, k):
                digits = set().union(*(grid.candidates[i] for i in cells))
                if len(digits) == k:
                    changed |= grid.remove([i for i in blanks if i not in cells], digits)
            for digits in map(set, combinations(range(1, 10), k)):
                places = [i for i in blanks if grid.candidates[i] & digits]
                if len(places) == k and all(any(d in grid.candidates[i] for i in places) for d in digits):
                    for i in places:
                        changed |= grid.remove([i], grid.candidates[i] - digits)
    return changed


def _x_wing(grid: _Grid) -> bool:
    """A digit with exactly two places in each of two rows, in the same two columns, leaves the rest of those
    columns (and the same with rows and columns swapped)."""
    changed = False
    for lines, across in ((_ROWS, _COLS), (_COLS, _ROWS)):
        for digit in range(1, 10):
            spots = [(n, frozenset(k for k, i in enumerate(line) if digit in grid.candidates[i]))
                     for n, line in enumerate(lines)]
            pairs = [(n, s) for n, s in spots if len(s) == 2]
            for (a, s), (b, t) in combinations(pairs, 2):
                if s == t:
                    for k in s:
                        changed |= grid.remove([i for i in across[k] if i not in lines[a] and i not in lines[b]],
                                               {digit})
    return changed


_LADDER: list[Callable[[_Grid], bool]] = [_singles, _locked_candidates, _subsets, _x_wing]  # GRADES' order


def deduce(cells: Sequence[int]) -> tuple[list[int], str]:
    """Apply the ladder until the grid is full or every rung is stuck: (the cells then, the hardest rung used;
    "beyond" when the grid is not full)."""
    grid, hardest = _Grid(cells), 0
    while not grid.broken() and not all(grid.cells):
        for rung, technique in enumerate(_LADDER):
            if technique(grid):
                hardest = max(hardest, rung)
                break
        else:
            break
    return grid.cells, GRADES[hardest] if all(grid.cells) else "beyond"


def grade(cells: Sequence[int]) -> str:
    """The hardest technique a puzzle needs, one of GRADES."""
    return deduce(cells)[1]
