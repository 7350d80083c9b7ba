"""Server-sent events in OpenAI's chunk format: one chunk builder (`Chunks`) for both ways an answer is streamed,
as its text settles (`stream_events`) or whole once it is known (`stream_whole`, structured output)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from canvaslm.engine.output import Draft, Finished, TextOutput, Tokens

DONE = "data: [DONE]\n\n"


def finish_reason(reason: str | None) -> str | None:
    """OpenAI's finish_reason for an engine's: a sequence stopped on our side ("abort") reads as "stop"."""
    return {"abort": "stop"}.get(reason or "", reason)


@dataclass(frozen=True)
class Chunks:
    """The chunks of one response (`chat.completion.chunk` or `text_completion`)."""

    ident: str
    created: int
    model: str
    chat: bool

    def delta(self, index: int, text: str | None, finish: str | None = None, role: bool = False,
              extra: dict[str, Any] | None = None) -> str:
        """Choice `index`'s next piece of text (None: no text), its finish reason once it ends; `role` opens a
        chat answer; `extra` goes under the "canvaslm" key (canvas drafts)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return self._data({"choices": [choice], **({"canvaslm": extra} if extra else {})})

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        return self._data({"choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                    "completion_tokens": completion_tokens,
                                                    "total_tokens": prompt_tokens + completion_tokens}})

    def _data(self, fields: dict[str, Any]) -> str:
        payload = {"id": self.ident, "object": "chat.completion.chunk" if self.chat else "text_completion",
                   "created": self.created, "model": self.model, **fields}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def stream_events(chunks: Chunks, events: AsyncIterator[tuple[TextOutput, Any]], choices: int,
                        prompt_tokens: int, include_usage: bool, decode: Callable[[list[int]], str]
                        ) -> AsyncIterator[str]:
    """The SSE body of a streamed answer: each choice's text as the engine's events release it, drafts as
    "canvaslm" extras, a finish chunk per choice, usage if asked, [DONE]. Closing it closes `events` (which
    cancels what is still running)."""
    completion = 0
    if chunks.chat:
        for i in range(choices):
            yield chunks.delta(i, None, role=True)
    try:
        async for output, event in events:
            if isinstance(event, Draft):
                yield chunks.delta(output.index, None, extra={"canvas": event.canvas, "step": event.step,
                                                              "draft": decode(event.ids)})
                continue
            piece = output.release()
            if piece:
                yield chunks.delta(output.index, piece)
            if isinstance(event, Finished) or (isinstance(event, Tokens) and output.finish == "stop"):
                completion += len(output.ids)
                yield chunks.delta(output.index, None, finish_reason(output.finish))
        if include_usage:
            yield chunks.usage(prompt_tokens, completion)
        yield DONE
    finally:
        await events.aclose()  # type: ignore[attr-defined]


async def stream_whole(chunks: Chunks, texts: list[str], prompt_tokens: int, completion_tokens: int,
                       include_usage: bool) -> AsyncIterator[str]:
    """A finished answer per choice as one content chunk, then its finish chunk (and usage if asked)."""
    for i, text in enumerate(texts):
        yield chunks.delta(i, text, role=True)
        yield chunks.delta(i, None, "stop")
    if include_usage:
        yield chunks.usage(prompt_tokens, completion_tokens)
    yield DONE


async def chain(first: list[Any], rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """`first`'s items, then `rest`'s; closing it closes `rest`."""
    try:
        for item in first:
            yield item
        async for item in rest:
            yield item
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
