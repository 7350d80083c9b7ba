"""`canvaslm bench decoding`: the three ways a diffusion model writes, on the same weights, in one JSON (+ PNG)."""

from __future__ import annotations

import json

import pytest

from canvaslm.bench.decoding import bench_decoding
from canvaslm.cli import main
from canvaslm.errors import CanvasError
from tests.reference import tiny_checkpoint


def test_bench_decoding_reports_every_mode_and_verified_agrees_with_ar(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "dg", canvas_length=4, logit_gain=1.0)
    out = tmp_path / "decoding.json"
    assert main(["bench", "decoding", "-m", str(tmp_path / "dg"), "--batch-sizes", "1,3", "--new-tokens", "12",
                 "--out", str(out), "--threads", "1"]) == 0
    report = json.loads(out.read_text())["decoding"]
    assert json.loads(capsys.readouterr().out)["decoding"] == report  # stdout is the JSON alone
    runs = {(r["decoding"], r["batch"]): r for r in report["runs"]}
    assert set(runs) == {(m, b) for m in ("diffusion", "verified", "autoregressive") for b in (1, 3)}
    for batch in (1, 3):
        verified = runs["verified", batch]
        assert verified["agreement_with_autoregressive"] == 1.0  # greedy, float32: lossless
        assert verified["tokens_per_round"] >= 1 and verified["rounds"] >= 1
        by_position = verified["acceptance_by_position"]  # shares of rounds that kept draft token j
        assert len(by_position) == report["draft_size"] - 1
        assert sum(by_position) == pytest.approx(verified["accepted_drafts"] / verified["rounds"], abs=0.01)
        assert runs["autoregressive", batch]["tokens_per_forward"] <= 1.0
        assert runs["autoregressive", batch]["speed_vs_autoregressive"] == 1.0
        # every batch size covers all 8 prompts: batch 1 each alone, batch 3 in 3 batches (the last one wraps)
        assert {r["prompts"] for r in report["runs"] if r["batch"] == batch} == {8 if batch == 1 else 9}
    assert report["draft_size"] == 4  # float32, not packed: a whole canvas
    assert (tmp_path / "decoding.png").stat().st_size > 10_000


def test_bench_decoding_needs_a_diffusion_model(tmp_path):
    from canvaslm.engine.lm import LM
    from canvaslm.models import llama
    from tests.train.toy_config import MODEL_INIT

    ar = LM(llama.Model(llama.Config.from_hf({"model_type": "llama", **MODEL_INIT}, "t")).eval(), None, "ar")
    with pytest.raises(CanvasError, match="autoregressive"):
        bench_decoding(ar, [1], 4)


def test_the_modes_take_turns_batch_by_batch_so_drift_hits_each_alike(tmp_path, monkeypatch):
    import canvaslm.bench.decoding as decoding
    from canvaslm import load

    tiny_checkpoint(tmp_path / "dg", canvas_length=4, logit_gain=1.0)
    calls, run_group = [], decoding._run_group

    def recorded(lm, mode, group, *args):
        calls.append((mode, len(group)))
        return run_group(lm, mode, group, *args)

    monkeypatch.setattr(decoding, "_run_group", recorded)
    order = ("autoregressive", "verified", "diffusion")
    report = bench_decoding(load(str(tmp_path / "dg")), [1, 4], new_tokens=6)
    # one untimed batch of each mode first (compilation, first-call costs), then the timed turns
    turns = [(mode, 1) for mode in order] * (1 + 8) + [(mode, 4) for mode in order] * (1 + 2)
    assert calls == turns  # not all 8 prompts in one mode, then all in the next
    assert [(r["decoding"], r["batch"]) for r in report["runs"]] == [(m, b) for b in (1, 4) for m in order]
    assert all(r["agreement_with_autoregressive"] == 1.0 for r in report["runs"] if r["decoding"] == "verified")
    # the warm-up batches are not counted: 8 prompts a mode at both sizes (batch 4: two batches of 4)
    assert {r["prompts"] for r in report["runs"]} == {8}


def test_decodings_picks_the_modes_timed_beside_the_autoregressive_one(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "dg", canvas_length=4, logit_gain=1.0)
    out = tmp_path / "decoding.json"
    assert main(["bench", "decoding", "-m", str(tmp_path / "dg"), "--batch-sizes", "1", "--new-tokens", "6",
                 "--decodings", "diffusion", "--out", str(out), "--threads", "1"]) == 0
    report = json.loads(out.read_text())["decoding"]
    assert [r["decoding"] for r in report["runs"]] == ["autoregressive", "diffusion"]
    assert main(["bench", "decoding", "-m", str(tmp_path / "dg"), "--decodings", "diffusion,beam"]) == 2
    assert "--decodings takes autoregressive, verified, diffusion (comma-separated), got beam" in \
        capsys.readouterr().err


def test_settings_of_the_canvases_take_their_turns_beside_the_other_modes(tmp_path, capsys):
    """`--setting`: the canvases run once per sampler setting, each a row timed in the same turns as the others;
    the rows differ by what the setting does (here canvases of 2: more commits, other tokens); a setting the
    model refuses is a one-line error before any timing."""
    tiny_checkpoint(tmp_path / "dg", canvas_length=4, logit_gain=1.0)
    out = tmp_path / "decoding.json"
    assert main(["bench", "decoding", "-m", str(tmp_path / "dg"), "--batch-sizes", "1", "--new-tokens", "12",
                 "--setting", "canvas_size=4", "--setting", "canvas_size=2", "--out", str(out), "--threads", "1"]) == 0
    report = json.loads(out.read_text())["decoding"]
    assert [r["decoding"] for r in report["runs"]] == ["autoregressive", "verified", "diffusion · canvas_size=4",
                                                       "diffusion · canvas_size=2"]
    assert report["diffusion_settings"]["diffusion · canvas_size=2"]["canvas_size"] == 2
    four, two = report["runs"][2:]
    assert four["tokens"] > 0 and two["tokens"] > 0
    assert (four["tokens"], four["forward_passes"]) != (two["tokens"], two["forward_passes"])
    capsys.readouterr()
    assert main(["bench", "decoding", "-m", str(tmp_path / "dg"), "--setting", "canvas_size=8", "--threads", "1"]) == 2
    err = capsys.readouterr()
    assert err.out == "" and "canvas_size must be at most this model's trained canvas of 4" in err.err
