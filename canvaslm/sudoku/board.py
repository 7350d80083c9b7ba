"""9x9 Sudoku: a puzzle generator with unique solutions, a checker, the symmetry group (for data augmentation)
and the token encoding that puts the 81 cells on one canvas after a prompt holding the givens.

A grid is a string of 81 characters, row by row: digits 1-9, and '.' (or '0') for a blank in a puzzle. Encoding:

    prompt   <bos> c0 c1 … c80      (c = "1".."9" or "."; 82 tokens)
    canvas   d0 d1 … d80            (the solution's 81 digits: one canvas of 81 tokens, no EOS)

so canvas cell i sits exactly 82 positions after its given — a fixed offset the model learns to read. A model whose
canvas is a grid (`canvas_grid`: row, column and box embeddings) reads the givens where they are pinned, in the
canvas itself, so its prompt is `<bos>` alone (a third of the tokens to train on). The vocabulary has 14 tokens; the
last, `<mask>`, is only used by models trained with absorbing (masked) noise.

Difficulty is the clue count: easy >= 36, medium 30-35, hard <= 27 (the generator aims at 22-27).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from canvaslm.checkpoints.tokenizer import Tokenizer
from canvaslm.errors import CanvasError

SPECIALS = ["<pad>", "<eos>", "<bos>"]
VOCAB = SPECIALS + ["."] + [str(d) for d in range(1, 10)] + ["<mask>"]
PAD, EOS, BOS, BLANK, MASK = 0, 1, 2, 3, 13  # MASK: the noise token of masked (absorbing) diffusion training
DIGIT_IDS = list(range(4, 13))  # token id of digit d is 3 + d
CLUES = {"easy": (36, 45), "medium": (30, 35), "hard": (22, 27)}
DIFFICULTIES = tuple(CLUES)

_ROW = [i // 9 for i in range(81)]
_COL = [i % 9 for i in range(81)]
_BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]
ROWS = [[9 * r + c for c in range(9)] for r in range(9)]  # the cells of each row, column and box
COLUMNS = [[9 * r + c for r in range(9)] for c in range(9)]
BOXES = [[i for i in range(81) if _BOX[i] == b] for b in range(9)]
PEERS = [sorted({j for unit in ROWS + COLUMNS + BOXES if i in unit for j in unit} - {i}) for i in range(81)]
_ALL = 0x3FE  # bits 1..9


class PuzzleError(CanvasError):
    """A malformed puzzle string: wrong length, bad characters or givens that break a rule."""


def parse(text: str) -> list[int]:
    """81 cells (0 = blank) from a puzzle string; '.' and '0' mark blanks. Raises PuzzleError naming the problem."""
    if not isinstance(text, str):
        raise PuzzleError(f"a puzzle must be a string of 81 characters, got {type(text).__name__}")
    if len(text) != 81:
        raise PuzzleError(f"a puzzle must have 81 characters (digits 1-9, '.' or '0' for blanks), got {len(text)}")
    bad = sorted({c for c in text if c not in ".0123456789"})
    if bad:
        raise PuzzleError(f"a puzzle may only hold digits 1-9 and '.' or '0' for blanks; found {bad!r}")
    cells = [0 if c in ".0" else int(c) for c in text]
    conflict = first_conflict(cells)
    if conflict is not None:
        raise PuzzleError(f"the givens break a rule: {conflict}")
    return cells


def render(cells: Sequence[int]) -> str:
    """The 81-character string of a grid ('.' for blanks)."""
    return "".join(str(v) if v else "." for v in cells)


def first_conflict(cells: Sequence[int]) -> str | None:
    """A description of the first repeated digit in a row, column or box (blanks ignored), or None."""
    for name, unit in (("row", _ROW), ("column", _COL), ("box", _BOX)):
        seen: dict[tuple[int, int], int] = {}
        for i, v in enumerate(cells):
            if v:
                key = (unit[i], v)
                if key in seen:
                    return f"digit {v} twice in {name} {unit[i] + 1} (cells {seen[key] + 1} and {i + 1})"
                seen[key] = i
    return None


def is_solution(puzzle: Sequence[int], solution: Sequence[int]) -> bool:
    """True when `solution` is a complete valid grid that keeps every given of `puzzle`."""
    return (len(solution) == 81 and all(1 <= v <= 9 for v in solution) and first_conflict(solution) is None
            and all(p == 0 or p == s for p, s in zip(puzzle, solution)))


def count_solutions(cells: Sequence[int], limit: int = 2) -> int:
    """Solutions of a puzzle, counted up to `limit` (depth-first search, fewest-candidates cell first)."""
    return _search(list(cells), limit, None)[0]


def solve(cells: Sequence[int], rng: random.Random | None = None) -> list[int] | None:
    """One solution (a random one when `rng` shuffles the digit order), or None. Used to build data and to check
    the generator; the model never calls it."""
    return _search(list(cells), 1, rng)[1]


def _search(grid: list[int], limit: int, rng: random.Random | None) -> tuple[int, list[int] | None]:
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    empty = []
    for i, v in enumerate(grid):
        if v:
            bit = 1 << v
            rows[_ROW[i]] |= bit
            cols[_COL[i]] |= bit
            boxes[_BOX[i]] |= bit
        else:
            empty.append(i)
    found: list[int] = [0]
    first: list[list[int] | None] = [None]

    def recurse() -> bool:
        best, best_mask, best_count = -1, 0, 10
        for i in empty:
            if grid[i] == 0:
                mask = _ALL & ~(rows[_ROW[i]] | cols[_COL[i]] | boxes[_BOX[i]])
                count = mask.bit_count()
                if count < best_count:
                    best, best_mask, best_count = i, mask, count
                    if count <= 1:
                        break
        if best < 0:
            found[0] += 1
            if first[0] is None:
                first[0] = grid.copy()
            return found[0] >= limit
        if best_count == 0:
            return False
        digits = [d for d in range(1, 10) if best_mask >> d & 1]
        if rng is not None:
            rng.shuffle(digits)
        r, c, b = _ROW[best], _COL[best], _BOX[best]
        for d in digits:
            bit = 1 << d
            grid[best] = d
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            stop = recurse()
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
            grid[best] = 0
            if stop:
                return True
        return False

    recurse()
    return found[0], first[0]


def generate(difficulty: str, rng: random.Random) -> tuple[str, str]:
    """(puzzle, solution) with a unique solution and a clue count in the difficulty's range: a random full grid,
    then givens removed in random order while the solution stays unique."""
    if difficulty not in CLUES:
        raise PuzzleError(f"unknown difficulty {difficulty!r}; expected one of {DIFFICULTIES}")
    low, high = CLUES[difficulty]
    while True:
        solution = solve([0] * 81, rng)
        assert solution is not None
        target = rng.randint(low, high)
        puzzle = solution.copy()
        clues = 81
        for i in rng.sample(range(81), 81):
            if clues <= target:
                break
            puzzle[i] = 0
            if count_solutions(puzzle, 2) == 1:
                clues -= 1
            else:
                puzzle[i] = solution[i]
        if low <= clues <= high:
            return render(puzzle), render(solution)


def symmetry(rng: random.Random) -> tuple[list[int], list[int]]:
    """A random symmetry of the grid: (order, digits) where cell i of the new grid is cell order[i] of the old
    one, and digit d becomes digits[d - 1]. Relabels digits, permutes bands, rows within bands, stacks, columns
    within stacks, and transposes (half the time)."""
    digits = list(range(1, 10))
    rng.shuffle(digits)

    def lines() -> list[int]:
        bands = rng.sample(range(3), 3)
        return [3 * b + r for b in bands for r in rng.sample(range(3), 3)]

    rows, cols, flip = lines(), lines(), rng.random() < 0.5
    order = [9 * rows[c] + cols[r] if flip else 9 * rows[r] + cols[c] for r in range(9) for c in range(9)]
    return order, digits


def transform(puzzle: str, solution: str, rng: random.Random) -> tuple[str, str]:
    """The same random symmetry of both grids (training-data augmentation). Keeps validity, uniqueness and the
    clue count."""
    order, digits = symmetry(rng)
    relabel = {str(d): str(digits[d - 1]) for d in range(1, 10)} | {".": ".", "0": "."}

    def apply(grid: str) -> str:
        return "".join(relabel[grid[i]] for i in order)

    return apply(puzzle), apply(solution)


def clue_count(puzzle: str) -> int:
    return sum(c not in ".0" for c in puzzle)


def difficulty_of(puzzle: str) -> str:
    """The difficulty band of a puzzle by its clue count ("easy", "medium", "hard", or "other" for 28-29)."""
    n = clue_count(puzzle)
    return "easy" if n >= 36 else "medium" if n >= 30 else "hard" if n <= 27 else "other"


def tokenizer() -> Tokenizer:
    """A character-level tokenizer over the 14 tokens (pad 0, eos 1, bos 2, '.' 3, digits 4-12, mask 13)."""
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend, source="canvaslm.sudoku.board", bos_token="<bos>", eos_token="<eos>",
                     pad_token="<pad>", add_bos_token=True)


def encode_puzzle(puzzle: str) -> list[int]:
    """Prompt ids: BOS then one token per cell."""
    return [BOS] + [BLANK if c in ".0" else 3 + int(c) for c in puzzle]


def prompt_ids(puzzle: str, grid: bool) -> list[int]:
    """The prompt a model reads: `<bos>` alone for a grid model (the givens are pinned in its canvas), else
    `encode_puzzle`."""
    return [BOS] if grid else encode_puzzle(puzzle)


def encode_solution(solution: str) -> list[int]:
    return [3 + int(c) for c in solution]


def decode_cells(ids: Sequence[int]) -> list[int]:
    """Cells from canvas ids: digits 1-9, 0 for anything that is not a digit token."""
    return [i - 3 if 4 <= i <= 12 else 0 for i in ids]


def puzzles(difficulty: str, n: int, seed: int) -> Iterator[tuple[str, str]]:
    """n (puzzle, solution) pairs, reproducible from seed."""
    rng = random.Random(seed)
    for _ in range(n):
        yield generate(difficulty, rng)
