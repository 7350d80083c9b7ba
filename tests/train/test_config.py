"""Training config: every mistake is a clear ConfigError (file, section.key, expected, found) before any compute."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from canvaslm.errors import CanvasError
from canvaslm.train import trainer
from canvaslm.train.config import ConfigError, load_config, parse_config, read_section
from canvaslm.train.tasks import make_task
from tests.train.toy_config import to_toml, toy_config, toy_raw


def error_for(raw: dict) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "run.toml")
    return str(e.value)


def test_a_valid_config_reads_typed_values(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(to_toml(toy_raw("out", optim={"betas": [0.9, 0.95], "lr": 1}, lora={"enabled": True})))
    config = load_config(path)
    assert config.optim.betas == (0.9, 0.95) and config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.lora.enabled and config.lora.rank == 16 and config.train.distributed == "ddp"
    assert config.data == {"task": "causal-lm-toy", "seq_len": 12} and config.source == str(path)


def test_a_typo_names_the_key_and_suggests_ours():
    message = error_for(toy_raw("out", optim={"learning_rat": 1e-3}))
    assert message.startswith("run.toml: optim.learning_rat: unknown key")
    assert "did you mean 'lr'?" in message
    assert "did you mean 'train'?" in error_for({**toy_raw("out"), "trian": {}})
    assert "did you mean 'rank'?" in error_for(toy_raw("out", lora={"r": 8}))


def test_wrong_types_say_expected_and_found():
    message = error_for(toy_raw("out", optim={"max_steps": "10"}))
    assert "optim.max_steps: wrong type; expected an integer; found string '10'" in message
    assert "found boolean True" in error_for(toy_raw("out", optim={"batch_size": True}))
    assert "expected an array of 2 numbers" in error_for(toy_raw("out", optim={"betas": [0.9]}))
    assert "lora.targets" in error_for(toy_raw("out", lora={"targets": [1, 2]}))
    assert "[optim]: must be a table" in error_for({**toy_raw("out"), "optim": 3})


def test_missing_keys_sections_and_bad_values():
    raw = toy_raw("out")
    del raw["train"]["out_dir"]
    assert "train.out_dir: missing required key; expected a string" in error_for(raw)
    raw = toy_raw("out")
    del raw["data"]
    assert "[data]: missing section" in error_for(raw)
    assert "give exactly one" in error_for(toy_raw("out", model={"source": "x.gguf"}))
    out_of_range = error_for(toy_raw("out", optim={"lr": -1}))
    assert "optim.lr: value out of range; expected a value > 0; found -1.0" in out_of_range
    assert "did you mean 'fsdp'?" in error_for(toy_raw("out", train={"distributed": "fdsp"}))
    assert "optim.warmup_steps" in error_for(toy_raw("out", optim={"warmup_steps": 99}))


def test_model_init_is_read_like_a_config_json():
    def init_error(**changes) -> str:
        raw = toy_raw("out")
        raw["model"]["init"].update(changes)
        raw["model"]["init"] = {k: v for k, v in raw["model"]["init"].items() if v is not None}
        with pytest.raises(CanvasError) as e:
            parse_config(raw, "run.toml")
        return str(e.value)

    assert "model.init.tie_word_embedings: unknown llama config key (did you mean 'tie_word_embeddings'?)" in \
        init_error(tie_word_embedings=True)
    assert "model.init.hiden_size: unknown llama config key (did you mean 'hidden_size'?)" in \
        init_error(hiden_size=32, hidden_size=None)
    assert "field 'num_hidden_layers'; expected int; found str" in init_error(num_hidden_layers="2")


def test_overrides_are_checked_like_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(to_toml(toy_raw("out")))
    config = load_config(path, ["optim.lr=1e-2", "train.out_dir=elsewhere/run", "model.init.hidden_size=16"])
    assert config.optim.lr == 1e-2 and config.train.out_dir == "elsewhere/run"
    assert config.model.init["hidden_size"] == 16
    with pytest.raises(ConfigError, match="optim.learning_rate: unknown key.*did you mean 'lr'"):
        load_config(path, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="bad override"):
        load_config(path, ["lr=1"])


def test_file_problems_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.toml: file: config file not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 1")
    with pytest.raises(ConfigError, match="bad.toml: file: invalid TOML"):
        load_config(bad)


def test_task_sections_are_checked_by_the_task():
    with pytest.raises(ConfigError, match="data.seq_lne: unknown key.*did you mean 'seq_len'"):
        make_task(toy_config("out", data={"seq_lne": 8}))
    with pytest.raises(ConfigError, match="data.task: unknown task.*causal-lm-toy.*did you mean 'causal-lm-toy'"):
        make_task(toy_config("out", data={"task": "causal-lm-tyo"}))


def test_read_section_serves_free_form_tables():
    @dataclass(frozen=True)
    class Options:
        noise: float = 0.5
        kind: str = "flat"

    assert read_section(Options, {"noise": 1}, "f.toml", "objective") == Options(noise=1.0)
    with pytest.raises(ConfigError, match="f.toml: objective.nosie: unknown key.*did you mean 'noise'"):
        read_section(Options, {"nosie": 1}, "f.toml", "objective")


def test_main_reports_mistakes_before_any_compute(tmp_path, monkeypatch, capsys):
    def no_compute(*args, **kwargs):
        raise AssertionError("a model was built for an invalid config")

    monkeypatch.setattr(trainer, "_prepare_model", no_compute)
    path = tmp_path / "run.toml"
    for raw in (toy_raw(tmp_path / "a", optim={"learning_rat": 1}), toy_raw(tmp_path / "b", data={"seqlen": 3}),
                toy_raw(tmp_path / "c", train={"resume": str(tmp_path / "nowhere")})):
        path.write_text(to_toml(raw))
        assert trainer.main(str(path), []) == 2
        err = capsys.readouterr().err
        assert err.startswith("canvaslm: error: ") and err.count("\n") == 1


def test_an_out_dir_with_checkpoints_needs_resume(tmp_path, monkeypatch):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    monkeypatch.setattr(trainer, "_prepare_model", lambda *a: pytest.fail("built a model"))
    config = toy_config(tmp_path)
    with pytest.raises(ConfigError, match="train.out_dir: already holds checkpoints.*train.resume = true"):
        trainer.train(config, make_task(config))


def test_an_eval_sampling_order_outside_the_knob_choices_names_file_and_field():
    """[eval] order is checked when the config is read (not at the first evaluation, an hour into a run)."""
    from canvaslm.train.diffusion_tasks import EvalOptions

    assert read_section(EvalOptions, {"order": "left_to_right"}, "run.toml", "eval").order == "left_to_right"
    with pytest.raises(ConfigError, match=r"run\.toml: eval\.order: unsupported value; expected one of "
                                          r"\['confidence', 'left_to_right'\]; found 'l2r'"):
        read_section(EvalOptions, {"order": "l2r"}, "run.toml", "eval")
