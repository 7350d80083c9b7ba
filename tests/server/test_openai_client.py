"""The server through the real `openai` client: chat, completions, streaming, n > 1, stop strings, seeds,
32 concurrent streams, a client that disconnects mid-stream, and errors in OpenAI's format."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.conftest import MODEL, start_server, stop_server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def chat(client, content="hello", **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    # the server writes to a file, not a pipe the tests never read (a full pipe once froze the server mid-run)
    assert server.process.stdout is None and "serving" in server.log()


def test_chat_completion(client):
    r = chat(client, max_tokens=12, seed=1)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completions_from_text_and_token_ids(client):
    r = client.completions.create(model=MODEL, prompt="the quick brown", max_tokens=10, seed=3)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 10
    ids = client.completions.create(model=MODEL, prompt=[2, 40, 41, 42], max_tokens=10, seed=3)
    assert ids.usage.prompt_tokens == 4


def test_infill_with_a_suffix(client):
    r = client.completions.create(model=MODEL, prompt="def add(a, b):", suffix="\n    return total", max_tokens=6,
                                  seed=1, extra_body={"canvas_drafts": False})
    assert r.usage.completion_tokens <= 6 and "return total" not in r.choices[0].text
    drafts = [c.model_extra.get("canvaslm") for c in client.completions.create(
        model=MODEL, prompt="def add(a, b):", suffix=" total", max_tokens=3, seed=1, stream=True,
        extra_body={"canvas_drafts": True})]
    shown = [d["draft"] for d in drafts if d]
    assert shown and all("total" in d for d in shown)  # the suffix sits in the canvas, fixed, at every step


def test_diffusion_knobs_travel_in_extra_body(client):
    few = chat(client, max_tokens=16, seed=2, extra_body={"max_denoising_steps": 2, "entropy_bound": 50.0})
    assert few.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, max_tokens=8, extra_body={"t_min": 0.9, "t_max": 0.5})
    assert "t_max" in info.value.message
    fast = chat(client, max_tokens=8, seed=2, extra_body={"acceptance": "threshold", "accept_probability": 0.5,
                                                          "sampler": "fast"})
    assert fast.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, max_tokens=8, extra_body={"acceptance": "greedy"})
    assert "acceptance" in info.value.message


def test_seeds_reproduce_and_differ(client):
    a, b = (chat(client, max_tokens=16, seed=5).choices[0].message.content for _ in range(2))
    others = {chat(client, max_tokens=16, seed=s).choices[0].message.content for s in range(6, 10)}
    assert a == b and len(others | {a}) > 2


def test_stream_equals_the_non_streamed_answer_and_reports_usage(client):
    whole = chat(client, max_tokens=24, seed=11)
    stream = chat(client, max_tokens=24, seed=11, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage, roles = [], None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        delta = chunk.choices[0].delta
        roles += [delta.role] if delta.role else []
        pieces += [delta.content] if delta.content else []
        finish = chunk.choices[0].finish_reason or finish
    assert roles == ["assistant"] and "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason and usage.completion_tokens == whole.usage.completion_tokens
    assert len(pieces) > 1  # settled tokens go out while canvases are still denoising


def test_n_choices(client):
    r = chat(client, max_tokens=10, seed=0, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) >= 2  # seeds 0, 1, 2
    streamed = {0: "", 1: "", 2: ""}
    for chunk in chat(client, max_tokens=10, seed=0, n=3, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == {c.index: c.message.content for c in r.choices}


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model=MODEL, prompt="hello world", max_tokens=40, seed=4)
    text = full.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), f"need a non-blank stop string, got {text!r}"
    cut = client.completions.create(model=MODEL, prompt="hello world", max_tokens=40, seed=4, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert text.startswith(cut.choices[0].text)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="hello world", max_tokens=40, seed=4, stop=stop, stream=True))
    assert streamed == cut.choices[0].text


def test_32_concurrent_streams_without_errors(client):
    errors, texts = [], {}

    def one(i: int) -> None:
        try:
            texts[i] = "".join(c.choices[0].delta.content or "" for c in chat(
                client, f"request {i}", max_tokens=24, seed=i, stream=True) if c.choices)
        except Exception as e:  # noqa: BLE001 - every failure is collected and reported
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == [] and len(texts) == 32


def test_a_client_that_disconnects_is_cancelled(server, client):
    chat(client, max_tokens=8, seed=0)  # warm: allocations made
    baseline = server.rss_kb()
    for _ in range(5):
        with httpx.stream("POST", server.base_url + "/chat/completions", timeout=60, json={
                "model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 400, "stream": True,
                "extra_body": {}, "max_denoising_steps": 48, "confidence_threshold": 1e-9, "entropy_bound": 0.01}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data:")
        # the response is closed: the server must notice and free the request
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and httpx.get(server.url + "/health").json()["running"]:
        time.sleep(0.2)
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "running": 0, "waiting": 0}
    assert chat(client, max_tokens=8, seed=0).choices[0].finish_reason in ("stop", "length")
    assert server.rss_kb() < baseline + 50_000  # no leaked caches (each would be a few MB here)


def test_errors_use_the_openai_envelope(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, "word " * 600, max_tokens=8)
    assert "maximum context length is 512 tokens" in info.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[0, 99999], max_tokens=4)
    for body, param in [({"messages": "hi"}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]},
                                                           "messages.0.role"),
                        ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
                        ({"messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature")]:
        r = httpx.post(server.base_url + "/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(server.base_url + "/chat/completions", content=b"{not json", headers={"content-type":
                                                                                          "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert httpx.get(server.url + "/nope").json()["error"]["type"] == "not_found_error"


def test_metrics_count_requests_and_tokens(client, server):
    chat(client, max_tokens=8, seed=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("canvaslm:request_success_total", "canvaslm:generation_tokens_total",
                 "canvaslm:tokens_per_forward_bucket", "canvaslm:forward_pass_seconds_bucket",
                 "canvaslm:num_requests_waiting", "canvaslm:num_requests_running",
                 "canvaslm:time_to_first_token_seconds_count"):
        assert name in text, name
    assert 'canvaslm:http_requests_total{model_name="tiny-dg",route="/v1/chat/completions",status="200"}' in text


def test_a_full_queue_answers_429(model_dir):
    busy = start_server(model_dir, "--max-batch", "1", "--max-queue", "1")
    try:
        slow = {"model": MODEL, "prompt": "x", "max_tokens": 300, "max_denoising_steps": 48,
                "confidence_threshold": 1e-9, "entropy_bound": 0.01}
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            httpx.post(busy.base_url + "/completions", json=slow, timeout=120).status_code)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 429 in results and 200 in results and set(results) <= {200, 429}
    finally:
        stop_server(busy)


def test_verified_decoding_writes_the_models_own_autoregressive_answer(client, model_dir):
    """The `decoding` field through the real client: greedy verified answers equal greedy autoregressive ones
    (and the library's), requests in flight together included; a verified request streams the same text."""
    import concurrent.futures

    import canvaslm

    prompts = ["the quick brown", "hello", "one two three four five six seven eight nine ten"]

    def ask(prompt: str, decoding: str, stream: bool = False) -> str:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0.0, stream=stream,
                                      extra_body={"decoding": decoding})
        return "".join(c.choices[0].text for c in r) if stream else r.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        verified = list(pool.map(lambda p: ask(p, "verified"), prompts))
    lm = canvaslm.load(model_dir, device="cpu")
    for prompt, text in zip(prompts, verified, strict=True):
        assert text == ask(prompt, "autoregressive")
        assert text == lm.complete(prompt, 20, decoding="autoregressive", temperature=0.0).text
    assert ask(prompts[0], "verified", stream=True) == verified[0]
    with pytest.raises(openai.BadRequestError, match="decoding"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={"decoding": "sideways"})


