"""Two CPU ranks under torchrun (gloo): DDP reproduces one process on the same global batch; FSDP2 trains, resumes
bitwise on two ranks, and its checkpoint resumes in a single process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import canvaslm
from canvaslm.train import trainer
from canvaslm.train.tasks import make_task
from tests.train.toy_config import to_toml, toy_config, toy_raw

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
# one process accumulates the two micro-batches that two ranks compute one each: the same global batch
SINGLE = {"optim": {"max_steps": STEPS, "lr": 1e-2, "batch_size": 1, "grad_accum": 2}, "train": {"save_every": 3}}
PER_RANK = {"optim": {**SINGLE["optim"], "grad_accum": 1}}


def train_rows(out_dir: Path) -> list[dict]:
    rows = map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["split"] == "train"]


def timeless(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s")} for r in rows]


def torchrun(tmp_path: Path, distributed: str, *overrides: str) -> tuple[Path, dict]:
    out = tmp_path / distributed
    config = tmp_path / f"{distributed}.toml"
    config.write_text(to_toml(toy_raw(out, **PER_RANK, train={**SINGLE["train"], "distributed": distributed})))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "canvaslm.train.trainer", str(config), *overrides]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    json_lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(json_lines) == 1  # rank 0 alone reports
    return out, json.loads(json_lines[0])


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("single")
    config = toy_config(out, **SINGLE)
    trainer.train(config, make_task(config))
    return train_rows(out)


def test_ddp_matches_one_process_on_the_same_global_batch(tmp_path, single):
    out, result = torchrun(tmp_path, "ddp")
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and result["step"] == STEPS
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in single]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in single], abs=1e-6, rel=0)
    assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in single], abs=1e-5, rel=0)
    checkpoint = out / f"checkpoint-{STEPS}"
    assert (checkpoint / "rng-0.safetensors").is_file() and (checkpoint / "rng-1.safetensors").is_file()
    assert not list(out.glob(".checkpoint-*"))


def test_fsdp2_trains_resumes_exactly_and_reshards_to_one_process(tmp_path, single):
    out, result = torchrun(tmp_path, "fsdp")
    rows = train_rows(out)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in single], abs=1e-5, rel=0)
    canvaslm.load(result["model"], device="cpu")  # the export gathered the shards

    shutil.rmtree(out / f"checkpoint-{STEPS}")  # as if killed after checkpoint-3: resume on 2 ranks, bitwise
    torchrun(tmp_path, "fsdp", "train.resume=true")
    assert timeless(train_rows(out)) == timeless(rows)

    # the full-tensor checkpoint of 2 ranks resumes in 1 process (which accumulates the 2 micro-batches)
    resumed = toy_config(tmp_path / "resumed", optim=SINGLE["optim"], train={"resume": str(out / "checkpoint-3")})
    trainer.train(resumed, make_task(resumed))
    continued = train_rows(tmp_path / "resumed")
    assert [r["step"] for r in continued] == [4, 5, 6]
    assert [r["loss"] for r in continued] == pytest.approx([r["loss"] for r in rows[3:]], abs=1e-5, rel=0)
