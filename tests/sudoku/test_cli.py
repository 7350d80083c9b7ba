"""`canvaslm sudoku`: solve (per-line errors, order kept), eval (JSON + PNG), play and data, on tiny random
Sudoku-shaped models (a random model solves nothing, so these test the plumbing; the trained model's numbers are
in docs/sudoku.md)."""

from __future__ import annotations

import json

import pytest
import torch

import canvaslm
from canvaslm import cli
from canvaslm.models import llama
from canvaslm.sudoku import board as sudoku

PUZZLE = next(sudoku.puzzles("easy", 1, 5))[0]


def _model(path, diffusion: bool) -> str:
    torch.manual_seed(0)
    config = llama.Config.from_hf({"model_type": "llama", "vocab_size": 13, "hidden_size": 32,
                                   "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "num_key_value_heads": 2, "max_position_embeddings": 256, "pad_token_id": 0,
                                   "eos_token_id": 1, "bos_token_id": 2}, "test")
    network = llama.Model(config)
    if diffusion:
        network.to_diffusion(81)
    canvaslm.LM(network, sudoku.tokenizer(), "test").save(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sudoku-models")
    return _model(root / "diffusion", True), _model(root / "ar", False)


@pytest.mark.parametrize("which", [0, 1])
def test_solve_writes_one_line_per_puzzle_in_order_with_per_line_errors(models, tmp_path, capsys, which):
    lines = [json.dumps({"puzzle": PUZZLE}), "not json", json.dumps({"puzzle": "12"}),
             json.dumps({"puzzle": PUZZLE.replace(".", "0")}), json.dumps({"grid": PUZZLE})]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code = cli.main(["sudoku", "solve", "--input", str(path), "--json", "--model", models[which],
                     "--max-denoising-steps", "4", "--batch-size", "1"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1 and len(out) == 5  # malformed lines make the exit status 1, the others are still solved
    for i in (0, 3):
        assert len(out[i]["solution"]) == 81 and set(out[i]["solution"]) <= set("123456789")
        assert 1 <= out[i]["forward_passes"] <= (4 if which == 0 else 81) and isinstance(out[i]["valid"], bool)
    assert "line 2" in out[1]["error"] and "line 3: a puzzle must have 81 characters" in out[2]["error"]
    assert '"puzzle" field' in out[4]["error"]


def test_constraints_mode_keeps_every_given(models, tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"puzzle": PUZZLE}) + "\n")
    assert cli.main(["sudoku", "solve", "-i", str(path), "--json", "-m", models[0], "--constraints",
                     "--max-denoising-steps", "3"]) == 0
    solution = json.loads(capsys.readouterr().out)["solution"]
    assert all(p == "." or p == s for p, s in zip(PUZZLE, solution))


def test_eval_writes_json_and_plot_for_several_models(models, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert cli.main(["sudoku", "eval", "-m", models[0], "-m", models[1], "--difficulty", "easy", "-n", "2",
                     "--max-denoising-steps", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["models"]) == set(models)
    row = report["models"][models[1]]["easy"]
    assert row["puzzles"] == 2 and 0 <= row["solve_rate"] <= 1 and row["forward_passes"] == 81
    assert 0 <= row["blank_cell_accuracy"] <= 1
    by_technique = row["by_technique"]  # easy puzzles need singles at most
    assert set(by_technique) == {"singles"} and by_technique["singles"]["puzzles"] == 2
    assert by_technique["singles"]["solve_rate"] == row["solve_rate"]
    assert out.with_suffix(".png").stat().st_size > 1000


def test_eval_settings_draw_a_frontier(models, tmp_path, capsys):
    out = tmp_path / "policies.json"
    assert cli.main(["sudoku", "eval", "-m", models[0], "--difficulty", "easy", "-n", "2", "--max-denoising-steps",
                     "2", "--setting", "acceptance=entropy_bound", "--setting", "acceptance=top_k,accept_k=9",
                     "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["setting"] for row in report["models"].values()] == [
        {"acceptance": "entropy_bound"}, {"acceptance": "top_k", "accept_k": 9}]
    assert (tmp_path / "policies-frontier.png").stat().st_size > 1000


def test_play_draws_steps_and_data_writes_unique_puzzles(models, tmp_path, capsys):
    code = cli.main(["sudoku", "play", "-m", models[0], "--puzzle", PUZZLE, "--show-canvas",
                     "--max-denoising-steps", "2"])
    assert code in (0, 1) and "step 1/2" in capsys.readouterr().out
    data = tmp_path / "hard.jsonl"
    assert cli.main(["sudoku", "data", "--difficulty", "hard", "-n", "3", "--out", str(data)]) == 0
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) == 3 and all(r["clues"] <= 27 and sudoku.count_solutions(sudoku.parse(r["puzzle"])) == 1
                                  for r in rows)


def test_wrong_models_and_files_are_one_line_errors(models, tmp_path, capsys):
    from tests.reference import tiny_checkpoint

    tiny_checkpoint(tmp_path / "text")
    assert cli.main(["sudoku", "solve", "-i", str(tmp_path / "missing.jsonl"), "-m", models[0]]) == 2
    assert "cannot read the puzzle file" in capsys.readouterr().err
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"puzzle": PUZZLE}) + "\n")
    assert cli.main(["sudoku", "solve", "-i", str(path), "-m", str(tmp_path / "text")]) == 2
    assert "is not a Sudoku model" in capsys.readouterr().err


def test_eval_reads_the_same_puzzles_of_a_difficulty_whichever_others_are_asked_for(models, monkeypatch, capsys):
    from canvaslm.sudoku import cli as sudoku_cli

    streams, puzzles = [], sudoku.puzzles

    def recorded(difficulty, n, seed):
        streams.append((difficulty, seed))
        return puzzles(difficulty, n, seed)

    monkeypatch.setattr(sudoku_cli.sudoku, "puzzles", recorded)
    for difficulties in ("hard", "easy,hard", "medium,hard"):
        assert cli.main(["sudoku", "eval", "-m", models[1], "--difficulty", difficulties, "-n", "1"]) == 0
    hard = {seed for d, seed in streams if d == "hard"}
    assert len(streams) == 5 and len(hard) == 1 and hard.isdisjoint(seed for d, seed in streams if d != "hard")
