"""examples/smol/convert.sh at toy scale, end to end on this CPU: data -> LoRA training of the real SmolLM2 ->
asset -> quality report -> sampler defaults; the asset it makes loads and chats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import canvaslm

ROOT = Path(__file__).resolve().parents[2]


def test_convert_script_runs_every_stage_at_toy_scale(tmp_path, monkeypatch):
    out = tmp_path / "smol"
    env = {**os.environ, "CANVASLM_HOME": str(tmp_path / "home"), "PATH": f"{Path(sys.executable).parent}:"
           f"{os.environ['PATH']}"}
    done = subprocess.run(["bash", "examples/smol/convert.sh", "toy", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["asset"] == str(out / "asset") and last["sampler_defaults"].startswith("entropy_bound=")

    train = json.loads((out / "train-summary.json").read_text())
    assert train["step"] == 4 and train["loss"] < 20 and (out / "train" / "loss.png").is_file()
    report = json.loads((out / "quality.json").read_text())
    assert report["prompts"] == 8 and len(report["diffusion"]) == 2
    assert report["autoregressive"]["genppl"] < 50  # the AR parent's own answers read as fluent to itself
    assert report["autoregressive"]["tokens_per_second_batch1"] > 0
    assert set(report["acceptance"]) >= {"genppl_ratio", "entropy_ratio", "tokens_per_forward", "cpu_speedup"}
    assert (out / "quality.png").stat().st_size > 10_000 and not (out / "quality.partial.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["acceptance"] == report["acceptance"]

    asset = json.loads((out / "asset" / "asset.json").read_text())
    assert asset["model_config"] == {"canvas_length": 16} and asset["training"]["step"] == 4
    chosen = dict(item.split("=") for item in last["sampler_defaults"].split(","))
    assert asset["generation_config"]["entropy_bound"] == float(chosen["entropy_bound"])
    assert asset["generation_config"]["max_denoising_steps"] == int(chosen["max_denoising_steps"]) == 8
    size = sum(f.stat().st_size for f in (out / "asset").rglob("*") if f.is_file())
    assert size < 64 << 20
    monkeypatch.setenv("CANVASLM_HOME", str(tmp_path / "home"))
    lm = canvaslm.load(out / "asset", device="cpu")
    assert lm.kind == "diffusion" and lm.network.canvas_length == 16
    assert lm.chat([{"role": "user", "content": "Hi"}], max_new_tokens=16, seed=0).forward_passes >= 1
