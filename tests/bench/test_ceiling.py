"""The tokens-per-pass ceiling: the lookahead marginals against brute-force enumeration on a tiny model, the
left-to-right replay by hand, and a whole report."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch

from canvaslm.bench.ceiling import ceiling, lookahead, plot_ceiling, replay
from tests.bench.test_quality import tiny_lm
from tests.reference import tiny_smol_diffusion


def test_lookahead_marginals_equal_the_sum_over_every_path_in_between():
    judge = tiny_lm(False, seed=3)
    vocab, temperature = judge.network.vocab_size, 0.7
    prompt, answer_ids = [3, 4, 5], [6, 7, 8]
    best, missing = lookahead(judge.network, prompt, answer_ids, temperature, widths=(vocab, vocab))

    def dist(contexts):  # next-token distributions after each context (all of one length)
        return (judge.logits(contexts)[:, -1].float() / temperature).softmax(-1)

    for j in range(len(answer_ids)):
        context = prompt + answer_ids[:j]
        first = dist([context])[0]
        second = dist([context + [c] for c in range(vocab)])                      # [V, V]
        pairs = list(itertools.product(range(vocab), repeat=2))
        third = dist([context + list(p) for p in pairs])                          # [V * V, V]
        weights = torch.tensor([float(first[a] * second[a, b]) for a, b in pairs])
        expected = [first.max(), (first[:, None] * second).sum(0).max(), (weights[:, None] * third).sum(0).max()]
        assert best[j].tolist() == pytest.approx([float(e) for e in expected], abs=1e-5)
        assert missing[j].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-5)  # every path expanded


def test_narrow_lookahead_brackets_the_marginal_with_the_mass_it_left_out():
    judge = tiny_lm(False, seed=3)
    vocab = judge.network.vocab_size
    full, _ = lookahead(judge.network, [3, 4, 5], [6, 7], 1.0, widths=(vocab,))
    narrow, missing = lookahead(judge.network, [3, 4, 5], [6, 7], 1.0, widths=(2,))
    assert (missing[:, 1] > 0).all() and (narrow[:, 0] == full[:, 0]).all()
    assert (narrow[:, 1] <= full[:, 1] + 1e-6).all() and (full[:, 1] <= narrow[:, 1] + missing[:, 1] + 1e-6).all()


def test_replay_keeps_a_prefix_of_sure_positions_and_never_crosses_a_canvas():
    sure = torch.tensor([[True, True, True, False],    # j = 0: keeps positions 0, 1, 2
                         [True, True, True, True],
                         [True, True, True, True],
                         [True, True, True, True],     # j = 3: 3 and 4 (5 is in the next canvas)
                         [True, True, True, True],
                         [True, False, True, True],    # j = 5: a new canvas, keeps 5 only
                         [True, True, True, True]])    # j = 6: 6, then the answer ends
    assert replay(sure, canvas=5) == [3, 2, 1, 1]
    assert replay(sure[:, :1], canvas=5) == [1] * 7  # depth 1: one token a pass
    # each canvas's first token (0 and 5) from the causal pass: the passes start at 1 (keeps 1, 2, 3, 4) and 6
    assert replay(sure, canvas=5, first_from_causal=True) == [4, 1]
    assert replay(sure[:, :1], canvas=5, first_from_causal=True) == [1] * 5


def test_the_ceiling_falls_as_the_threshold_rises_and_bounds_the_strict_count(tmp_path):
    judge = tiny_lm(False, seed=1)
    report = ceiling(judge, [[3, 4, 5], [6, 7]], temperature=0.7, max_new_tokens=12, canvas=4, widths=(4, 2),
                     thresholds=(0.01, 0.5, 0.99), batch_size=2)
    rows = report["rows"]
    assert report["answer_tokens"] > 0 and len(report["sure_share_at_0.9_by_depth"]) == 3
    generous = [r["tokens_per_pass"] for r in rows]
    assert generous == sorted(generous, reverse=True) and 1.0 <= generous[-1] and generous[0] <= 3.0
    assert all(r["tokens_per_pass"] >= r["tokens_per_pass_strict"] >= 1.0 for r in rows)
    assert all(r["tokens_per_pass_first_causal"] > r["tokens_per_pass"] for r in rows)
    assert plot_ceiling(report, tmp_path / "c.png") and (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_ceiling_writes_the_report_and_plot_and_refuses_bad_input_in_one_line(tmp_path):
    from tests.bench.test_bench import bench
    from tests.bench.test_train import tiny_ar_model

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name a colour."}\n{"prompt": "Count to three."}\n')
    model = tiny_ar_model(tmp_path / "tiny")
    out = tmp_path / "ceiling.json"
    report = bench("ceiling", "-m", model, "--prompts", str(prompts), "--limit", "2", "--new-tokens", "6",
                   "--canvas", "4", "--out", str(out))
    assert report["prompts"] == 2 and report["canvas_length"] == 4 and report["temperature"] == 0.7
    assert [r["accept_probability"] for r in report["rows"]] == [0.5, 0.7, 0.8, 0.9, 0.95]
    assert out.with_suffix(".png").is_file() and json.loads(out.read_text())["rows"] == report["rows"]
    failed = subprocess.run([sys.executable, "-m", "canvaslm.cli", "bench", "ceiling", "-m", model], text=True,
                            capture_output=True, timeout=300)
    assert failed.returncode != 0 and "needs --prompts" in failed.stderr and "Traceback" not in failed.stderr
    tiny_smol_diffusion(4, layers=1).save(tmp_path / "canvas")
    for extra, message in ((["-m", str(tmp_path / "canvas")], "must be the autoregressive parent"),
                           (["-m", model, "--temperature", "0"], "--temperature must be > 0")):
        failed = subprocess.run([sys.executable, "-m", "canvaslm.cli", "bench", "ceiling", "--prompts", str(prompts),
                                 *extra], text=True, capture_output=True, timeout=300)
        assert failed.returncode != 0 and message in failed.stderr and "Traceback" not in failed.stderr
        assert failed.stdout == ""
