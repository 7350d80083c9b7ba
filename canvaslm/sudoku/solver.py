"""Solving Sudoku with a trained model: batches of puzzles in, one answer per puzzle out.

The model alone solves: the givens go in the prompt (a grid model's prompt is `<bos>` alone) and sit fixed in the
canvas (as an infill's suffix does), the blanks are denoised by the usual loop (or, for the AR baseline, 81 greedy
next-token steps that copy the givens).
Inside the grid only digit tokens are legal (a format rule, like a JSON grammar). The optional "with constraints"
mode also refuses, at each blank, the digits its row, column or box already hold among the givens — a sampler
restriction, still no search and no solver; it is reported apart.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from canvaslm.diffusion.generate import DenoisingStep, DiffusionResult, generate_steps
from canvaslm.diffusion.sampling import DiffusionSampling
from canvaslm.diffusion.step import Constraint
from canvaslm.engine.ar import advance, prefill, sample_next
from canvaslm.engine.lm import LM
from canvaslm.errors import CanvasError
from canvaslm.models.cache import KVCache
from canvaslm.sudoku import board as sudoku


def givens(puzzles: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> Tensor:
    """[B, 81] the canvas tokens the givens fix (-1 at blanks): a `Constraint`'s pins."""
    cells = torch.tensor([list(p) for p in puzzles], device=device)
    return torch.where(cells > 0, cells + 3, -1)


# How a Sudoku model decodes unless told otherwise (written into a trained model's generation_config.json):
# the most likely digit of each blank (a sampled slip is a wrong cell), at temperature ~1 so that the acceptance
# rule reads the model's own confidence (the reference refuses t_max = t_min); a step keeps every blank the model
# is sure of (always at least one), easy first, as "Train for the worst, plan for the best" decodes. Chosen by
# measurement (docs/sudoku.md): 0.999 solves far more than 0.9 or 0.99 for a few more passes.
DECODING: dict[str, float | int | str] = {"sampler": "greedy", "t_max": 1.0, "t_min": 0.99, "acceptance": "threshold",
                                          "accept_probability": 0.999, "max_denoising_steps": 81}
# ... and for a model trained to revise (data.revision_p > 0): a kept digit changes when the model is this sure of
# another one
REVISING: dict[str, float | int | str] = {**DECODING, "revise_probability": 0.9}


VIEWS_COMBINE = ("mean", "likeliest")  # how `views` > 1 symmetric forms of a puzzle make one answer


