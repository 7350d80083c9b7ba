"""`canvaslm bench serve`: throughput and latency through the real HTTP server, for a diffusion model and its AR
base side by side.

For each model a `canvaslm serve` subprocess is started on a free local port, all at once; at each concurrency level
(every system in turn, then the next level), that many client threads send streaming chat requests (the same prompts
for both models, `ignore_eos` so every request writes `max_tokens` tokens) until `requests` have completed. Reported
per level: output tokens/s over the wall time, p50 and p99 request latency and time to first token. For the diffusion
model the first-token time is also measured with whole-canvas streaming (`--no-pin-settled`), against settled-prefix
streaming, at concurrency 1.

`structured_share` > 0 makes that share of the requests ask for JSON (`response_format` json_schema, `SCHEMA`): on a
diffusion model they run inside the continuous batch, and each level reports the histogram of sequences per decoder
pass (from the server's /metrics) to show that they share passes with the plain requests.
"""

from __future__ import annotations

import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.progress import Progress

from canvaslm.bench.quality import setting_label
from canvaslm.errors import CanvasError
from canvaslm.plotting import new_figure, save

PROMPTS = ["Explain how a bicycle stays upright.", "Write a short poem about the sea.",
           "List three uses of a paperclip.", "What is the capital of France, and why is it famous?",
           "Describe a sunrise to someone who has never seen one.", "Give me a recipe for pancakes.",
           "Why do cats purr?", "Summarize the plot of a detective story in three sentences."]


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ending_with_parent() -> Callable[[], None] | None:
    """What to run in a server's process before it starts (Linux; else None): the kernel then sends it SIGTERM,
    which stops it gracefully, when the process that started it ends, however that ends (a benchmark killed by
    SIGTERM runs no `finally`). libc's `prctl` is looked up here, in the parent: between fork and exec the child
    may only call it (another thread of the parent, such as the progress bar's, may hold a lock at the fork)."""
    if sys.platform != "linux":
        return None
    import ctypes

    prctl, pdeathsig, sigterm = ctypes.CDLL(None).prctl, 1, int(signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    return lambda: prctl(pdeathsig, sigterm)


class ServerProcess:
    """`canvaslm serve MODEL` in a subprocess on a free local port, returned once /health answers 200. Its output
    goes to a temporary file (`log()`): a pipe nobody reads fills at 64 KB and then blocks the server mid-write. On
    Linux the server ends with the process that started it, so a killed benchmark leaves no server behind."""

    def __init__(self, model: str, flags: list[str], name: str = "bench", timeout: float = 600) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile(mode="w+", prefix="canvaslm-serve-")
        self.process = subprocess.Popen([sys.executable, "-m", "canvaslm.cli", "serve", str(model), "--port",
                                         str(self.port), "--served-model-name", name, *flags],
                                        stdout=self._log, stderr=subprocess.STDOUT, text=True,
                                        preexec_fn=_ending_with_parent())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CanvasError(f"the server for {model} exited: {self.log()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.close()
        raise CanvasError(f"the server for {model} did not start within {timeout:.0f} s")

    def log(self) -> str:
        """Everything the server printed so far."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def _one_request(url: str, prompt: str, max_tokens: int, seed: int, structured: bool = False,
                 extra: dict[str, Any] | None = None) -> dict[str, float]:
    """One streaming chat request (JSON under `SCHEMA` when `structured`; `extra` fields such as `decoding` and
    `temperature` added to the body): latency, time to first content, completion tokens."""
    import httpx

    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "seed": seed, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
            **(extra or {})}
    if structured:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA}}
    start = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise CanvasError(f"HTTP {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                first = time.perf_counter() - start
    return {"latency": time.perf_counter() - start, "ttft": first if first is not None else float("nan"),
            "tokens": tokens, "structured": structured}


def batch_histogram(url: str) -> dict[str, float]:
    """Decoder passes by sequences in the pass so far: the server's forward batch-size histogram (cumulative
    Prometheus buckets "le" -> count)."""
    import httpx

    counts: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("canvaslm:forward_batch_size_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            counts[le] = counts.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def _passes_by_batch(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """Passes of one level per batch-size bucket ("1", "2", "3-4", ...), from two cumulative snapshots."""
    out, below, low = {}, 0.0, 1
    for le in sorted((k for k in after if k != "+Inf"), key=float):
        count = after[le] - before.get(le, 0.0)
        high = int(float(le))
        out[str(high) if high == low else f"{low}-{high}"] = int(count - below)
        below, low = count, high + 1
    if "+Inf" in after:
        out[f">{low - 1}"] = int(after["+Inf"] - before.get("+Inf", 0.0) - below)
    return {k: v for k, v in out.items() if v}


def run_level(url: str, concurrency: int, requests: int, max_tokens: int,
              structured_share: float = 0.0, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    results: list[dict[str, float]] = []
    errors: list[str] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            structured = int((i + 1) * structured_share) > int(i * structured_share)
            try:
                results.append(_one_request(url, PROMPTS[i % len(PROMPTS)], max_tokens, i, structured, extra))
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(repr(e))

    histogram = batch_histogram(url)
    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies = sorted(r["latency"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    level = {"concurrency": concurrency, "requests": len(results), "errors": len(errors),
             "tokens_per_second": round(sum(r["tokens"] for r in results) / wall, 2),
             "latency_p50_s": round(_quantile(latencies, 0.5), 3),
             "latency_p99_s": round(_quantile(latencies, 0.99), 3),
             "ttft_p50_s": round(_quantile(ttfts, 0.5), 3), "ttft_p99_s": round(_quantile(ttfts, 0.99), 3),
             "passes_by_batch_size": _passes_by_batch(histogram, batch_histogram(url))}
    if structured_share > 0:
        level["structured_requests"] = sum(r["structured"] for r in results)
        json_latencies = sorted(r["latency"] for r in results if r["structured"])
        level["structured_latency_p50_s"] = round(_quantile(json_latencies, 0.5), 3)
    if errors:
        level["first_error"] = errors[0][:300]
    return level


def _combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One level's rounds as one row: the median of each rate and time, the counts summed, each round's tokens/s
    kept (`tokens_per_second_rounds`); a single run as it is."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[0])
    for key, value in runs[0].items():
        if key in ("requests", "errors", "structured_requests"):
            out[key] = sum(run.get(key, 0) for run in runs)
        elif key == "passes_by_batch_size":
            sizes: dict[str, int] = {}
            for run in runs:
                for size, count in run[key].items():
                    sizes[size] = sizes.get(size, 0) + count
            out[key] = sizes
        elif key != "concurrency" and isinstance(value, (int, float)):
            out[key] = round(statistics.median(run[key] for run in runs), 3)
    out["tokens_per_second_rounds"] = [run["tokens_per_second"] for run in runs]
    errors = [run["first_error"] for run in runs if "first_error" in run]
    if errors:
        out["first_error"] = errors[0]
    return out


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1] if len(values) > 1 \
        else values[0]


def bench_serve(models: list[str], levels: list[int], requests: int, max_tokens: int,
                compare_streaming: bool = True, structured_share: float = 0.0, server_flags: list[str] = (),
                decodings: list[str] = ("diffusion",), temperature: float | None = None,
                rounds: int = 1, settings: list[dict[str, Any]] = ({},)) -> dict[str, Any]:
    """Every model at every level. `server_flags` go to each `canvaslm serve` (precision, threads); a diffusion
    model is driven once per entry of `decodings` (the request's `decoding` field, one server), reported as
    "MODEL" for its canvases and "MODEL · verified" etc. for the others; `temperature` goes into every request.
    Its canvases are driven once per sampler setting of `settings` (request fields such as `canvas_size`), as
    "MODEL · <setting>" where the setting is not the model's defaults.

    All servers run at once and the systems take turns level by level (every system at 1 client, then every one at
    8, ...): a machine whose speed drifts over minutes (a busy host, a throttled CPU) then shifts every system's
    row at a level alike, instead of whichever model happened to run last. An idle server costs no CPU. With
    `rounds` > 1 the systems take that many turns at each level, and each level reports the median (`_combine`)."""
    if rounds < 1:
        raise CanvasError(f"rounds must be >= 1, got {rounds}")
    report: dict[str, Any] = {"max_tokens": max_tokens, "levels": levels, "structured_share": structured_share,
                              "server_flags": list(server_flags), "temperature": temperature, "rounds": rounds,
                              "settings": [dict(s) for s in settings], "models": {}}
    canvases: dict[str, tuple[str, dict[str, Any]]] = {}  # model -> its first canvases' row and request fields
    sampling = {} if temperature is None else {"temperature": temperature}
    servers: dict[str, ServerProcess] = {}
    with Progress(transient=True) as progress:
        try:
            systems = []  # (report name, server, structured share, request fields)
            for model in models:
                task = progress.add_task(f"starting the server for {model}", total=None)
                servers[model] = server = ServerProcess(model, list(server_flags))
                kind = _kind(server.url)
                _one_request(server.url, PROMPTS[0], 8, 0)  # warm-up
                progress.remove_task(task)
                for decoding in (list(decodings) if kind == "diffusion" else ["autoregressive"]):
                    for setting in (settings if kind == "diffusion" and decoding == "diffusion" else [{}]):
                        name = model if decoding == "diffusion" or kind != "diffusion" else f"{model} · {decoding}"
                        name = f"{name} · {setting_label(setting)}" if setting else name
                        extra = {**sampling, **({"decoding": decoding} if kind == "diffusion" else {}), **setting}
                        report["models"][name] = {"kind": kind, "decoding": decoding, "setting": dict(setting),
                                                  "levels": []}
                        systems.append((name, server, structured_share if decoding == "diffusion" else 0.0, extra))
                        if kind == "diffusion" and decoding == "diffusion":
                            canvases.setdefault(model, (name, extra))
            task = progress.add_task("serving", total=len(levels) * rounds * len(systems))
            for level in levels:
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in systems}
                for turn in range(rounds):
                    for name, server, share, extra in systems:
                        progress.update(task, description=f"{name} at {level} clients, round {turn + 1}/{rounds}")
                        runs[name].append(run_level(server.url, level, max(requests, level), max_tokens, share,
                                                    extra))
                        progress.advance(task)
                for name, levels_run in runs.items():
                    report["models"][name]["levels"].append(_combine(levels_run))
        finally:
            for server in servers.values():
                server.close()
        if compare_streaming and "diffusion" in decodings:
            for model, (name, extra) in canvases.items():
                whole = ServerProcess(model, ["--no-pin-settled", *server_flags])
                try:
                    _one_request(whole.url, PROMPTS[0], 8, 0)
                    report["models"][name]["whole_canvas_streaming_c1"] = run_level(
                        whole.url, 1, requests, max_tokens, extra=extra)
                finally:
                    whole.close()
    return report


def _kind(url: str) -> str:
    import httpx

    return httpx.get(url + "/v1/models").json()["data"][0].get("kind", "unknown")


def plot_serve(report: dict[str, Any], png: str | Path) -> bool:
    figure = new_figure(10, 4)
    if figure is None:
        return False
    throughput, latency = figure.subplots(1, 2)
    for i, (model, entry) in enumerate(report["models"].items()):
        levels = [lv["concurrency"] for lv in entry["levels"]]
        label, color = (model if "·" in model else f"{model} ({entry['kind']})"), f"C{i}"  # one colour a model
        throughput.plot(levels, [lv["tokens_per_second"] for lv in entry["levels"]], "o-", color=color, label=label)
        latency.plot(levels, [lv["latency_p50_s"] for lv in entry["levels"]], "o-", color=color, label=f"{label} p50")
        latency.plot(levels, [lv["latency_p99_s"] for lv in entry["levels"]], "x--", color=color,
                     label=f"{label} p99")
    for ax, title, unit in ((throughput, "throughput", "output tokens/s"), (latency, "request latency", "s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=7)
    return save(figure, png)