def test_a_server_whose_default_is_verified_decoding(model_dir):
    """`canvaslm serve --decoding verified`: plain requests decode verified (greedy: the AR answer), a request may
    still ask for its canvases, and json_schema answers are written on the canvas as before."""
    import json

    import canvaslm

    from prometheus_client.parser import text_string_to_metric_families

    from canvaslm.engine.verified import draft_size

    live = start_server(model_dir, "--decoding", "verified", "--no-pin-settled")
    try:
        client = openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0, timeout=120)
        r = client.completions.create(model=MODEL, prompt="the quick brown", max_tokens=16, temperature=0.0)
        lm = canvaslm.load(model_dir, device="cpu")
        assert r.choices[0].text == lm.complete("the quick brown", 16, decoding="autoregressive", temperature=0.0).text
        # its drafts in /metrics, counted as vLLM counts speculative decoding's
        counts: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(httpx.get(live.url + "/metrics").text):
            for sample in family.samples:
                if sample.name.startswith("canvaslm:spec_decode_") and sample.name.endswith("_total"):
                    counts[sample.name, sample.labels.get("position", "")] = sample.value
        rounds = counts["canvaslm:spec_decode_num_drafts_total", ""]
        assert rounds >= 1
        drafts = draft_size(lm.network) - 1
        assert counts["canvaslm:spec_decode_num_draft_tokens_total", ""] == rounds * drafts
        by_position = [counts.get(("canvaslm:spec_decode_num_accepted_tokens_per_pos_total", str(j)), 0.0)
                       for j in range(drafts)]
        assert sum(by_position) == counts["canvaslm:spec_decode_num_accepted_tokens_total", ""]
        written = 1 + rounds + sum(by_position)  # the first token, then each round's drafts kept + 1 (the budget
        assert written - draft_size(lm.network) < r.usage.completion_tokens <= written  # may cut the last round)
        canvas = [client.completions.create(model=MODEL, prompt="the quick brown", max_tokens=16, seed=3,
                                            extra_body={"decoding": "diffusion"}).choices[0].text for _ in range(2)]
        assert canvas[0] == canvas[1] and canvas[0] != r.choices[0].text  # the canvases, seeded
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
        fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
        try:  # the canvas path answers (this random model may fail the schema: 422), never a 400 about decoding
            assert isinstance(json.loads(chat(client, response_format=fmt, seed=0).choices[0].message.content)["a"],
                              int)
        except openai.UnprocessableEntityError as failed:
            assert failed.code == "structured_output_failed" and "scaffold" in failed.message
    finally:
        stop_server(live)