def view_symmetries(views: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """The `views` symmetries (`board.symmetry`'s (order, digits)) a puzzle is read in: the identity, then random
    ones drawn from `seed`."""
    if views < 1:
        raise CanvasError(f"views must be an integer >= 1, got {views!r}")
    rng = random.Random(seed)
    return [(list(range(81)), list(range(1, 10)))] + [sudoku.symmetry(rng) for _ in range(views - 1)]


class SymmetricViews:
    """A grid model that reads each puzzle in `views` symmetric forms at once and answers with their average.

    A symmetry of the grid (`board.symmetry`: digits relabelled, lines and bands permuted, transposed) turns a
    puzzle into an equivalent one, so the model's beliefs about the original can be read from any of them: each
    pass decodes every view in one batch (view 0 is the puzzle as given), maps each view's logits back to the
    original cells and digits, and returns the log of their mean probability, so a digit is sure only where the
    views agree. The model alone still decides; `views` times the compute per pass, the same number of passes.
    Wraps the network for `generate_steps`: each batch row becomes `views` rows of the wrapped cache."""

    def __init__(self, network: Any, views: int, seed: int = 0) -> None:
        self.network, self.views = network, views
        symmetries = view_symmetries(views, seed)
        device = network.embed_tokens.weight.device
        self.order = torch.tensor([order for order, _ in symmetries], device=device)            # [K, 81]
        token = torch.arange(network.vocab_size)
        self.relabel = token.repeat(views, 1)                                                  # [K, V]
        for k, (_, digits) in enumerate(symmetries):
            self.relabel[k, sudoku.DIGIT_IDS] = torch.tensor(digits) + 3
        self.relabel = self.relabel.to(device)

    def __getattr__(self, name: str) -> Any:  # canvas_length, vocab_size, mask_token_id, ...: the network's
        return getattr(self.network, name)

    def new_cache(self, batch_size: int, device: torch.device | None = None) -> KVCache:
        cache = self.network.new_cache(batch_size * self.views, device)
        cache.__class__ = _ViewsCache
        cache.views = self.views  # type: ignore[attr-defined]
        return cache

    def encode(self, input_ids: Tensor, cache: KVCache, valid: Tensor) -> Tensor:
        hidden = self.network.encode(input_ids.repeat_interleave(self.views, 0), cache,
                                     valid.repeat_interleave(self.views, 0))
        return hidden[::self.views]

    def decode(self, canvas_ids: Tensor, cache: KVCache, self_conditioning_logits: Tensor | None,
               self_conditioning_rows: Tensor | None = None) -> Tensor:
        batch, views = canvas_ids.shape[0], self.views
        order = self.order.repeat(batch, 1)                                                    # [B*K, 81]
        relabel = self.relabel.repeat(batch, 1)                                                # [B*K, V]
        # view cell j holds original cell order[j], digit d written as relabel[d]
        canvas = relabel.gather(1, canvas_ids.repeat_interleave(views, 0).gather(1, order))
        sc = None
        if self_conditioning_logits is not None:
            sc = self._to_views(self_conditioning_logits.repeat_interleave(views, 0), order, relabel)
        rows = None if self_conditioning_rows is None else self_conditioning_rows.repeat_interleave(views, 0)
        logits = self.network.decode(canvas, cache, sc, rows).log_softmax(dim=-1)              # [B*K, 81, V]
        # back to original cells and digits: original (cell order[j], token u) is view (cell j, token relabel[u])
        vocab = logits.shape[-1]
        logits = logits.gather(2, relabel[:, None, :].expand(-1, 81, -1))
        original = torch.empty_like(logits).scatter_(1, order[:, :, None].expand(-1, -1, vocab), logits)
        return original.view(batch, views, 81, vocab).logsumexp(dim=1) - math.log(views)

    @staticmethod
    def _to_views(logits: Tensor, order: Tensor, relabel: Tensor) -> Tensor:
        """Per-cell logits [B*K, 81, V] of the original grid, as each view sees them."""
        cells = logits.gather(1, order[:, :, None].expand(-1, -1, logits.shape[-1]))
        return torch.empty_like(cells).scatter_(2, relabel[:, None, :].expand(-1, 81, -1), cells)


class _ViewsCache(KVCache):
    """The cache of a `SymmetricViews` network: the decoding loop selects batch rows, each of which is `views`
    consecutive rows here."""

    views: int

    def select(self, rows: Tensor) -> None:
        rows = (rows[:, None] * self.views + torch.arange(self.views, device=rows.device)).flatten()
        super().select(rows)


@dataclass
class Answer:
    solution: str        # 81 characters; a non-digit prediction shows as '.'
    solved: bool         # a valid complete grid that keeps every given
    forward_passes: int  # decoder (or AR) forward passes spent on this puzzle
    certainty: list[float] | None = None  # per cell, the probability the model gave the digit it kept, at the
                                          # pass that kept it (givens: 1; a blank the step budget ran out on:
                                          # its last draft's); a diffusion model's answers only
    kept_at: list[int] | None = None      # per cell, that pass (1-based; givens: 0)


def check_model(lm: LM) -> None:
    """Raise a clear error unless `lm` is a Sudoku model (its vocabulary is canvaslm.sudoku.board's)."""
    if lm.network.vocab_size not in (len(sudoku.VOCAB) - 1, len(sudoku.VOCAB)):
        raise CanvasError(f"{lm.source} is not a Sudoku model: its vocabulary has {lm.network.vocab_size} tokens, "
                          f"a Sudoku model's has {len(sudoku.VOCAB)} ({len(sudoku.VOCAB) - 1} without the mask "
                          "token; train one with examples/sudoku/*.toml)")
    if lm.kind == "diffusion" and lm.network.canvas_length != 81:
        raise CanvasError(f"{lm.source} is not a Sudoku model: canvas length {lm.network.canvas_length}, "
                          "expected 81 (one canvas per grid)")


def is_grid_model(lm: LM) -> bool:
    """A model with row/column/box embeddings over its canvas: it reads the givens from the canvas, not a prompt."""
    return getattr(lm.network.config, "canvas_grid", None) is not None


def allowed_tokens(puzzles: Sequence[Sequence[int]], vocab_size: int, rules: bool) -> Tensor:
    """[B, 81, V] bool: the tokens each cell may take: a given cell its digit, a blank any digit; with `rules`,
    a blank no digit that a given in its row, column or box holds."""
    allowed = torch.zeros(len(puzzles), 81, vocab_size, dtype=torch.bool)
    allowed[:, :, sudoku.DIGIT_IDS] = True
    for row, cells in enumerate(puzzles):
        for i, v in enumerate(cells):
            if v:
                allowed[row, i, :] = False
                allowed[row, i, 3 + v] = True
                if rules:
                    for j in sudoku.PEERS[i]:
                        if not cells[j]:
                            allowed[row, j, 3 + v] = False
    return allowed


def solve_steps(lm: LM, puzzles: Sequence[Sequence[int]], *, rules: bool = False, seed: int = 0, views: int = 1,
                views_combine: str = "mean", **sampling: float | str) -> Iterator[object]:
    """Solve parsed puzzles (81 ints, 0 = blank) in one batch, yielding the diffusion loop's events (for a live
    view) and lastly the list of `Answer`s. `views` > 1 reads each puzzle in that many symmetric forms (a grid
    diffusion model only), combined per `views_combine`: "mean" averages their beliefs at every pass
    (`SymmetricViews`), "likeliest" decodes each on its own and keeps the answer the model finds likeliest
    (`_likeliest_views`)."""
    check_model(lm)
    grid = is_grid_model(lm)
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise CanvasError(f"views must be an integer >= 1, got {views!r}")
    if views != 1 and not (grid and lm.kind == "diffusion"):
        raise CanvasError(f"views = {views} needs a grid diffusion model (canvas_grid); {lm.source} is not one")
    if views_combine not in VIEWS_COMBINE:
        raise CanvasError(f"views_combine must be one of {', '.join(VIEWS_COMBINE)}; got {views_combine!r}")
    if views > 1 and views_combine == "likeliest":
        yield from _likeliest_views(lm, puzzles, rules, seed, views, sampling)
        return
    ids = torch.tensor([sudoku.prompt_ids(sudoku.render(p), grid) for p in puzzles], device=lm.device)
    valid = torch.ones_like(ids, dtype=torch.bool)
    allowed = allowed_tokens(puzzles, lm.network.vocab_size, rules).to(lm.device)
    generator = torch.Generator(lm.device).manual_seed(seed)
    with torch.inference_mode():
        if lm.kind == "diffusion":
            settings: DiffusionSampling = lm.diffusion_settings(dict(sampling))
            result = None
            pins = givens(puzzles, lm.device)
            constraint = Constraint(pins, allowed, keep_logits=True)
            network = lm.network if views == 1 else SymmetricViews(lm.network, views, seed)
            certainty = torch.ones(pins.shape, device=lm.device)
            kept_at, kept = torch.zeros_like(pins), torch.full_like(pins, -1)  # -1: no digit kept yet
            last = None
            for event in generate_steps(network, ids, valid, 81, settings, [], None, generator, constraint,
                                        skip_finished=True):
                if isinstance(event, DiffusionResult):
                    result = event
                    continue
                if isinstance(event, DenoisingStep):
                    kept, last = _record_certainty(certainty, kept_at, kept, event, pins < 0), event
                yield event
            assert result is not None
            grids, passes = result.sequences[:, ids.shape[1]:], result.forward_passes.tolist()
            if last is not None:  # a blank the step budget ran out on holds its last draft: that pass's certainty
                _record_certainty(certainty, kept_at, kept, replace(last, draft=grids, accepted=kept < 0), pins < 0)
            sure: list[list[float] | None] = certainty.tolist()
            when: list[list[int] | None] = kept_at.tolist()
        else:
            grids, passes = _ar_solve(lm, ids, valid, allowed)
            sure, when = [None] * len(puzzles), [None] * len(puzzles)
    answers = []
    for cells, grid, n, p, at in zip(puzzles, grids.tolist(), passes, sure, when):
        solution = sudoku.decode_cells(grid)
        answers.append(Answer(sudoku.render(solution), sudoku.is_solution(cells, solution), int(n), p, at))
    yield answers


def _likeliest_views(lm: LM, puzzles: Sequence[Sequence[int]], rules: bool, seed: int, views: int,
                     sampling: dict[str, float | str]) -> Iterator[object]:
    """Self-consistency over symmetric views: each puzzle is decoded in `views` symmetric forms, each on its own
    (rows j * views + k of one batch), and its answer is the view whose kept digits the model gave the highest
    joint probability (the sum of the log `certainty` over the blanks, each read at the pass that kept it). A
    wrong guess tends to leave the digits after it less certain, so the likeliest view is usually a right one.
    Still the model alone: no rule is checked, and the views run as one batch, so a puzzle costs the passes of
    its slowest view (reported as its `forward_passes`). Events are the expanded batch's (row 0: puzzle 0 as
    given)."""
    symmetries = view_symmetries(views, seed)
    forms = [[0 if cells[i] == 0 else digits[cells[i] - 1] for i in order]
             for cells in puzzles for order, digits in symmetries]
    answers: list[Answer] = []
    for event in solve_steps(lm, forms, rules=rules, seed=seed, **sampling):
        if isinstance(event, list):
            answers = event
        else:
            yield event
    chosen = []
    for j, cells in enumerate(puzzles):
        candidates = answers[j * views:(j + 1) * views]
        score = [sum(math.log(max(a.certainty[i], 1e-30)) for i in range(81) if forms[j * views + k][i] == 0)
                 for k, a in enumerate(candidates)]  # type: ignore[index]
        k = max(range(views), key=score.__getitem__)  # the first (the puzzle as given) on a tie
        order, digits = symmetries[k]
        view, digit_of = candidates[k], {str(d): str(n + 1) for n, d in enumerate(digits)}
        solution, certainty, kept_at = ["."] * 81, [1.0] * 81, [0] * 81
        for i, source in enumerate(order):  # view cell i is cell `source` of the puzzle as given
            solution[source] = digit_of.get(view.solution[i], ".")
            certainty[source] = view.certainty[i]  # type: ignore[index]
            kept_at[source] = view.kept_at[i]  # type: ignore[index]
        grid = [int(c) if c != "." else 0 for c in solution]
        chosen.append(Answer("".join(solution), sudoku.is_solution(cells, grid),
                             max(a.forward_passes for a in candidates), certainty, kept_at))
    yield chosen


def _record_certainty(certainty: Tensor, kept_at: Tensor, kept: Tensor, step: DenoisingStep,
                      blank: Tensor) -> Tensor:
    """Write into `certainty` [B, 81] the probability of each digit `step` kept in a `blank` cell that was not kept
    before (or was revised), and into `kept_at` the step; `kept` [B, 81] holds the digits kept so far. Returns the
    new `kept`."""
    assert step.logits is not None  # the solver's constraint asks for them
    draft = step.draft
    probability = step.logits.float().softmax(dim=-1).gather(-1, draft[..., None]).squeeze(-1)  # [B, 81]
    new = blank & step.accepted & (draft != kept)
    certainty[new] = probability[new]
    kept_at[new] = step.step
    return torch.where(step.accepted, draft, kept)


def solve(lm: LM, puzzles: Sequence[Sequence[int]], *, rules: bool = False, seed: int = 0, views: int = 1,
          views_combine: str = "mean", **sampling: float | str) -> list[Answer]:
    """`solve_steps` run to the end."""
    *_, answers = solve_steps(lm, puzzles, rules=rules, seed=seed, views=views, views_combine=views_combine,
                              **sampling)
    return answers  # type: ignore[return-value]


def _ar_solve(lm: LM, ids: Tensor, valid: Tensor, allowed: Tensor) -> tuple[Tensor, list[int]]:
    """Greedy left-to-right decoding under the same per-cell token restriction."""
    network = lm.network
    cache = network.new_cache(ids.shape[0], ids.device)
    logits = prefill(network, ids, cache, valid)
    out = []
    for i in range(81):
        token = sample_next(logits, 0.0, 0, 1.0, None, allowed[:, i])
        out.append(token)
        if i < 80:
            logits = advance(network, cache, token[:, None])
    return torch.stack(out, dim=1), [81] * ids.shape[0]

