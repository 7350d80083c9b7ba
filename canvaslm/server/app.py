"""The OpenAI-compatible HTTP server: FastAPI routes over one continuous-batching `Engine`.

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
import importlib.util
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from canvaslm.engine.batching import CanvasLogits, Draft, Engine, EngineDead, Finished, QueueFull, Tokens
from canvaslm.engine.batching import Request as EngineRequest
from canvaslm.engine.lm import LM
from canvaslm.engine.structured import ROUNDS, JsonPlan, SchemaError, StructuredOutputError
from canvaslm.errors import CanvasError
from canvaslm.server.metrics import Metrics
from canvaslm.server.protocol import ChatRequest, CompletionRequest, Sampling

MAX_ERROR_CHARS = 2000
log = logging.getLogger("canvaslm.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def error_response(status: int, message: str, kind: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message[:MAX_ERROR_CHARS], "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


@dataclass
class Choice:
    """One sequence's text as it grows: decoded incrementally, cut at stop strings."""

    index: int
    stops: Sequence[str]
    ids: list[int] = field(default_factory=list)
    text: str = ""            # final text so far (stop string removed)
    sent: int = 0             # characters of `text` already streamed
    finish: str | None = None
    passes: int = 0
    tokens_per_forward: float = 0.0


class Server:
    def __init__(self, lm: LM, name: str, engine: Engine, metrics: Metrics) -> None:
        self.lm, self.name, self.engine, self.metrics = lm, name, engine, metrics
        self.tokenizer = lm.require_tokenizer()

    # ---- requests ------------------------------------------------------------------------------------------

    def prompt_ids(self, body: ChatRequest | CompletionRequest) -> list[int]:
        if isinstance(body, ChatRequest):
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        prompt = body.prompt
        if isinstance(prompt, list) and not isinstance(prompt[0], int):  # a batch of one prompt
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt must not be empty", param="prompt")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        vocab = self.lm.network.vocab_size
        if max(prompt) >= vocab:
            raise APIError(400, f"prompt token ids must be < the vocabulary size {vocab}", param="prompt")
        return list(prompt)

    async def generate(self, http: Request, body: ChatRequest | CompletionRequest, prompt: list[int],
                       max_tokens: int, suffix: list[int]) -> AsyncIterator[tuple[Choice, Any]]:
        """Run body.n sequences; yields (choice, event) as events arrive (Tokens already decoded into choice.text,
        Draft, Finished), cancelling everything if the client goes away or the generator is closed."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        choices = [Choice(i, body.stops()) for i in range(body.n)]
        requests = []
        for i in range(body.n):
            seed = None if body.seed is None else body.seed + i
            emit = lambda e, i=i: loop.call_soon_threadsafe(inbox.put_nowait, (i, e))  # noqa: E731
            request = EngineRequest(prompt, max_tokens, emit, body.sampling(self.lm.kind == "diffusion"), seed=seed,
                                    drafts=body.canvas_drafts, suffix=suffix, ignore_eos=body.ignore_eos)
            requests.append(request)
        self._submit(requests)
        self.metrics.request_started(len(prompt))
        started, first_token = time.monotonic(), None
        open_choices = body.n
        try:
            while open_choices:
                try:
                    i, event = await asyncio.wait_for(inbox.get(), timeout=1.0)
                except TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                choice = choices[i]
                if choice.finish is not None:
                    continue  # events after a stop string ended this choice
                if isinstance(event, Tokens):
                    first_token = first_token or time.monotonic()
                    self._add_tokens(choice, event.ids)
                    if choice.finish == "stop":  # a stop string: this sequence is done
                        self.engine.cancel(requests[i].id)
                        open_choices -= 1
                elif isinstance(event, Finished):
                    choice.finish = event.reason
                    choice.passes, choice.tokens_per_forward = event.forward_passes, event.tokens_per_forward
                    open_choices -= 1
                yield choice, event
        finally:
            for request, choice in zip(requests, choices, strict=True):
                if choice.finish is None:  # the client went away: stop its sequences
                    self.engine.cancel(request.id)
            done = [c for c in choices if c.finish is not None]
            self.metrics.request_finished([c.finish for c in done], sum(len(c.ids) for c in choices),
                                          [c.tokens_per_forward for c in done if c.passes],
                                          None if first_token is None else first_token - started,
                                          time.monotonic() - started)

    def _submit(self, requests: Sequence[EngineRequest]) -> None:
        """Queue requests in the engine, or none of them: a full queue is a 429, a dead engine a 503, options the
        model does not take a 400."""
        try:
            for request in requests:
                self.engine.submit(request)
        except QueueFull as e:
            for request in requests:
                self.engine.cancel(request.id)
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
        except EngineDead as e:
            raise APIError(503, str(e), "server_error", code="engine_dead") from None
        except CanvasError as e:
            for request in requests:
                self.engine.cancel(request.id)
            raise APIError(400, str(e)) from None

    async def json_in_batch(self, http: Request, body: ChatRequest | CompletionRequest, prompt: list[int],
                            seed: int | None) -> str:
        """response_format json_schema on a diffusion model, inside the continuous batch: each round of
        `JsonPlan` (denoise the scaffold, project the slots, validate) is one engine request that shares decoder
        passes with every other request; the same answer as `LM.generate_json` for the same seed."""
        schema = body.response_format.target_schema()  # type: ignore[union-attr]
        plan = await asyncio.to_thread(JsonPlan, self.lm, prompt, schema)  # the first builds the slot grammars
        seed = seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
        loop = asyncio.get_running_loop()
        for attempt in range(ROUNDS):
            inbox: asyncio.Queue[Any] = asyncio.Queue()
            request = EngineRequest(prompt, plan.size, lambda e: loop.call_soon_threadsafe(inbox.put_nowait, e),
                                    body.sampling(True), seed=seed + attempt, ignore_eos=True,
                                    constraint=plan.constraint(), pin_settled=False)
            self._submit([request])
            last: dict[int, Any] = {}
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(inbox.get(), timeout=1.0)
                    except TimeoutError:
                        if await http.is_disconnected():
                            self.engine.cancel(request.id)
                            raise APIError(499, "the client went away") from None
                        continue
                    if isinstance(event, CanvasLogits):
                        last[event.canvas] = event.logits
                    elif isinstance(event, Finished):
                        break
            except asyncio.CancelledError:
                self.engine.cancel(request.id)
                raise
            if event.reason == "abort":
                raise APIError(503, "the engine stopped this request", "server_error", code="engine_dead")
            if await asyncio.to_thread(plan.judge, last):
                return json.dumps(plan.value, ensure_ascii=False)
        raise plan.failed(ROUNDS)

    def _add_tokens(self, choice: Choice, ids: list[int]) -> None:
        choice.ids.extend(ids)
        text = self.tokenizer.decode(choice.ids)
        cut = min((p for p in (text.find(s) for s in choice.stops) if p >= 0), default=-1)
        if cut >= 0:
            choice.text, choice.finish = text[:cut], "stop"
        else:
            choice.text = text

    def streamable(self, choice: Choice) -> str:
        """The new text that can be sent now: everything when the choice is finished; else up to a point where no
        stop string could still begin and no UTF-8 character is cut."""
        end = len(choice.text)
        if choice.finish is None:
            while end and choice.text[end - 1] == "\ufffd":
                end -= 1
            for stop in choice.stops:
                for k in range(min(len(stop) - 1, end), 0, -1):
                    if choice.text[:end].endswith(stop[:k]):
                        end -= k
                        break
        piece = choice.text[choice.sent:max(end, choice.sent)]
        choice.sent = max(end, choice.sent)
        return piece


def _finish_reason(reason: str | None) -> str | None:
    return {"abort": "stop"}.get(reason or "", reason)


def build_app(lm: LM, name: str, *, max_batch: int = 32, max_queue: int = 256, pin_settled: bool = True) -> FastAPI:
    """The FastAPI app serving `lm` as model `name`; the engine thread starts and stops with the app."""
    metrics = Metrics(name)
    engine = Engine(lm, max_batch=max_batch, max_queue=max_queue, pin_settled=pin_settled,
                    on_step=metrics.forward_pass)
    server = Server(lm, name, engine, metrics)

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="canvaslm", version="0.1.0", lifespan=lifespan)
    app.state.server = server

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
            return StreamingResponse(stream(events, first, body, ident, created, len(prompt), chat),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices: dict[int, Choice] = {}
        async for choice, _ in events:
            choices[choice.index] = choice
        out = []
        for i in range(body.n):
            c = choices[i]
            item: dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": _finish_reason(c.finish)}
            item.update({"message": {"role": "assistant", "content": c.text}} if chat else {"text": c.text})
            out.append(item)
        completion = sum(len(c.ids) for c in choices.values())
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": name, "choices": out, "system_fingerprint": None,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion,
                          "total_tokens": len(prompt) + completion}}

    async def respond_structured(http: Request, body: ChatRequest | CompletionRequest, prompt: list[int],
                                 max_tokens: int, chat: bool) -> Any:
        """response_format json_schema / json_object, sent whole. json_schema on a diffusion model runs inside the
        continuous batch (`Server.json_in_batch`); the rest (json_object, AR models under llguidance) is written by
        `structured_answer` in a worker thread."""
        seeds = [None if body.seed is None else body.seed + i for i in range(body.n)]
        try:
            if lm.kind == "diffusion" and body.response_format.target_schema() is not None:  # type: ignore[union-attr]
                tasks = [asyncio.create_task(server.json_in_batch(http, body, prompt, s)) for s in seeds]
                try:
                    texts = list(await asyncio.gather(*tasks))
                except BaseException:  # one choice failed: stop the others' engine requests too
                    for task in tasks:
                        task.cancel()
                    raise
            else:
                texts = [await asyncio.to_thread(structured_answer, lm, body, prompt, max_tokens, s) for s in seeds]
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
            return StreamingResponse(_whole_stream(texts, ident, created, name, chat, usage, body),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices = [{"index": i, "logprobs": None, "finish_reason": "stop",
                    **({"message": {"role": "assistant", "content": t}} if chat else {"text": t})}
                   for i, t in enumerate(texts)]
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": name, "choices": choices, "system_fingerprint": None, "usage": usage}

    async def stream(events: AsyncIterator[tuple[Choice, Any]], first: tuple[Choice, Any] | None,
                     body: ChatRequest | CompletionRequest, ident: str, created: int, prompt_tokens: int,
                     chat: bool) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, text: str | None, finish: str | None, role: bool = False,
                  extra: dict | None = None) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            payload = {"id": ident, "object": kind, "created": created, "model": name, "choices": [choice]}
            if extra:
                payload["canvaslm"] = extra
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        completion = 0
        if chat:
            for i in range(body.n):
                yield chunk(i, None, None, role=True)
        pending = [first] if first is not None else []
        try:
            async for item in _chain(pending, events):
                choice, event = item
                if isinstance(event, Draft):
                    yield chunk(choice.index, None, None, extra={"canvas": event.canvas, "step": event.step,
                                                                 "draft": server.tokenizer.decode(event.ids)})
                    continue
                piece = server.streamable(choice)
                if piece:
                    yield chunk(choice.index, piece, None)
                if isinstance(event, Finished) or (isinstance(event, Tokens) and choice.finish == "stop"):
                    completion += len(choice.ids)
                    yield chunk(choice.index, None, _finish_reason(choice.finish))
            if body.stream_options is not None and body.stream_options.include_usage:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                         "total_tokens": prompt_tokens + completion}
                payload = {"id": ident, "object": kind, "created": created, "model": name, "choices": [],
                           "usage": usage}
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()

    return app


def structured_answer(lm: LM, body: ChatRequest | CompletionRequest, prompt: list[int], max_tokens: int,
                      seed: int | None) -> str:
    """One JSON answer: json_schema through `LM.generate_json` (validates, or StructuredOutputError); json_object
    as ordinary text that must parse as a JSON object, tried with 3 seeds, else StructuredOutputError (an AR model
    with llguidance installed writes it under the grammar of any JSON object instead)."""
    fmt = body.response_format
    sampling = body.sampling(lm.kind == "diffusion")
    schema = fmt.target_schema()  # type: ignore[union-attr]
    if schema is None and lm.kind != "diffusion" and importlib.util.find_spec("llguidance") is not None:
        schema = {"type": "object"}  # json_object on an AR model: any object, under llguidance's grammar
    if schema is not None:
        return lm.generate_json(prompt, schema, max_tokens, seed, **sampling).text
    for attempt in range(3):
        out = lm.generate([prompt], max_tokens, None if seed is None else seed + 1000 * attempt, **sampling)
        text = lm.tokenizer.decode(lm.decode_new(out.sequences[0], len(prompt))[0][:max_tokens]).strip()  # type: ignore[union-attr]
        text = text.removeprefix("```json").removeprefix("```").removesuffix("```").strip()
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return json.dumps(value, ensure_ascii=False)
    raise StructuredOutputError("the model wrote no JSON object in 3 tries; response_format json_schema lays the "
                                "object out on the canvas and always validates")


async def _whole_stream(texts: list[str], ident: str, created: int, model: str, chat: bool, usage: dict[str, int],
                        body: ChatRequest | CompletionRequest) -> AsyncIterator[str]:
    """A finished answer per choice as one SSE content chunk, then its finish chunk (and usage if asked)."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    for i, text in enumerate(texts):
        for piece, finish in ((text, None), (None, "stop")):
            if chat:
                delta = {"role": "assistant", "content": piece} if piece is not None else {}
                choice: dict[str, Any] = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": i, "text": piece or "", "logprobs": None, "finish_reason": finish}
            payload = {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]}
            yield f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
    if body.stream_options is not None and body.stream_options.include_usage:
        payload = {"id": ident, "object": kind, "created": created, "model": model, "choices": [], "usage": usage}
        yield f"data: {json.dumps(payload)}\n\n"
    yield "data: [DONE]\n\n"


async def _chain(first: list[Any], rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    for item in first:
        yield item
    async for item in rest:
        yield item