def test_no_repeat_ngram_size_travels_in_extra_body(client, model_dir):
    """The rule through the real client: the greedy AR answer under it is the library's, and not the plain one; a
    value out of range is a 400 naming it."""
    import canvaslm

    lm = canvaslm.load(model_dir, device="cpu")
    prompt, greedy = "one two three four five six seven eight nine ten", {"decoding": "autoregressive",
                                                                         "temperature": 0.0}

    def ask(**rule) -> str:
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                         extra_body={**greedy, **rule}).choices[0].text

    ruled = ask(no_repeat_ngram_size=1)
    assert ruled == lm.complete(prompt, 24, no_repeat_ngram_size=1, **greedy).text
    assert ruled != ask()
    with pytest.raises(openai.BadRequestError, match="no_repeat_ngram_size"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={"no_repeat_ngram_size": -1})


def test_sigterm_lets_open_requests_finish_and_a_taken_port_is_an_exit_code(model_dir):
    """`canvaslm serve` runs its engine loop in the thread that loaded the model and HTTP in another: SIGTERM
    stops HTTP gracefully (a request in flight still gets its whole answer), then the engine, and the process exits
    0; a port already in use ends it with 1 and uvicorn's message, not a hang."""
    live = start_server(model_dir)
    try:
        client = openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0, timeout=120)
        answer = {}
        thread = threading.Thread(target=lambda: answer.update(
            response=chat(client, max_tokens=160, extra_body={"ignore_eos": True})))
        thread.start()
        while httpx.get(live.url + "/health").json()["running"] == 0:  # in flight
            time.sleep(0.01)
        live.process.terminate()
        assert "response" not in answer
        assert live.process.wait(timeout=60) == 0
        thread.join(timeout=60)
        response = answer["response"]
        assert response.usage.completion_tokens == 160 and response.choices[0].finish_reason == "length"
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            run = subprocess.run([sys.executable, "-m", "canvaslm.cli", "serve", str(model_dir), "--port", str(port),
                                  "--dtype", "float32", "--quantize", "none"], capture_output=True, text=True,
                                 timeout=120)
        assert run.returncode == 1 and "address already in use" in run.stderr, run.stderr[-1000:]
        assert run.stdout == ""
    finally:
        if live.process.poll() is None:
            stop_server(live)


def test_a_killed_benchmark_leaves_no_server_behind(model_dir, tmp_path):
    """`canvaslm bench serve` starts its servers with `ServerProcess`; killed by a signal no `finally` sees
    (SIGKILL here, SIGTERM's default likewise), it must not leave them running: the kernel stops each one (SIGTERM,
    graceful) when the process that started it ends (Linux)."""
    if sys.platform != "linux":
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    script = tmp_path / "bench.py"
    script.write_text(
        "import sys, time\n"
        "from canvaslm.bench.serve import ServerProcess\n"
        f"server = ServerProcess({str(model_dir)!r}, ['--dtype', 'float32', '--quantize', 'none'], timeout=120)\n"
        "print(server.process.pid, server.url, flush=True)\n"
        "time.sleep(600)\n")
    bench = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pid = None

    def ended() -> bool:  # gone, or a zombie nobody reaps (a container's first process may not)
        try:
            return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] in ("Z", "X")
        except (FileNotFoundError, IndexError):
            return True
    try:
        pid, url = bench.stdout.readline().split()
        assert httpx.get(url + "/health").status_code == 200
        bench.kill()
        bench.wait(timeout=30)

        deadline = time.monotonic() + 60
        while not ended() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ended(), f"the server {pid} outlived the process that started it"
    finally:
        if bench.poll() is None:
            bench.kill()
        if pid is not None and not ended():
            os.kill(int(pid), signal.SIGKILL)
