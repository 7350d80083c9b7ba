"""A live `canvaslm serve` subprocess on 127.0.0.1 with a tiny DiffusionGemma checkpoint (canvas 8)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.reference import tiny_checkpoint

MODEL = "tiny-dg"


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, *flags: str) -> LiveServer:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "canvaslm.cli", "serve", str(model_dir), "--port", str(port),
                                "--served-model-name", MODEL, *flags], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {process.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return LiveServer(url, process)
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("server did not become healthy")


def stop_server(server: LiveServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("served")
    tiny_checkpoint(path, canvas_length=8)
    return path


@pytest.fixture(scope="session")
def server(model_dir) -> Iterator[LiveServer]:
    live = start_server(model_dir)
    yield live
    stop_server(live)
