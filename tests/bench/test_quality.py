"""The quality report: each metric on hand-made cases, the judge's NLL against a direct computation, the
acceptance rules, and a whole report (with its frontier plot) on tiny random models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from canvaslm.bench.quality import (SystemReport, acceptance, distinct_ngrams, doubled_words, judge_nll, plot_frontier,
                                    quality_report, read_prompts, shared_and_own, unigram_entropy)
from canvaslm.engine.lm import LM
from canvaslm.errors import CanvasError
from canvaslm.models import llama
from tests.reference import tiny_tokenizer
from tests.train.toy_config import MODEL_INIT


def tiny_lm(diffusion: bool, seed: int = 0) -> LM:
    torch.manual_seed(seed)
    network = llama.Model(llama.Config.from_hf({"model_type": "llama", **MODEL_INIT}, "test"))
    if diffusion:
        network.to_diffusion(4)
    return LM(network.eval(), None, "diffusion" if diffusion else "ar", {"eos_token_id": 1, "pad_token_id": 0})


def test_unigram_entropy_and_distinct_ngrams_by_hand():
    assert unigram_entropy([]) == 0.0 and unigram_entropy([7, 7, 7]) == 0.0
    assert unigram_entropy([1, 2, 3, 4]) == pytest.approx(math.log(4))
    assert unigram_entropy([1, 1, 2, 2]) == pytest.approx(math.log(2))
    assert distinct_ngrams([[1, 2, 3, 4, 1, 2, 3, 4]]) == pytest.approx(4 / 5)  # 1234 repeats once
    assert distinct_ngrams([[1, 2, 3, 4], [1, 2, 3, 4]]) == pytest.approx(1 / 2)
    assert distinct_ngrams([[1, 2, 3]]) == 0.0


def test_judge_nll_is_the_sum_of_response_token_log_probabilities():
    judge = tiny_lm(False)
    prompts, responses, stopped = [[3, 4, 5], [6, 7]], [[8, 9], [10, 11, 12]], [True, False]
    total, count = judge_nll(judge, prompts, responses, stopped, batch_size=2)
    expected = 0.0
    for prompt, response in [([3, 4, 5], [8, 9, 1]), ([6, 7], [10, 11, 12])]:  # EOS (1) scored where emitted
        logp = judge.logits([prompt + response])[0].log_softmax(-1)
        expected -= sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(response))
    assert count == 6 and total == pytest.approx(expected, rel=1e-5)


def test_doubled_words_counts_a_word_equal_to_the_one_before_it_per_thousand():
    texts = ["The sky sky is blue.", "It is, is it? Yes, yes: 42 42 times", ""]
    assert doubled_words(texts) == pytest.approx(1000 * 3 / 12)  # sky sky, is is (punctuation between), yes yes
    assert doubled_words(["", "12 12"]) is None


def _report(**fields) -> SystemReport:
    base = dict(name="x", setting={}, genppl=10.0, unigram_entropy=3.0, distinct_4=0.9, tokens_per_forward=1.0,
                mean_response_tokens=100.0, empty_answers=0, tokens_per_second_batch1=10.0, samples=[])
    return SystemReport(**{**base, **fields})


def test_acceptance_applies_every_target():
    ar = _report()
    good = acceptance(_report(genppl=14.9, unigram_entropy=2.6, tokens_per_forward=3.1,
                              tokens_per_second_batch1=21.0), ar)
    assert good["all_passed"] and good["genppl_ratio"]["value"] == pytest.approx(1.49)
    assert good["stretch"] == {"tokens_per_forward": False, "cpu_speedup": False}  # beyond: >= 4, >= 3x
    for change, failing in [({"genppl": 15.1}, "genppl_ratio"), ({"unigram_entropy": 2.5}, "entropy_ratio"),
                            ({"tokens_per_forward": 2.9}, "tokens_per_forward"),
                            ({"empty_answers": 1}, "empty_answers"),
                            ({"tokens_per_second_batch1": 19.0}, "cpu_speedup")]:
        fields = dict(genppl=14.9, unigram_entropy=2.6, tokens_per_forward=3.1, tokens_per_second_batch1=21.0)
        result = acceptance(_report(**{**fields, **change}), ar)
        assert not result["all_passed"] and not result[failing]["passed"]
        assert all(v["passed"] for k, v in result.items() if k not in (failing, "all_passed", "stretch"))
    best = acceptance(_report(genppl=14.9, unigram_entropy=2.6, tokens_per_forward=4.0,
                              tokens_per_second_batch1=30.0), ar)
    assert best["stretch"] == {"tokens_per_forward": True, "cpu_speedup": True}


def test_a_whole_report_on_tiny_models(tmp_path):
    model, judge = tiny_lm(True), tiny_lm(False, seed=1)
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    settings = [{}, {"entropy_bound": 5.0}]
    report = quality_report(model, judge, prompts, settings, max_new_tokens=8, batch_size=3, speed_prompts=2,
                            show_progress=False)
    assert report["prompts"] == 4 and len(report["diffusion"]) == 2
    default, loose = report["diffusion"]
    assert default["tokens_per_second_batch1"] > 0 and loose["tokens_per_second_batch1"] is None
    assert all(0 < d["tokens_per_forward"] <= 4 for d in (default, loose))  # at most a canvas (4) per pass
    for system in (report["autoregressive"], default):
        assert system["genppl"] > 1 and 0 <= system["distinct_4"] <= 1 and system["mean_response_tokens"] <= 8
        assert system["doubled_words"] is None or 0 <= system["doubled_words"] <= 1000
    assert 0 < report["autoregressive"]["tokens_per_forward"] <= 1.0  # one token per pass at most (early EOS: less)
    verified = report["verified"]  # the model's causal pass, checking its canvas drafts, at the AR setting
    assert verified["setting"] == {"temperature": 0.7, "decoding": "verified"} and verified["genppl"] > 1
    assert verified["tokens_per_second_batch1"] > 0 and 0 < verified["mean_response_tokens"] <= 8
    assert set(report["acceptance"]) == {"genppl_ratio", "entropy_ratio", "tokens_per_forward", "empty_answers",
                                         "cpu_speedup", "all_passed", "stretch"}
    json.dumps(report)  # serializable as written
    assert plot_frontier(report, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    with pytest.raises(CanvasError, match="diffusion model and an autoregressive judge"):
        quality_report(judge, judge, prompts, settings)
    answered = []  # a setting the model does not take fails before anything is answered
    model.generate = lambda *a, **k: answered.append(a)  # type: ignore[method-assign]
    with pytest.raises(CanvasError, match=r"\['temperature'\] apply to autoregressive models"):
        quality_report(model, judge, prompts, [{}, {"temperature": 0.0}], show_progress=False)
    with pytest.raises(CanvasError, match="entropy_bound"):
        quality_report(model, judge, prompts, [{"entropy_bound": -1.0}], show_progress=False)
    assert answered == []
    del model.generate
    assert report["precision"]["judge_scoring"] == {"dtype": "float32", "quantize": "none"}
    # another scorer (the CLI's float32 judge) scores the same answers differently
    rescored = quality_report(model, judge, prompts, settings[:1], max_new_tokens=8, batch_size=3, speed_prompts=0,
                              show_progress=False, verified=False, scorer=tiny_lm(False, seed=2))
    ar, again = report["autoregressive"], rescored["autoregressive"]
    assert again["mean_response_tokens"] == ar["mean_response_tokens"] and again["genppl"] != ar["genppl"]


def test_ar_reference_rows_answer_at_their_own_temperature_and_leave_the_acceptance_at_0_7(tmp_path):
    model, judge = tiny_lm(True), tiny_lm(False, seed=1)
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11]]
    plain = quality_report(model, judge, prompts, [{}], max_new_tokens=8, batch_size=3, speed_prompts=0,
                           show_progress=False, verified=False)
    report = quality_report(model, judge, prompts, [{}], max_new_tokens=8, batch_size=3, speed_prompts=0,
                            show_progress=False, verified=False, ar_temperatures=[0.0, 0.7])
    greedy, again = report["ar_references"]
    assert greedy["setting"] == {"temperature": 0.0} and greedy["name"] == "autoregressive T=0"
    assert again["genppl"] == report["autoregressive"]["genppl"]  # the same setting and seed: the same answers
    assert greedy["genppl"] < report["autoregressive"]["genppl"]  # the judge's own greedy answers score best
    assert report["acceptance"] == plain["acceptance"] and plain["ar_references"] == []
    assert plot_frontier(report, tmp_path / "frontier.png")
    answered = []  # a temperature out of range fails before anything is answered
    judge.generate = lambda *a, **k: answered.append(a)  # type: ignore[method-assign]
    with pytest.raises(CanvasError, match="temperature"):
        quality_report(model, judge, prompts, [{}], show_progress=False, ar_temperatures=[-1.0])
    assert answered == []


def test_prompts_from_jsonl_with_training_prompts_excluded(tmp_path):
    tokenizer = tiny_tokenizer(64)
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hello"}\n\n{"messages": [{"role": "user", "content": "bye"}]}\n')
    prompts = read_prompts(path, 10, tokenizer)
    assert len(prompts) == 2 and all(prompts)
    assert read_prompts(path, 1, tokenizer) == prompts[:1]
    path.write_text('{"prompt": "hello"}\n[1, 2]\n')
    with pytest.raises(CanvasError, match=r"prompts.jsonl:2: expected"):
        read_prompts(path, 10, tokenizer)
    with pytest.raises(CanvasError, match="not found"):
        read_prompts(tmp_path / "nope.jsonl", 10, tokenizer)


def write_examples(path, examples):
    """A data directory in the shard format holding (prompt, response) id lists."""
    import json

    import numpy as np

    path.mkdir()
    flat, rows = [], []
    for prompt, response in examples:
        rows.append((len(flat), len(prompt), len(response)))
        flat += prompt + response
    np.asarray(flat, "<u4").tofile(path / "tokens.bin")
    np.save(path / "index.npy", np.asarray(rows, np.int64).reshape(-1, 3))
    (path / "manifest.json").write_text(json.dumps({"format": "canvaslm-examples", "format_version": 1,
                                                    "examples": len(rows), "tokens": len(flat),
                                                    "tokenizer": {"vocab_sha256": "x"}}))
    return path


def test_prompts_seen_in_any_excluded_training_directory_are_dropped(tmp_path):
    prompts = write_examples(tmp_path / "eval", [([1, 2], [3]), ([4, 5], [6]), ([7], [8]), ([9], [1])])
    first = write_examples(tmp_path / "a", [([1, 2], [0])])
    second = write_examples(tmp_path / "b", [([7], [0])])
    tokenizer = tiny_tokenizer(64)
    assert read_prompts(prompts, 10, tokenizer) == [[1, 2], [4, 5], [7], [9]]
    assert read_prompts(prompts, 10, tokenizer, first) == [[4, 5], [7], [9]]
    assert read_prompts(prompts, 10, tokenizer, [first, second]) == [[4, 5], [9]]
    assert read_prompts(prompts, 1, tokenizer, [first, second]) == [[9]]


def test_speeds_are_timed_with_the_systems_taking_turns_prompt_by_prompt():
    """A shared machine's speed drifts within minutes: timing one system after the other gave it to one of them."""
    from types import SimpleNamespace

    from canvaslm.bench.quality import tokens_per_second

    calls = []

    class Recorder:
        def __init__(self, name: str, writes: int) -> None:
            self.name, self.writes = name, writes

        def generate(self, prompts, max_new_tokens, seed, **setting):
            calls.append((self.name, len(prompts[0]), max_new_tokens, seed, setting))
            return SimpleNamespace(sequences=torch.zeros(1, len(prompts[0]) + self.writes, dtype=torch.long))

        def decode_new(self, sequence, prompt_length):
            return list(range(len(sequence) - prompt_length)), ""

    prompts = [[1], [1, 2], [1, 2, 3]]
    speeds = tokens_per_second([(Recorder("ar", 3), {"t": 0.7}), (Recorder("canvas", 6), {"p": 0.9})], prompts,
                               max_new_tokens=4, seed=5)
    warm_up = [("ar", 1, 8, 5, {"t": 0.7}), ("canvas", 1, 8, 5, {"p": 0.9})]
    turns = [(name, n, 4, 5 + i, setting) for i, n in enumerate((1, 2, 3))
             for name, setting in (("ar", {"t": 0.7}), ("canvas", {"p": 0.9}))]
    assert calls == warm_up + turns
    assert len(speeds) == 2 and all(v > 0 for v in speeds)


