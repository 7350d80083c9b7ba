"""Every TOML under examples/ reads as what it is: a data build config (`canvaslm data build`: [[source]] tables) or
a training config (`canvaslm train`, its task's own sections included). A renamed or mistyped key in a shipped recipe
fails here rather than in a user's run, which may be an hour into a data build."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from canvaslm.train import config as train_config
from canvaslm.train import data
from canvaslm.train.diffusion_tasks import DigitsData, EvalOptions, ShardsData
from canvaslm.train.objective import ObjectiveOptions
from canvaslm.train.sudoku_tasks import SudokuData

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").rglob("*.toml"))
DATA_SECTIONS = {"digits": DigitsData, "shards": ShardsData, "sudoku": SudokuData, "sudoku-ar": SudokuData}


def test_the_examples_are_found() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in EXAMPLES}
    assert {"examples/smol/train-cpu.toml", "examples/smol/data-cpu.toml", "examples/tiny-cpu.toml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_example_config_reads(path: Path) -> None:
    if "source" in tomllib.loads(path.read_text(encoding="utf-8")):
        assert data.load_config(path).sources
        return
    config = train_config.load_config(path)
    task = config.data.get("task")
    assert task in DATA_SECTIONS, f"{path}: data.task {task!r} has no section check here"
    train_config.read_section(DATA_SECTIONS[task], config.data, config.source, "data")
    train_config.read_section(EvalOptions, config.eval, config.source, "eval")
    if task != "sudoku-ar":  # the AR baseline has no diffusion objective
        train_config.read_section(ObjectiveOptions, config.objective, config.source, "objective")


def test_a_mistyped_key_fails(tmp_path: Path) -> None:
    text = (ROOT / "examples/smol/train-anchor4.toml").read_text(encoding="utf-8")
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("anchor_p = 1.0", "anchor_pp = 1.0"), encoding="utf-8")
    config = train_config.load_config(bad)
    with pytest.raises(train_config.ConfigError, match="anchor_pp"):
        train_config.read_section(ObjectiveOptions, config.objective, config.source, "objective")
