"""A shorter run of examples/tiny-cpu.toml: a random AR Llama converted to block diffusion on the digit-reversal
task must learn (accuracy far above chance, real sampling works) and resume exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from canvaslm.train.config import ConfigError, load_config
from canvaslm.train.tasks import make_task
from canvaslm.train.trainer import main, train

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-cpu.toml"
SHORT = ["optim.max_steps=160", "optim.warmup_steps=10", "train.eval_every=80", "train.save_every=80",
         "train.log_every=40", "eval.examples=48", "eval.sample_examples=48", "eval.noise_levels=[0.5, 1.0]"]


def metrics(out_dir: Path, split: str) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["split"] == split]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    config = load_config(EXAMPLE, SHORT + [f"train.out_dir={out}"])
    return out, train(config, make_task(config))


def test_accuracy_rises_far_above_chance_and_sampling_works(short_run):
    out, result = short_run
    first, last = metrics(out, "train")[0], metrics(out, "train")[-1]
    assert last["loss"] < 0.85 * first["loss"]
    # 10 digits + EOS: guessing scores about 0.1
    assert result["eval_denoise_token_accuracy_t0.5"] > 0.5
    assert result["eval_token_accuracy"] > 0.3  # real sampling with the inference loop
    assert result["tokens_per_forward"] > 0
    assert (out / "model" / "config.json").is_file() and (out / "loss.png").is_file()


def test_exported_model_loads_and_answers(short_run):
    import canvaslm
    from canvaslm.train import digits

    out, _ = short_run
    lm = canvaslm.load(out / "model")
    assert lm.kind == "diffusion" and lm.network.canvas_length == 8
    prompt, target = digits.example("reverse", [1, 2, 3, 4])
    result = lm.generate([prompt], max_new_tokens=8, seed=0)
    assert result.sequences.shape == (1, len(prompt) + 8)


def test_resume_is_exact(short_run, tmp_path):
    out, _ = short_run
    shutil.copytree(out / "checkpoint-80", tmp_path / "checkpoint-80")  # as if killed after the first checkpoint
    config = load_config(EXAMPLE, SHORT + [f"train.out_dir={tmp_path}", "train.resume=true"])
    resumed = train(config, make_task(config))
    full = {r["step"]: r["loss"] for r in metrics(out, "train")}
    again = {r["step"]: r["loss"] for r in metrics(tmp_path, "train")}
    assert resumed["step"] == 160 and min(again) > 80
    assert all(again[step] == full[step] for step in again)  # bitwise the same curve


def test_a_model_without_a_diffusion_head_is_refused_before_compute(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace("diffusion_canvas_length = 8\n", ""))
    with pytest.raises(ConfigError, match="diffusion_canvas_length"):
        make_task(load_config(bad, [f"train.out_dir={tmp_path / 'out'}"]))
    assert main(str(bad), [f"train.out_dir={tmp_path / 'out2'}"]) == 2
    assert "autoregressive" in capsys.readouterr().err
    assert not (tmp_path / "out2" / "metrics.jsonl").exists()


def test_missing_training_data_is_refused_before_compute(tmp_path, capsys):
    config = tmp_path / "shards.toml"
    text = EXAMPLE.read_text()
    data = text[text.index("[data]"):text.index("[objective]")]
    config.write_text(text.replace(data, f"[data]\ntask = \"shards\"\npath = \"{tmp_path / 'no-such-data'}\"\n\n"))
    assert main(str(config), [f"train.out_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "no-such-data" in err and "bad override" not in err and "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
