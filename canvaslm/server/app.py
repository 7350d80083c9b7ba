"""The OpenAI-compatible HTTP server, its routes: FastAPI over `Server` (server/serving.py), SSE in server/sse.py.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics (Prometheus).
Errors use OpenAI's envelope {"error": {"message", "type", "param", "code"}}: 400 for malformed JSON or fields
(never FastAPI's 422) and prompts past the context, 404 unknown model or route, 422 (code structured_output_failed)
when a response_format cannot be met, 429 when the queue is full, 503
when the engine has stopped; a 500 means a bug and carries no details.

Streaming is SSE in OpenAI's chunk format. Text is sent as soon as the engine reports settled tokens; stop strings
are found in the decoded text (the request is cancelled when one appears), and text that could still become a stop
string or an incomplete UTF-8 character is held back. A client that disconnects has its request cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from canvaslm.engine.core import Engine
from canvaslm.engine.lm import LM
from canvaslm.engine.output import TextOutput
from canvaslm.engine.structured import SchemaError, StructuredOutputError
from canvaslm.errors import CanvasError
from canvaslm.server.metrics import Metrics
from canvaslm.server.protocol import ChatRequest, CompletionRequest, Sampling
from canvaslm.server.serving import APIError, Server
from canvaslm.server.sse import Chunks, chain, finish_reason, stream_events, stream_whole

MAX_ERROR_CHARS = 2000
log = logging.getLogger("canvaslm.server")


def error_response(status: int, message: str, kind: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message[:MAX_ERROR_CHARS], "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def build_app(lm: LM, name: str, *, max_batch: int = 32, max_queue: int = 256, pin_settled: bool = True,
              decoding: str | None = None, max_draft_batch: int | None = None, engine_thread: bool = True) -> FastAPI:
    """The FastAPI app serving `lm` as model `name` (`decoding`: for requests that name none; `max_draft_batch`:
    see `Engine`); the engine (`app.state.engine`) starts and stops with the app in a thread of its own, or, with
    `engine_thread=False`, runs where the caller runs it (`Engine.run`, `canvaslm serve`)."""
    metrics = Metrics(name)
    engine = Engine(lm, max_batch=max_batch, max_queue=max_queue, pin_settled=pin_settled,
                    on_step=metrics.forward_pass, on_verified=metrics.verified_round, max_draft_batch=max_draft_batch)
    server = Server(lm, name, engine, metrics, decoding)

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine_thread:
            engine.start()
        yield
        if engine_thread:
            engine.stop()

    app = FastAPI(title="canvaslm", version="0.1.0", lifespan=lifespan)
    app.state.server, app.state.engine = server, engine

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.kind, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", "invalid_request_error", None,
                                  "invalid_json")
        message = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: "
                            f"{err.get('msg')}" for err in errors[:5])
        return error_response(400, message, "invalid_request_error", ".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=e)  # server log only
        return error_response(500, "internal server error", "server_error")

    @app.middleware("http")
    async def _count(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        metrics.http_response(request.url.path, response.status_code)
        return response

    def check_model(body: Sampling) -> None:
        if body.model is not None and body.model != name:
            raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{name}'",
                           "not_found_error", "model", "model_not_found")

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.alive:
            return error_response(503, "the engine is not running", "server_error")
        return JSONResponse({"status": "ok", "running": engine.running, "waiting": engine.waiting})

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        metrics.queue(engine.running, engine.waiting)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                            "owned_by": "canvaslm", "max_model_len": lm.max_length,
                                            "kind": lm.kind}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request) -> Any:
        check_model(body)
        prompt = server.prompt_ids(body)
        suffix = server.tokenizer.encode(body.suffix, add_special_tokens=False) if body.suffix else []
        return await respond(http, body, prompt, body.max_tokens, chat=False, suffix=suffix)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request) -> Any:
        check_model(body)
        prompt = server.prompt_ids(body)
        budget = body.max_completion_tokens or max(1, min(lm.max_length - len(prompt), 256))
        return await respond(http, body, prompt, budget, chat=True)

    async def respond(http: Request, body: ChatRequest | CompletionRequest, prompt: list[int], max_tokens: int,
                      chat: bool, suffix: list[int] | None = None) -> Any:
        if body.response_format is not None and body.response_format.type != "text":
            return await respond_structured(http, body, prompt, max_tokens, chat)
        used = len(prompt) + len(suffix or [])
        if used + max_tokens > lm.max_length:
            raise APIError(400, f"This model's maximum context length is {lm.max_length} tokens and your request "
                           f"has {used} input tokens plus max_tokens={max_tokens}", param="max_tokens",
                           code="context_length_exceeded")
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        events = server.generate(http, body, prompt, max_tokens, suffix or [])
        if body.stream:
            first = await anext(events, None)  # submit errors (429, 400) surface before the stream starts
            sse = stream_events(Chunks(ident, created, name, chat), chain([first] if first else [], events), body.n,
                                len(prompt), _include_usage(body), server.tokenizer.decode)
            return StreamingResponse(sse, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices: dict[int, TextOutput] = {}
        async for choice, _ in events:
            choices[choice.index] = choice
        out = []
        for i in range(body.n):
            c = choices[i]
            item: dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": finish_reason(c.finish)}
            item.update({"message": {"role": "assistant", "content": c.text}} if chat else {"text": c.text})
            out.append(item)
        completion = sum(len(c.ids) for c in choices.values())
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": name, "choices": out, "system_fingerprint": None,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion,
                          "total_tokens": len(prompt) + completion}}

    async def respond_structured(http: Request, body: ChatRequest | CompletionRequest, prompt: list[int],
                                 max_tokens: int, chat: bool) -> Any:
        """response_format json_schema / json_object, sent whole; each choice is written inside the continuous
        batch (`Server.structured`)."""
        seeds = [None if body.seed is None else body.seed + i for i in range(body.n)]
        tasks = [asyncio.create_task(server.structured(http, body, prompt, max_tokens, s)) for s in seeds]
        try:
            try:
                texts = list(await asyncio.gather(*tasks))
            except BaseException:  # one choice failed: stop the others' engine requests too
                for task in tasks:
                    task.cancel()
                raise
        except SchemaError as e:
            raise APIError(400, str(e), param="response_format") from None
        except StructuredOutputError as e:
            raise APIError(422, str(e), code="structured_output_failed") from None
        except CanvasError as e:
            raise APIError(400, str(e)) from None
        ident, created = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, int(time.time())
        completion = sum(len(server.tokenizer.encode(t)) for t in texts)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": completion,
                 "total_tokens": len(prompt) + completion}
        if body.stream:
            sse = stream_whole(Chunks(ident, created, name, chat), texts, len(prompt), completion,
                               _include_usage(body))
            return StreamingResponse(sse, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices = [{"index": i, "logprobs": None, "finish_reason": "stop",
                    **({"message": {"role": "assistant", "content": t}} if chat else {"text": t})}
                   for i, t in enumerate(texts)]
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": name, "choices": choices, "system_fingerprint": None, "usage": usage}

    return app


def _include_usage(body: ChatRequest | CompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage
