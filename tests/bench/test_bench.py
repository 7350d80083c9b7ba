"""`canvaslm bench`: each benchmark runs as a user runs it and writes the JSON (and PNG) it promises."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from canvaslm.hardware import onednn_float32_pays
from tests.reference import tiny_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-model")
    tiny_checkpoint(path, canvas_length=8)
    return str(path)


def bench(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "canvaslm.cli", "bench", *args], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_generate_against_the_transformers_reference(model_dir, tmp_path):
    report = bench("generate", "-m", model_dir, "--batch-sizes", "1,4", "--new-tokens", "8", "--prompt-tokens", "6",
                   "--repeats", "1", "--out", str(tmp_path / "g.json"))["generate"]
    assert [row["batch"] for row in report["batches"]] == [1, 4] and report["transformers"]
    for row in report["batches"]:
        assert row["canvaslm_tokens_per_second"] > 0 and row["transformers_tokens_per_second"] > 0
        assert row["canvaslm_ms_per_forward"] > 0 and 0 < row["canvaslm_tokens_per_forward"] <= 8
        assert isinstance(row["identical_tokens"], bool) and row["speedup"] > 0
    assert (tmp_path / "g.png").stat().st_size > 5_000
    assert json.loads((tmp_path / "g.json").read_text())["generate"]["batches"] == report["batches"]


def test_denoise_latencies(model_dir):
    report = bench("denoise", "-m", model_dir, "--canvas", "1,8", "--prompt-tokens", "6", "--repeats", "1")
    assert set(report["denoise"]["canvas_tokens"]) == {"1", "8"}


def test_serve_throughput_and_latency(model_dir, tmp_path):
    """Each decoding asked for is driven through the same server, with the bench's precision, threads and draft
    limit (a server refusing one would not start)."""
    report = bench("serve", "-m", model_dir, "--concurrency", "1,2", "--requests", "2", "--max-tokens", "8",
                   "--decodings", "diffusion,verified", "--temperature", "0.5", "--threads", "1",
                   "--max-draft-batch", "4", "--out", str(tmp_path / "s.json"))
    assert report["server_flags"] == ["--dtype", "float32", "--quantize", "none", "--threads", "1",
                                      "--max-draft-batch", "4"]
    assert report["temperature"] == 0.5 and list(report["models"]) == [model_dir, f"{model_dir} · verified"]
    for name, decoding in ((model_dir, "diffusion"), (f"{model_dir} · verified", "verified")):
        entry = report["models"][name]
        assert (entry["kind"], entry["decoding"]) == ("diffusion", decoding)
        assert [lv["concurrency"] for lv in entry["levels"]] == [1, 2]
        assert all(lv["errors"] == 0 and lv["tokens_per_second"] > 0 for lv in entry["levels"])
    assert report["models"][model_dir]["whole_canvas_streaming_c1"]["requests"] == 2
    assert (tmp_path / "s.png").stat().st_size > 5_000


def test_long_prompt_cost(model_dir):
    report = bench("prompt", "-m", model_dir, "--prompt-tokens", "300", "--canvas", "8")["prompt"]
    assert report["prompt_tokens"] == 300 and report["time_to_first_canvas_ms"] > report["prefill_ms"] > 0
    # the tiny model's sliding layer keeps 5 of 300 positions: its cache is smaller than a full-attention one
    assert 0 < report["kv_cache_mb"] < report["kv_cache_mb_without_windows"]


def test_compare_runs_every_engine_on_the_same_weights(model_dir, tmp_path):
    report = bench("-m", model_dir, "--batch-sizes", "1,2", "--new-tokens", "8", "--prompt-tokens", "6",
                   "--repeats", "1", "--threads", "1", "--out", str(tmp_path / "c.json"))
    assert report["machine"]["threads"] == 1
    rows = report["compare"]["batches"]
    assert [row["batch"] for row in rows] == [1, 2]
    for row in rows:
        assert set(row) >= {"canvaslm_diffusion", "canvaslm_ar", "transformers_diffusion"}
        for engine in ("canvaslm_diffusion", "canvaslm_diffusion_fast_sampler", "canvaslm_ar", "transformers_diffusion"):
            assert row[engine]["tokens_per_second"] > 0 and row[engine]["time_to_first_token_ms"] > 0
            assert row[engine]["peak_memory_mb"] > 0
        assert 0 < row["canvaslm_diffusion"]["tokens_per_forward"] <= 8
        assert row["canvaslm_ar"]["tokens_per_forward"] == row["batch"] and row["diffusion_vs_best_ar"] > 0
    assert (tmp_path / "c.png").stat().st_size > 5_000


def test_compare_on_a_llama_diffusion_model_includes_transformers_ar(tmp_path):
    import canvaslm
    from canvaslm.models import llama

    config = llama.Config.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "max_position_embeddings": 128, "pad_token_id": 0, "eos_token_id": 1}, "test")
    network = llama.Model(config)
    network.to_diffusion(4)
    canvaslm.LM(network, None, "test").save(tmp_path / "m")
    row = bench("-m", str(tmp_path / "m"), "--batch-sizes", "2", "--new-tokens", "4", "--prompt-tokens", "3",
                "--repeats", "1")["compare"]["batches"][0]
    assert row["transformers_ar"]["tokens_per_second"] > 0 and "transformers_diffusion" not in row


def test_bad_thread_count_is_a_one_line_error():
    out = subprocess.run([sys.executable, "-m", "canvaslm.cli", "bench", "--threads", "0"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "--threads must be >= 1" in out.stderr


def test_serve_with_structured_requests_shares_decoder_passes(tmp_path):
    """A mix of plain and json_schema requests: the JSON ones run inside the continuous batch, so the level's
    passes include batches of more than one sequence, and every request succeeds."""
    from tests.reference import tiny_smol_diffusion

    path = tmp_path / "json-model"
    tiny_smol_diffusion(16, layers=1, max_positions=512).save(path)
    report = bench("serve", "-m", str(path), "--concurrency", "2", "--requests", "4", "--max-tokens", "48",
                   "--structured-share", "0.5")
    level = report["models"][str(path)]["levels"][0]
    assert level["errors"] == 0 and level["requests"] == 4 and level["structured_requests"] == 2
    passes = level["passes_by_batch_size"]
    assert sum(passes.values()) > 0 and any(size != "1" for size in passes), passes


def test_a_structured_share_outside_zero_to_one_is_a_one_line_error():
    out = subprocess.run([sys.executable, "-m", "canvaslm.cli", "bench", "serve", "--structured-share", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and out.stdout == ""
    assert "--structured-share must be in [0, 1], got 2.0" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "canvaslm.cli", "bench", "serve", "--decodings", "diffusion,fast"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and out.stdout == "" and "Traceback" not in out.stderr
    assert "--decodings takes diffusion, verified, autoregressive (comma-separated), got 'diffusion,fast'" in out.stderr
    out = subprocess.run([sys.executable, "-m", "canvaslm.cli", "bench", "serve", "--rounds", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and out.stdout == "" and "Traceback" not in out.stderr
    assert "--rounds must be >= 1, got 0" in out.stderr
    out = subprocess.run([sys.executable, "-m", "canvaslm.cli", "bench", "serve", "--max-draft-batch", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and out.stdout == "" and "Traceback" not in out.stderr
    assert "--max-draft-batch must be >= 1, got 0" in out.stderr


def test_passes_time_each_pass_size_for_each_precision(model_dir, tmp_path):
    report = bench("passes", "-m", model_dir, "--canvas", "1,8", "--variants",
                   "float32:none,bfloat16:int8:rows=16,float32:int4:unfused,float32:int4:aten", "--repeats", "1",
                   "--prompt-tokens", "6", "--out", str(tmp_path / "p.json"))
    plain, packed, unfused, aten = report["variants"]
    assert (plain["dtype"], plain["quantize"], packed["dtype"], packed["quantize"]) == ("float32", "none",
                                                                                        "bfloat16", "int8")
    assert (plain["packed_rows"], packed["packed_rows"]) == (0, 16)
    assert (unfused["quantize"], unfused["fused"], packed["fused"]) == ("int4", False, True)
    # float32 weights are reordered for oneDNN where that pays (this machine's CPU decides), never under `aten`
    assert (unfused["reordered"], aten["reordered"], plain["reordered"]) == (onednn_float32_pays(), False, False)
    for row in (plain, packed, unfused, aten):
        assert set(row["causal_ms"]) == set(row["canvas_ms"]) == {"1", "8"}
        assert all(ms > 0 for ms in [*row["causal_ms"].values(), *row["canvas_ms"].values()])
        assert row["canvas_vs_ar"]["1"] == round(row["canvas_ms"]["1"] / row["causal_ms"]["1"], 2)
    assert (tmp_path / "p.png").stat().st_size > 5_000
    out = subprocess.run([sys.executable, "-m", "canvaslm.cli", "bench", "passes", "--variants", "float32"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "dtype:quantize" in out.stderr and "Traceback" not in out.stderr


def test_a_variant_can_send_bigger_passes_through_the_packed_kernels():
    from canvaslm.bench.passes import Variant, parse_variants
    from canvaslm.errors import CanvasError

    assert parse_variants("bfloat16:int4:rows=64,bfloat16:int4:compile,float32:int4:unfused,float32:int4:aten") == [
        Variant("bfloat16", "int4", False, 64), Variant("bfloat16", "int4", True, None),
        Variant("float32", "int4", False, None, fused=False), Variant("float32", "int4", aten=True)]
    for bad in ("bfloat16:int4:rows=0", "bfloat16:int4:rows=x", "bfloat16:int4:fast"):
        with pytest.raises(CanvasError, match="rows=N"):
            parse_variants(bad)


def test_the_llama_cpp_peer_fails_softly(tmp_path):
    from canvaslm.bench.peers import llama_cpp_rates
    from canvaslm.errors import CanvasError

    missing = llama_cpp_rates(tmp_path / "missing.gguf", [[1, 2, 3]], 4, threads=1, n_batch=8)
    assert set(missing) == {"error"} and "exit status" in missing["error"]  # no llama_cpp, or no such file
    from canvaslm.bench.peers import bench_peers

    with pytest.raises(CanvasError, match="needs the AR parent as a .gguf file"):
        bench_peers("smol", "smol-ar", [("float32", "none")], 4, 1, gguf=str(tmp_path / "model.safetensors"))


def test_our_rows_of_the_peer_benchmark_run_without_the_peer(monkeypatch):
    """Everything but llama.cpp's own run, which needs the optional extra (the test below, skipped without it): the
    parsed variants load and answer, and a variant `bench passes` alone times is refused in one line. (A variant
    grown by a field once broke this loop unseen, as only the skipped test reached it.)"""
    from canvaslm.bench import peers
    from canvaslm.bench.passes import parse_variants
    from canvaslm.errors import CanvasError

    runs = []
    monkeypatch.setattr(peers, "llama_cpp_rates", lambda *a, **k: runs.append(a) or {"tokens_per_second": 50.0,
                                                                                        "tokens": 8, "amx": False})
    report = peers.bench_peers("smol-ar", "smol-ar", parse_variants("float32:none"), 4, 1)
    peer, ours = report["systems"]
    assert len(runs) == 1 and peer["system"] == "llama.cpp"
    assert ours["system"] == "canvaslm autoregressive" and ours["tokens"] > 0
    assert ours["vs_llama_cpp"] == round(ours["tokens_per_second"] / 50.0, 3)
    for variant in ("bfloat16:int4:rows=8", "bfloat16:int4:unfused", "bfloat16:int4:aten"):
        with pytest.raises(CanvasError, match="expected dtype:quantize"):
            peers.bench_peers("smol-ar", "smol-ar", parse_variants(variant), 4, 1)


def test_llama_cpp_beside_our_loops_on_the_same_gguf(tmp_path):
    pytest.importorskip("llama_cpp", reason="the optional peer: pip install -e '.[peers]'")
    report = bench("peers", "-m", "smol-ar", "--variants", "float32:none", "--new-tokens", "4", "--threads", "1",
                   "--out", str(tmp_path / "peers.json"))
    peer, *others, ours = report["systems"]
    assert peer["system"] == "llama.cpp" and peer["tokens"] > 0 and peer["threads"] == 1
    assert ours["system"] == "canvaslm autoregressive" and ours["tokens"] > 0 and ours["vs_llama_cpp"] > 0
    if peer["amx"]:  # ggml repacked the weights for AMX; the same GGUF without that is the second row
        assert [(o["system"], o["extra_buffers"], o["n_batch"]) for o in others] == [("llama.cpp", False, 512)]
        assert others[0]["tokens"] > 0 and "n_batch_error" not in others[0]
    else:
        assert others == []
    assert (tmp_path / "peers.png").stat().st_size > 5_000


def test_serve_runs_every_server_at_once_and_the_systems_take_turns_level_by_level(monkeypatch):
    """A drifting machine shifts all systems' rows at a level alike: each level is run by every system in turn
    (the AR base between the canvas and verified runs, not an hour later), and every server is closed."""
    from canvaslm.bench import serve

    runs, opened, closed = [], [], []

    class FakeServer:
        def __init__(self, model, flags):
            self.url, self.flags = f"http://{model}", flags
            opened.append((model, tuple(flags)))

        def close(self):
            closed.append(self.url)

    monkeypatch.setattr(serve, "ServerProcess", FakeServer)
    monkeypatch.setattr(serve, "_kind", lambda url: "diffusion" if url == "http://canvas" else "autoregressive")
    monkeypatch.setattr(serve, "_one_request", lambda *a, **k: None)

    def run_level(url, concurrency, requests, max_tokens, structured_share=0.0, extra=None):
        runs.append((url, concurrency, (extra or {}).get("decoding")))
        return {"concurrency": concurrency, "requests": requests, "errors": 0, "tokens_per_second": float(len(runs)),
                "latency_p50_s": 2.0 * len(runs), "passes_by_batch_size": {"1": 1, "2-4": len(runs)}}

    monkeypatch.setattr(serve, "run_level", run_level)
    report = serve.bench_serve(["canvas", "parent"], [1, 8], 4, 16, compare_streaming=False,
                               decodings=["diffusion", "verified"])
    turn = [("http://canvas", "diffusion"), ("http://canvas", "verified"), ("http://parent", None)]
    assert runs == [(url, level, decoding) for level in (1, 8) for url, decoding in turn]
    assert list(report["models"]) == ["canvas", "canvas · verified", "parent"]
    assert [lv["concurrency"] for lv in report["models"]["parent"]["levels"]] == [1, 8]
    assert sorted(closed) == ["http://canvas", "http://parent"] and len(opened) == 2

    runs.clear()  # rounds: the systems alternate within a level, and each level reports the median of its turns
    report = serve.bench_serve(["canvas", "parent"], [1, 8], 4, 16, compare_streaming=False,
                               decodings=["diffusion", "verified"], rounds=3)
    assert runs == [(url, level, decoding) for level in (1, 8) for _ in range(3) for url, decoding in turn]
    parent = report["models"]["parent"]["levels"]
    assert parent[0]["tokens_per_second_rounds"] == [3.0, 6.0, 9.0] and parent[0]["tokens_per_second"] == 6.0
    assert parent[0]["latency_p50_s"] == 12.0 and parent[0]["requests"] == 12 and parent[0]["concurrency"] == 1
    assert parent[0]["passes_by_batch_size"] == {"1": 3, "2-4": 18}
    assert parent[1]["tokens_per_second_rounds"] == [12.0, 15.0, 18.0] and report["rounds"] == 3

    runs.clear()  # settings: the canvases are driven once per setting, side by side, the setting in each request
    monkeypatch.setattr(serve, "run_level", lambda url, concurrency, requests, max_tokens, structured_share=0.0,
                        extra=None: runs.append((url, concurrency, dict(extra or {}))) or {"concurrency": concurrency})
    report = serve.bench_serve(["canvas", "parent"], [8], 4, 16, compare_streaming=False,
                               decodings=["diffusion", "verified"], settings=[{}, {"canvas_size": 4}])
    assert list(report["models"]) == ["canvas", "canvas · canvas_size=4", "canvas · verified", "parent"]
    assert [extra for _, _, extra in runs] == [{"decoding": "diffusion"}, {"decoding": "diffusion", "canvas_size": 4},
                                               {"decoding": "verified"}, {}]
    assert report["models"]["canvas · canvas_size=4"]["setting"] == {"canvas_size": 4}
