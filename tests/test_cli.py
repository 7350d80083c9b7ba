"""The `canvaslm` command, run as a user would (a subprocess), on a tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.reference import tiny_checkpoint


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "canvaslm.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-model")
    tiny_checkpoint(path)
    return str(path)


def test_generate_json_reports_text_ids_and_speed(model_dir):
    out = run("generate", "hello world", "--model", model_dir, "-n", "16", "--seed", "0", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result) >= {"text", "token_ids", "tokens_per_forward", "forward_passes", "tokens_per_second"}
    assert len(result["token_ids"]) <= 16 and result["forward_passes"] >= 1
    again = json.loads(run("generate", "hello world", "--model", model_dir, "-n", "16", "--seed", "0",
                           "--json").stdout.strip().splitlines()[-1])
    assert again["token_ids"] == result["token_ids"]  # seeded runs repeat
    from canvaslm.hardware import resolve_dtype, resolve_quantize

    auto = {"dtype": str(resolve_dtype("auto", "cpu")).removeprefix("torch."), "quantize": resolve_quantize("auto")}
    assert {k: result[k] for k in auto} == auto  # the machine's choice by default
    plain = json.loads(run("generate", "hello world", "--model", model_dir, "-n", "4", "--dtype", "float32",
                           "--quantize", "none", "--json").stdout.strip().splitlines()[-1])
    assert plain["dtype"] == "float32" and plain["quantize"] == "none"


def test_generate_with_a_json_schema_file_validates_or_names_the_file(tmp_path):
    import jsonschema

    from tests.reference import tiny_smol_diffusion

    tiny_smol_diffusion(16, layers=1, max_positions=512).save(tmp_path / "m")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}}}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    out = run("generate", "Answer:", "-m", str(tmp_path / "m"), "--json-schema", str(tmp_path / "schema.json"),
              "--seed", "0", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    jsonschema.validate(json.loads(result["text"]), schema)
    assert result["forward_passes"] >= 1
    (tmp_path / "bad.json").write_text("{not json")
    for path, message in ((tmp_path / "missing.json", "cannot read the schema file"),
                          (tmp_path / "bad.json", "not a JSON schema file")):
        out = run("generate", "x", "-m", str(tmp_path / "m"), "--json-schema", str(path))
        assert out.returncode == 2 and f"{path}: {message}" in out.stderr and "Traceback" not in out.stderr


def test_show_canvas_reports_each_step_when_not_a_terminal(model_dir):
    out = run("generate", "hello", "--chat", "--model", model_dir, "-n", "8", "--seed", "0", "--show-canvas",
              "--max-denoising-steps", "4")
    assert out.returncode == 0, out.stderr
    steps = [line for line in out.stderr.splitlines() if line.startswith("canvas 1 · step")]
    assert 1 <= len(steps) <= 4 and "accepted" in steps[0]


def test_chat_reads_turns_from_stdin(model_dir):
    out = run("chat", "--model", model_dir, "-n", "8", "--seed", "0", stdin="hello\nhow are you\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) >= 2


def test_info_json(model_dir):
    out = run("info", model_dir, "--json")
    facts = json.loads(out.stdout)
    assert facts["kind"] == "diffusion" and facts["canvas_length"] == 8 and facts["tokenizer"] is True
    assert facts["sampling_defaults"]["max_denoising_steps"] == 48


def test_bad_model_path_is_a_one_line_error(tmp_path):
    out = run("generate", "hi", "--model", str(tmp_path / "missing"))
    assert out.returncode == 2
    assert "error:" in out.stderr and "Traceback" not in out.stderr


def test_bad_sampling_option_is_a_one_line_error(model_dir):
    out = run("generate", "hi", "--model", model_dir, "--temperature", "0.5")
    assert out.returncode == 2 and "autoregressive" in out.stderr and "Traceback" not in out.stderr


def test_serve_refuses_batch_limits_below_one_before_loading(model_dir):
    for flag in ("--max-batch", "--max-draft-batch"):
        out = run("serve", model_dir, flag, "0")
        assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr
        assert out.stderr.strip() == "canvaslm: error: --max-batch, --max-queue and --max-draft-batch must be >= 1"


def test_quality_and_asset_errors_are_one_line(model_dir, tmp_path):
    out = run("quality", model_dir, "--judge", model_dir, "--prompts", str(tmp_path / "none.jsonl"),
              "--out", str(tmp_path / "q.json"))
    assert out.returncode == 2 and "quality needs a diffusion model and an autoregressive judge" in out.stderr
    assert "Traceback" not in out.stderr
    out = run("asset", "pack", str(tmp_path), "--out", str(tmp_path / "asset"))
    assert out.returncode == 2 and out.stderr.startswith("canvaslm: error:") and "adapter" in out.stderr
    out = run("asset", "pack", str(tmp_path), "--out", str(tmp_path / "asset"), "--set", "entropy_bound")
    assert out.returncode == 2 and "key=value" in out.stderr


def test_a_plain_continuation_that_ends_at_once_says_why_on_stderr():
    # SmolLM2-Instruct ends a finished question at once unless it is asked through its chat template.
    plain = run("generate", "Why is the sky blue?", "-m", "smol-ar", "-n", "8", "--temperature", "0", "--json")
    assert plain.returncode == 0, plain.stderr
    result = json.loads(plain.stdout)  # stdout stays exactly one JSON object
    assert result["token_ids"] == [] and result["finish_reason"] == "stop"
    assert "ended the text at once" in plain.stderr and "--chat" in plain.stderr
    asked = run("generate", "Why is the sky blue?", "-m", "smol-ar", "-n", "8", "--temperature", "0", "--chat")
    assert asked.returncode == 0 and asked.stdout.strip() and "ended the text at once" not in asked.stderr
