"""Serving: what a route asks of the model, between the HTTP layer (`canvaslm.server.app`) and the engine. Prompts
become ids, a request's choices become engine requests, engine events become text (`TextOutput`: incremental
decoding, stop strings), and structured requests run as engine requests too (`Server.structured`), so they share
the continuous batch with everything else.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import torch
from fastapi import Request

from canvaslm.engine.core import Engine, EngineDead, QueueFull
from canvaslm.engine.lm import LM
from canvaslm.engine.guided import json_grammar
from canvaslm.engine.output import CanvasLogits, Event, Finished, TextOutput, Tokens
from canvaslm.engine.request import Request as EngineRequest
from canvaslm.engine.structured import ROUNDS, JsonPlan, StructuredOutputError, violations
from canvaslm.errors import CanvasError
from canvaslm.server.metrics import Metrics
from canvaslm.server.protocol import ChatRequest, CompletionRequest


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


class Server:
    """One model behind the routes: prompts to ids, requests into the engine, events back as text."""

    def __init__(self, lm: LM, name: str, engine: Engine, metrics: Metrics, decoding: str | None = None) -> None:
        self.lm, self.name, self.engine, self.metrics = lm, name, engine, metrics
        self.tokenizer = lm.require_tokenizer()
        self.decoding = lm.decoding_mode(decoding)  # requests without a `decoding` field

    def mode(self, body: ChatRequest | CompletionRequest) -> str:
        """The request's decoding (a 400 when this model has no such way to write)."""
        try:
            return self.lm.decoding_mode(body.decoding or self.decoding)
        except CanvasError as e:
            raise APIError(400, str(e), param="decoding") from None

    def options(self, body: ChatRequest | CompletionRequest, mode: str | None = None) -> dict[str, Any]:
        """The engine request's fields for `mode` (default: the request's decoding): its sampling fields for that
        decoding, and the decoding."""
        mode = mode or self.mode(body)
        return {"sampling": body.sampling(mode == "diffusion"), "decoding": mode}

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
                       max_tokens: int, suffix: list[int]) -> AsyncIterator[tuple[TextOutput, Any]]:
        """Run body.n sequences; yields (choice, event) as events arrive (Tokens already decoded into choice.text,
        Draft, Finished), cancelling everything if the client goes away or the generator is closed."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        choices = [TextOutput(i, body.stops()) for i in range(body.n)]
        requests = []
        for i in range(body.n):
            seed = None if body.seed is None else body.seed + i
            emit = lambda e, i=i: loop.call_soon_threadsafe(inbox.put_nowait, (i, e))  # noqa: E731
            request = EngineRequest(prompt, max_tokens, emit, seed=seed, drafts=body.canvas_drafts, suffix=suffix,
                                    ignore_eos=body.ignore_eos, **self.options(body))
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
                    choice.add(event.ids, self.tokenizer)
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

    async def structured(self, http: Request, body: ChatRequest | CompletionRequest, prompt: list[int],
                         max_tokens: int, seed: int | None) -> str:
        """One answer to a response_format request, always inside the continuous batch: json_schema on a diffusion
        model as `JsonPlan` rounds; on an AR model (json_object too, when llguidance is installed) under the
        grammar; json_object without a grammar as up to 3 plain answers that must parse as an object."""
        # a server default of verified decoding does not apply: structured answers are written the model's way
        schema = body.response_format.target_schema()  # type: ignore[union-attr]
        mode = self.mode(body) if body.decoding else self.lm.decoding_mode(None)
        if mode == "diffusion" and schema is not None:
            return await self.json_in_batch(http, body, prompt, seed)
        if mode == "autoregressive" and (schema is not None or importlib.util.find_spec("llguidance")):
            return await self.grammar_in_batch(http, body, prompt, max_tokens, seed, schema or {"type": "object"})
        if schema is not None:
            raise APIError(400, f"response_format json_schema is written by diffusion or autoregressive decoding, "
                                f"not {mode}", param="decoding")
        return await self.object_in_batch(http, body, prompt, max_tokens, seed, mode)

    async def _run(self, http: Request, **request: Any) -> list[Event]:
        """Submit one engine request (the fields of `EngineRequest` but `emit`) and wait for all its events; it
        is cancelled when the client goes away (499) or the caller is cancelled, and an abort is a 503."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Event] = asyncio.Queue()
        engine_request = EngineRequest(emit=lambda e: loop.call_soon_threadsafe(inbox.put_nowait, e), **request)
        self._submit([engine_request])
        events: list[Event] = []
        try:
            while not events or not isinstance(events[-1], Finished):
                try:
                    events.append(await asyncio.wait_for(inbox.get(), timeout=1.0))
                except TimeoutError:
                    if await http.is_disconnected():
                        self.engine.cancel(engine_request.id)
                        raise APIError(499, "the client went away") from None
        except asyncio.CancelledError:
            self.engine.cancel(engine_request.id)
            raise
        if events[-1].reason == "abort":  # type: ignore[union-attr]
            raise APIError(503, "the engine stopped this request", "server_error", code="engine_dead")
        return events

    async def json_in_batch(self, http: Request, body: ChatRequest | CompletionRequest, prompt: list[int],
                            seed: int | None) -> str:
        """json_schema on a diffusion model: each round of `JsonPlan` (denoise the scaffold, project the slots,
        validate) is one engine request that shares decoder passes with every other request; the same answer as
        `LM.generate_json` for the same seed."""
        schema = body.response_format.target_schema()  # type: ignore[union-attr]
        # the first plan builds the slot grammars
        plan = await asyncio.to_thread(JsonPlan, self.lm, prompt, schema, sampling=body.sampling(True))
        seed = seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
        for attempt in range(ROUNDS):
            events = await self._run(http, prompt=prompt, max_new_tokens=plan.size, sampling=body.sampling(True),
                                     seed=seed + attempt, ignore_eos=True, constraint=plan.constraint(),
                                     pin_settled=False)
            last = {e.canvas: e.logits for e in events if isinstance(e, CanvasLogits)}
            if await asyncio.to_thread(plan.judge, last):
                return json.dumps(plan.value, ensure_ascii=False)
        raise plan.failed(ROUNDS)

    async def grammar_in_batch(self, http: Request, body: ChatRequest | CompletionRequest, prompt: list[int],
                               max_tokens: int, seed: int | None, schema: Mapping[str, Any]) -> str:
        """JSON from an autoregressive model, every token sampled among those llguidance's grammar for `schema`
        allows; StructuredOutputError when it did not finish within max_tokens."""
        grammar = await asyncio.to_thread(json_grammar, schema)
        events = await self._run(http, prompt=prompt, max_new_tokens=max_tokens, seed=seed, grammar=grammar,
                                 pin_settled=False, **self.options(body, "autoregressive"))
        text = self.tokenizer.decode([t for e in events if isinstance(e, Tokens) for t in e.ids])
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            shown = text if len(text) <= 200 else text[:200] + "..."
            raise StructuredOutputError(f"the answer did not finish within max_new_tokens={max_tokens}: "
                                        f"{shown!r}") from None
        problems = violations(schema, value)  # the grammar should make this empty; never return it unchecked
        if problems:
            raise StructuredOutputError("the answer breaks the schema: " + "; ".join(problems))
        return json.dumps(value, ensure_ascii=False)

    async def object_in_batch(self, http: Request, body: ChatRequest | CompletionRequest, prompt: list[int],
                              max_tokens: int, seed: int | None, mode: str) -> str:
        """json_object without a grammar: ordinary answers (seeds seed, seed + 1000, seed + 2000) until one
        parses as a JSON object, else StructuredOutputError."""
        for attempt in range(3):
            events = await self._run(http, prompt=prompt, max_new_tokens=max_tokens,
                                     seed=None if seed is None else seed + 1000 * attempt, pin_settled=False,
                                     **self.options(body, mode))
            text = self.tokenizer.decode([t for e in events if isinstance(e, Tokens) for t in e.ids]).strip()
            text = text.removeprefix("```json").removeprefix("```").removesuffix("```").strip()
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return json.dumps(value, ensure_ascii=False)
        raise StructuredOutputError("the model wrote no JSON object in 3 tries; response_format json_schema lays "
                                    "the object out on the canvas and always validates")
