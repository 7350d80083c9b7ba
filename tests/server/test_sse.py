"""The SSE chunk builder: OpenAI's chunk shapes for chat and completions, and a whole answer streamed."""

from __future__ import annotations

import asyncio
import json

from canvaslm.server.sse import DONE, Chunks, stream_whole


def payload(chunk: str) -> dict:
    assert chunk.startswith("data: ") and chunk.endswith("\n\n")
    return json.loads(chunk[len("data: "):])


def test_chat_chunks():
    chunks = Chunks("chatcmpl-1", 7, "m", chat=True)
    opening = payload(chunks.delta(0, None, role=True))
    assert opening == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
                       "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                    "finish_reason": None}]}
    assert payload(chunks.delta(1, "hé"))["choices"][0]["delta"] == {"content": "hé"}
    last = payload(chunks.delta(1, None, "stop"))["choices"][0]
    assert last["delta"] == {} and last["finish_reason"] == "stop"
    assert payload(chunks.delta(0, None, extra={"step": 2}))["canvaslm"] == {"step": 2}


def test_completion_chunks_and_usage():
    chunks = Chunks("cmpl-1", 7, "m", chat=False)
    assert payload(chunks.delta(0, None, "length"))["choices"] == [
        {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]
    usage = payload(chunks.usage(3, 4))
    assert usage["object"] == "text_completion" and usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_a_whole_answer_streams_as_one_content_chunk_per_choice():
    async def collect():
        return [c async for c in stream_whole(Chunks("x", 1, "m", chat=True), ['{"a": 1}', "{}"], 5, 6, True)]

    out = asyncio.run(collect())
    assert out[-1] == DONE
    bodies = [payload(c) for c in out[:-1]]
    assert [b["choices"][0]["delta"] for b in bodies[:4]] == [
        {"role": "assistant", "content": '{"a": 1}'}, {}, {"role": "assistant", "content": "{}"}, {}]
    assert [b["choices"][0]["finish_reason"] for b in bodies[:4]] == [None, "stop", None, "stop"]
    assert bodies[4]["usage"]["total_tokens"] == 11