def test_a_cut_off_report_resumes_from_the_systems_it_finished(tmp_path):
    model, judge = tiny_lm(True), tiny_lm(False, seed=1)
    prompts, settings = [[3, 4, 5, 6], [7, 8], [9, 10, 11]], [{}, {"entropy_bound": 5.0}]
    options = dict(max_new_tokens=8, batch_size=2, speed_prompts=0, show_progress=False, verified=False)
    whole = quality_report(model, judge, prompts, settings, **options)
    partial = tmp_path / "report.partial.json"
    answered = []
    generate = model.generate

    def cut_off(prompts, *args, **kwargs):  # the run is killed while the second setting answers
        answered.append(kwargs.get("entropy_bound"))
        if kwargs.get("entropy_bound") == 5.0:
            raise KeyboardInterrupt
        return generate(prompts, *args, **kwargs)

    model.generate = cut_off  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        quality_report(model, judge, prompts, settings, resume=partial, **options)
    assert set(json.loads(partial.read_text())["systems"]) == {"autoregressive", "diffusion {}"}
    answered.clear()
    model.generate = lambda prompts, *a, **k: answered.append(k.get("entropy_bound")) or generate(prompts, *a, **k)
    again = quality_report(model, judge, prompts, settings, resume=partial, **options)
    assert answered == [5.0, 5.0]  # only the setting that was cut off answers (two batches), the rest is read back
    assert again["resumed"] == ["autoregressive", "diffusion {}"] and whole["resumed"] == []
    assert {k: v for k, v in again.items() if k != "resumed"} == {k: v for k, v in whole.items() if k != "resumed"}

    answered.clear()  # other prompts, another budget or other weights are another run: everything answers anew
    assert quality_report(model, judge, prompts[:2], settings, resume=partial, **options)["resumed"] == []
    assert quality_report(model, judge, prompts, settings, resume=partial, **options)["resumed"] == []
    with torch.no_grad():
        next(model.network.parameters()).add_(1e-3)
    answered.clear()
    changed = quality_report(model, judge, prompts, settings, resume=partial, **options)
    assert changed["resumed"] == [] and answered == [None, None, 5.0, 5.0]
    partial.write_text("{not json")  # a file cut mid-write (or by hand) is no run: answered anew, then replaced
    assert quality_report(model, judge, prompts, settings, resume=partial, **options)["resumed"] == []
    assert json.loads(partial.read_text())["fingerprint"]


def test_a_plot_names_what_every_setting_shares_once_and_each_point_by_what_sets_it_apart():
    base = {"order": "left_to_right", "canvas_size": 4, "t_max": 0.45}
    shared, own = shared_and_own([{**base, "first_token": "causal"}, {**base, "first_token": "decoder"},
                                  {**base, "t_max": 0.4, "first_token": "causal"}])
    assert shared == {"order": "left_to_right", "canvas_size": 4}
    assert own == [{"t_max": 0.45, "first_token": "causal"}, {"t_max": 0.45, "first_token": "decoder"},
                   {"t_max": 0.4, "first_token": "causal"}]
    assert shared_and_own([base]) == ({}, [base])  # one setting is all its own
    assert shared_and_own([{"a": 1}, {}]) == ({}, [{"a": 1}, {}])
