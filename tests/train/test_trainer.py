"""The training loop on a tiny random Llama and the toy causal-LM task: schedule, accumulation, clipping, outputs,
bitwise-exact resume after a crash, SIGTERM."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import canvaslm
from canvaslm.errors import CheckpointError
from canvaslm.train import trainer
from canvaslm.train.config import ConfigError, OptimConfig
from canvaslm.train.tasks import CausalLMToy, make_task
from tests.train.toy_config import to_toml, toy_config, toy_raw

EXACT_KEYS = ("step", "loss", "lr", "grad_norm", "tokens")  # everything but timings


def records(out_dir, split="train") -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def exact(rows: list[dict]) -> list[tuple]:
    return [tuple(r[k] for k in EXACT_KEYS if k in r) for r in rows]


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    optim = OptimConfig(max_steps=13, lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [trainer.lr_at(s, optim) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert trainer.lr_at(8, optim) == pytest.approx(0.55)  # halfway through the decay: (1 + 0.1) / 2
    assert trainer.lr_at(12, optim) == pytest.approx(0.1)
    decay = [trainer.lr_at(s, optim) for s in range(4, 13)]
    assert decay == sorted(decay, reverse=True)
    assert trainer.lr_at(0, OptimConfig(max_steps=5, lr=2.0)) == 2.0


def test_a_minutes_budget_decays_on_the_clock_when_it_is_ahead_of_the_steps():
    optim = OptimConfig(max_steps=1000, lr=1.0, warmup_steps=0, min_lr_ratio=0.1, max_minutes=2.0)
    assert trainer.lr_at(0, optim, elapsed_s=60.0) == pytest.approx(0.55)  # half the minutes: halfway down
    assert trainer.lr_at(0, optim, elapsed_s=500.0) == pytest.approx(0.1)
    assert trainer.lr_at(999, optim, elapsed_s=0.0) == pytest.approx(0.1)  # the steps still end the decay
    steps_only = OptimConfig(max_steps=1000, lr=1.0)
    assert trainer.lr_at(10, steps_only, elapsed_s=1e6) == trainer.lr_at(10, steps_only) > 0.99  # no budget: no clock


class SlowToy(CausalLMToy):
    def batch(self, step, micro, generator):
        time.sleep(0.2)
        return super().batch(step, micro, generator)


def test_a_run_out_of_minutes_evaluates_saves_and_exports_like_a_finished_one(tmp_path):
    config = toy_config(tmp_path, optim={"max_steps": 10_000, "max_minutes": 0.04, "warmup_steps": 0})
    result = trainer.train(config, SlowToy(config))
    assert 3 <= result["step"] < 100 and not result["stopped_early"]  # 2.4 s of 0.2 s batches
    assert result["checkpoint"] == str(tmp_path / f"checkpoint-{result['step']}") and "model" in result
    assert "eval_loss" in result and records(tmp_path, "eval")[-1]["step"] == result["step"]
    lrs = [r["lr"] for r in records(tmp_path)]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.5 * lrs[0]  # annealed by the clock


def test_batches_of_every_shape_reach_the_training_device():
    from canvaslm.train.batch import DiffusionBatch
    batch = DiffusionBatch(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.bool), 3,
                           torch.ones(2, 2, dtype=torch.bool))
    meta = torch.device("meta")  # stands in for an accelerator: a tensor left behind stays on the CPU
    moved = trainer._to_device({"x": [torch.zeros(1)], "batch": batch}, meta)
    assert moved["x"][0].device == meta and moved["batch"].prompt_length == 3
    assert {t.device for t in (moved["batch"].input_ids, moved["batch"].valid, moved["batch"].supervised)} == {meta}


def test_clip_gradients_returns_the_norm_before_clipping():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert trainer.clip_gradients([a, b], 1.0) == pytest.approx(5.0)
    torch.testing.assert_close(torch.cat([a.grad, b.grad]), torch.tensor([0.6, 0.0, 0.8]))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert trainer.clip_gradients([a, b], 0.0) == pytest.approx(5.0)  # 0: measure only
    assert torch.equal(a.grad, torch.tensor([3.0, 0.0])) and torch.equal(b.grad, torch.tensor([4.0]))


def run(out_dir, **sections) -> dict:
    config = toy_config(out_dir, **sections)
    return trainer.train(config, make_task(config))


def test_accumulating_two_micro_batches_equals_one_double_batch(tmp_path):
    run(tmp_path / "bs2", optim={"batch_size": 2, "grad_accum": 1, "max_steps": 4})
    run(tmp_path / "accum", optim={"batch_size": 1, "grad_accum": 2, "max_steps": 4})
    big, accumulated = records(tmp_path / "bs2"), records(tmp_path / "accum")
    assert [r["tokens"] for r in big] == [r["tokens"] for r in accumulated] == [22.0] * 4
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in accumulated] == pytest.approx([r[key] for r in big], abs=1e-6, rel=0)


def test_gradient_clipping_bounds_the_update(tmp_path):
    free = run(tmp_path / "free", optim={"max_steps": 1, "grad_clip": 0.0, "lr": 1.0, "warmup_steps": 0})
    clipped = run(tmp_path / "clip", optim={"max_steps": 1, "grad_clip": 1e-3, "lr": 1.0, "warmup_steps": 0})
    assert clipped["grad_norm"] == free["grad_norm"] > 1e-3  # logged before clipping
    assert clipped["loss"] == free["loss"]


def test_a_run_writes_metrics_plot_checkpoints_and_the_model(tmp_path, capsys):
    out = tmp_path / "run"
    path = tmp_path / "run.toml"
    path.write_text(to_toml(toy_raw(out, optim={"max_steps": 12}, train={"save_every": 6, "eval_every": 6})))
    assert trainer.main(str(path), ["optim.lr=1e-2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 12 and not result["stopped_early"]
    train_rows, eval_rows = records(out), records(out, "eval")
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed"} <= train_rows[0].keys()
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.3  # from ~ln(32) at N(0, 0.02) init
    assert [r["step"] for r in eval_rows] == [6, 12] and eval_rows[-1]["loss"] == result["eval_loss"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]
    assert not [p for p in out.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl")]
    with safe_open(str(out / "checkpoint-12" / "optimizer.safetensors"), "pt") as f:
        assert "exp_avg/layers.0.self_attn.q_proj.weight" in f.keys()
    model = canvaslm.load(result["model"], device="cpu")  # the export is an ordinary HF-layout checkpoint
    config = toy_config(out)
    assert CausalLMToy(config).evaluate(model.network, 12)["loss"] == pytest.approx(result["eval_loss"], abs=1e-6)


class Crash(Exception):
    pass


class CrashingToy(CausalLMToy):
    """Dies while building the batch of step `at` (like a kill between two checkpoints)."""

    def __init__(self, config, at: int) -> None:
        super().__init__(config)
        self.at = at

    def batch(self, step, micro, generator):
        if step == self.at:
            raise Crash
        return super().batch(step, micro, generator)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-dropout"])
def test_a_resumed_run_repeats_the_uninterrupted_one_bitwise(tmp_path, lora):
    sections = {"optim": {"max_steps": 9, "grad_accum": 2, "weight_decay": 0.1},
                "train": {"save_every": 3, "eval_every": 4},
                "lora": {"enabled": lora, "rank": 4, "dropout": 0.2, "modules_to_save": ["norm"]}}
    run(tmp_path / "whole", **sections)
    crashed = toy_config(tmp_path / "resumed", **sections)
    with pytest.raises(Crash):
        trainer.train(crashed, CrashingToy(crashed, at=5))  # checkpoint-3 written; steps 4 and 5 logged, then lost
    assert [r["step"] for r in records(tmp_path / "resumed")] == [1, 2, 3, 4, 5]
    resumed = toy_config(tmp_path / "resumed", **{**sections, "train": {**sections["train"], "resume": True}})
    trainer.train(resumed, make_task(resumed))
    assert exact(records(tmp_path / "resumed")) == exact(records(tmp_path / "whole"))
    assert exact(records(tmp_path / "resumed", "eval")) == exact(records(tmp_path / "whole", "eval"))
    with safe_open(str(tmp_path / "resumed" / "checkpoint-9" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert all(n.endswith((".lora_A", ".lora_B")) or n == "norm.weight" for n in names) == lora
    assert (tmp_path / "resumed" / "adapter" / "adapter_config.json").is_file() == lora


class SelfTerminatingToy(CausalLMToy):
    def batch(self, step, micro, generator):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().batch(step, micro, generator)


def test_sigterm_checkpoints_and_stops_cleanly(tmp_path):
    config = toy_config(tmp_path, optim={"max_steps": 50})
    result = trainer.train(config, SelfTerminatingToy(config))
    assert result["stopped_early"] and result["step"] == 3 and math.isfinite(result["loss"])
    assert result["checkpoint"] == str(tmp_path / "checkpoint-3") and "model" not in result
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_run_killed_with_sigkill_resumes_bitwise(tmp_path):
    sections = {"optim": {"max_steps": 80}, "train": {"save_every": 5, "log_every": 1}}
    path = tmp_path / "run.toml"
    path.write_text(to_toml(toy_raw(tmp_path / "killed", **sections)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = subprocess.Popen([sys.executable, "-m", "canvaslm.train.trainer", str(path)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "killed" / "checkpoint-10").exists() and process.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.005)
        process.kill()  # SIGKILL: no chance to clean up
    finally:
        process.wait()
    killed_at = len(records(tmp_path / "killed"))
    assert 10 <= killed_at < 80
    run(tmp_path / "whole", **sections)
    resumed = toy_config(tmp_path / "killed", optim=sections["optim"], train={**sections["train"], "resume": True})
    trainer.train(resumed, make_task(resumed))
    assert exact(records(tmp_path / "killed")) == exact(records(tmp_path / "whole"))


def test_resuming_with_another_model_shape_is_a_clear_error(tmp_path):
    lora = {"enabled": True, "rank": 4}
    run(tmp_path, optim={"max_steps": 2}, lora=lora)
    for changed, message in (({**lora, "rank": 2}, "wrong shape"), ({"enabled": False}, "the full model")):
        config = toy_config(tmp_path, optim={"max_steps": 4}, lora=changed, train={"resume": True})
        with pytest.raises(CheckpointError, match=message):
            trainer.train(config, make_task(config))


def test_bf16_auto_follows_the_hardware(monkeypatch, tmp_path):
    from canvaslm.train import trainer

    config = toy_config(tmp_path, train={"bf16": "auto"}).train
    monkeypatch.setattr(trainer, "bf16_is_fast", lambda device: True)
    assert trainer.uses_bf16(config, torch.device("cpu"))
    monkeypatch.setattr(trainer, "bf16_is_fast", lambda device: False)
    assert not trainer.uses_bf16(config, torch.device("cpu"))
    assert trainer.uses_bf16(toy_config(tmp_path, train={"bf16": True}).train, torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.bf16"):
        toy_config(tmp_path, train={"bf16": "yes"})


def test_canvas_only_adapters_need_lora_and_a_diffusion_model(tmp_path):
    for sections in ({"lora": {"scope": "canvas"}},                          # LoRA off
                     {"lora": {"scope": "canvas", "enabled": True}}):        # an AR model (no canvas)
        config = toy_config(tmp_path, **sections)
        with pytest.raises(ConfigError, match="lora.scope.*canvas-only adapters need"):
            trainer.train(config, make_task(config))
    with pytest.raises(ConfigError, match="lora.scope"):
        toy_config(tmp_path, lora={"scope": "decoder"})
