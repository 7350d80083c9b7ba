"""Requests generated from the server's own OpenAPI schema (schemathesis): valid bodies and invalid ones (wrong
types, missing fields, out-of-range values). None may produce a 5xx or take the server down."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode


def _shrink(body: object) -> None:
    """Keep generated work small: a huge token budget or n is legal, but only slows the test down."""
    if isinstance(body, dict):
        for key, most in (("max_tokens", 32), ("max_completion_tokens", 32), ("n", 2), ("max_denoising_steps", 8)):
            # 263.0 is a legal integer too (pydantic takes integral floats)
            if isinstance(body.get(key), int | float) and not isinstance(body.get(key), bool) and body[key] > most:
                body[key] = most


def _fuzz(operation, mode: GenerationMode, base_url: str, examples: int) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        _shrink(case.body)
        response = case.call(base_url=base_url, timeout=120)
        assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
        if response.status_code >= 400 and operation.path.startswith("/v1/"):
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_never_get_a_server_error(server, mode):
    loaded = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in loaded.get_all_operations()]
    posts = [op for op in operations if op.method.upper() == "POST" and op.path.startswith("/v1/")]
    assert {op.path for op in posts} == {"/v1/completions", "/v1/chat/completions"}
    # an operation without parameters or body (the GET routes) has no invalid form to generate
    for operation in operations if mode == GenerationMode.POSITIVE else posts:
        _fuzz(operation, mode, server.url, 30 if operation in posts else 5)
    assert httpx.get(server.url + "/health").status_code == 200
