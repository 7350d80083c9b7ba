"""`SymmetricViews`: a grid model reading each puzzle in several symmetric forms, on a tiny random grid model."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

import canvaslm
from canvaslm import cli
from canvaslm.errors import CanvasError
from canvaslm.models import llama
from canvaslm.sudoku import board as sudoku
from canvaslm.sudoku.solver import DECODING, SymmetricViews, solve
from tests.sudoku.conftest import CONFIG, decode


def _canvases(n: int) -> torch.Tensor:
    """Puzzles as canvases: givens as digit tokens, blanks as the mask token."""
    rows = [[13 if c == 0 else 3 + c for c in sudoku.parse(p)] for p, _ in sudoku.puzzles("medium", n, seed=4)]
    return torch.tensor(rows)


@torch.inference_mode()
def test_one_view_is_the_model_itself(network):
    canvas = _canvases(2)
    plain = decode(network, canvas).log_softmax(-1)
    assert torch.allclose(decode(SymmetricViews(network, 1), canvas), plain, atol=1e-5)


@torch.inference_mode()
def test_views_are_the_model_on_transformed_grids_mapped_back_and_averaged(network):
    """An independent computation: each view built cell by cell from `board.symmetry`, decoded alone."""
    views, canvas = 3, _canvases(2)
    sc = torch.randn(2, 81, 14)
    rng = random.Random(0)
    symmetries = [(list(range(81)), list(range(1, 10)))] + [sudoku.symmetry(rng) for _ in range(views - 1)]
    expected = torch.zeros(2, views, 81, 14)
    for k, (order, digits) in enumerate(symmetries):
        token = list(range(14))
        for d in range(1, 10):
            token[3 + d] = 3 + digits[d - 1]
        view = torch.tensor([[token[int(row[order[j]])] for j in range(81)] for row in canvas])
        view_sc = torch.zeros_like(sc)
        for j in range(81):
            for u in range(14):
                view_sc[:, j, token[u]] = sc[:, order[j], u]
        out = decode(network, view, view_sc).log_softmax(-1)
        for j in range(81):
            for u in range(14):
                expected[:, k, order[j], u] = out[:, j, token[u]]
    mixture = expected.logsumexp(dim=1) - math.log(views)
    got = decode(SymmetricViews(network, views, seed=0), canvas, sc)
    assert torch.allclose(got, mixture, atol=1e-5)
    assert not torch.allclose(got, expected[:, 0], atol=1e-3)  # the other views did change the answer


def test_the_loop_selects_whole_puzzles_of_the_views_cache(network):
    cache = SymmetricViews(network, 2).new_cache(3)
    cache.valid = torch.tensor([[True], [False], [True], [True], [False], [False]])
    cache.select(torch.tensor([1, 2]))  # puzzles 1 and 2 are rows 2, 3 and 4, 5
    assert cache.valid.flatten().tolist() == [True, True, False, False]


def test_solving_with_views_fills_every_blank_and_keeps_the_givens(network):
    lm = canvaslm.LM(network, sudoku.tokenizer(), "tiny-grid")
    puzzles = [sudoku.parse(p) for p, _ in sudoku.puzzles("hard", 3, seed=9)]
    for answer, puzzle in zip(solve(lm, puzzles, views=4, max_denoising_steps=4), puzzles, strict=True):
        assert all(c in "123456789" for c in answer.solution) and 1 <= answer.forward_passes <= 4
        assert all(g == 0 or str(g) == c for g, c in zip(puzzle, answer.solution))


def test_likeliest_views_keep_the_view_whose_digits_the_model_found_likeliest(network):
    """An independent computation: the symmetric forms solved in one plain batch (the same rows as the solver's,
    so the same numbers), each scored by the log-probability the model gave its digits, the best one mapped back
    cell by cell. Decoded to the end (81 steps) and with a step budget that leaves blanks never kept."""
    lm = canvaslm.LM(network, sudoku.tokenizer(), "tiny-grid")
    views, seed = 3, 5
    puzzles = [sudoku.parse(p) for p, _ in sudoku.puzzles("hard", 4, seed=9)]
    rng = random.Random(seed)
    symmetries = [(list(range(81)), list(range(1, 10)))] + [sudoku.symmetry(rng) for _ in range(views - 1)]
    forms = [[0 if puzzle[order[i]] == 0 else digits[puzzle[order[i]] - 1] for i in range(81)]
             for puzzle in puzzles for order, digits in symmetries]
    for steps in (81, 6):
        decoding = {**DECODING, "max_denoising_steps": steps}
        plain = solve(lm, forms, seed=seed, **decoding)
        picked = []
        for j in range(len(puzzles)):
            best = None
            for k, (order, digits) in enumerate(symmetries):
                answer, form = plain[j * views + k], forms[j * views + k]
                assert all(answer.kept_at[i] > 0 for i in range(81) if form[i] == 0)  # every blank scored
                score = sum(math.log(answer.certainty[i]) for i in range(81) if form[i] == 0)
                back = ["."] * 81
                for i in range(81):
                    back[order[i]] = str(digits.index(int(answer.solution[i])) + 1)
                if best is None or score > best[0]:
                    best = (score, "".join(back), k, max(a.forward_passes for a in plain[j * views:(j + 1) * views]))
            picked.append(best)
        got = solve(lm, puzzles, views=views, views_combine="likeliest", seed=seed, **decoding)
        assert [a.solution for a in got] == [solution for _, solution, _, _ in picked]
        assert [a.forward_passes for a in got] == [passes for _, _, _, passes in picked]
        assert any(k > 0 for _, _, k, _ in picked)  # some puzzle's answer came from another view
        for answer, puzzle in zip(got, puzzles, strict=True):
            assert all(g == 0 or str(g) == c for g, c in zip(puzzle, answer.solution))
            assert all(answer.certainty[i] == 1.0 and answer.kept_at[i] == 0 for i in range(81) if puzzle[i])


def test_views_combine_must_be_known(network):
    lm = canvaslm.LM(network, sudoku.tokenizer(), "tiny-grid")
    with pytest.raises(CanvasError, match="views_combine must be one of mean, likeliest; got 'vote'"):
        solve(lm, [sudoku.parse(sudoku.puzzles("easy", 1, seed=1).__next__()[0])], views=2, views_combine="vote")


def test_views_need_a_grid_diffusion_model(tmp_path, capsys):
    torch.manual_seed(0)
    plain = {k: v for k, v in CONFIG.items() if not k.startswith("canvas_grid")}
    lm = canvaslm.LM(llama.Model(llama.Config.from_hf(plain, "test")).to_diffusion(81), sudoku.tokenizer(), "1d")
    with pytest.raises(CanvasError, match="views = 2 needs a grid diffusion model"):
        solve(lm, [sudoku.parse(sudoku.puzzles("easy", 1, seed=1).__next__()[0])], views=2)
    lm.save(tmp_path / "1d")  # by default the CLI reads such a model in one view
    assert cli.main(["sudoku", "eval", "-m", str(tmp_path / "1d"), "--difficulty", "easy", "-n", "1",
                     "--max-denoising-steps", "2", "--out", str(tmp_path / "1d.json")]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "1d.json").read_text())["models"][str(tmp_path / "1d")]["views"] == 1


def test_eval_compares_view_counts_as_settings(network, tmp_path, capsys):
    model = tmp_path / "grid"
    canvaslm.LM(network, sudoku.tokenizer(), "tiny-grid").save(model)
    out = tmp_path / "views.json"
    assert cli.main(["sudoku", "eval", "-m", str(model), "--difficulty", "hard", "-n", "2", "--max-denoising-steps",
                     "2", "--setting", "views=1", "--setting", "views=3", "--setting", "views=3,views_combine=mean",
                     "--setting", "accept_probability=0.9", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = list(report["models"].values())
    assert [row["setting"] for row in rows] == [{"views": 1}, {"views": 3}, {"views": 3, "views_combine": "mean"},
                                                {"accept_probability": 0.9}]
    # no views asked: a grid model reads 4, the likeliest answer kept (the measured headline setting)
    assert [(row["views"], row["views_combine"]) for row in rows] == [(1, None), (3, "likeliest"), (3, "mean"),
                                                                      (4, "likeliest")]
    assert all(row["hard"]["forward_passes"] <= 2 for row in report["models"].values())
    capsys.readouterr()
    assert cli.main(["sudoku", "eval", "-m", str(model), "--difficulty", "hard", "-n", "1", "--views", "0"]) != 0
    assert "views must be an integer >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["sudoku", "eval", "-m", str(model), "--difficulty", "hard", "-n", "1", "--setting",
                     "views=four"]) != 0
    assert "views must be an integer >= 1, got 'four'" in capsys.readouterr().err
    assert cli.main(["sudoku", "eval", "-m", str(model), "--difficulty", "hard", "-n", "1", "--setting",
                     "views=2,views_combine=best"]) != 0
    assert "views_combine must be one of mean, likeliest; got 'best'" in capsys.readouterr().err
