"""A live `canvaslm serve` subprocess on 127.0.0.1 with a tiny DiffusionGemma checkpoint (canvas 8)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from canvaslm.bench.serve import ServerProcess
from tests.reference import tiny_checkpoint

MODEL = "tiny-dg"


class LiveServer(ServerProcess):
    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


def start_server(model_dir: Path, *flags: str) -> LiveServer:
    """The served model in float32 (unless `flags` say otherwise): the tests compare it with the library's."""
    precision = [] if "--dtype" in flags else ["--dtype", "float32", "--quantize", "none"]
    return LiveServer(str(model_dir), precision + list(flags), name=MODEL, timeout=120)


def stop_server(server: LiveServer) -> None:
    server.close()


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
