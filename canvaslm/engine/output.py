"""What comes out of the serving engine: the events a request receives, where its tokens stop (end-of-turn, token
budget), and the text they make as it grows (incremental decoding, stop strings, nothing sent that could still
change)."""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class Tokens:
    ids: list[int]                 # newly final tokens of one sequence, in order


@dataclass
class Draft:
    canvas: int                    # canvas index
    step: int                      # denoising step within the canvas, from 1
    ids: list[int]                 # the whole current argmax canvas (may still change)


@dataclass
class Finished:
    reason: str                    # "stop" (end-of-turn), "length" (token budget) or "abort"
    completion_tokens: int
    forward_passes: int
    tokens_per_forward: float


@dataclass
class CanvasLogits:
    canvas: int                    # canvas index
    logits: Tensor                 # [C, V] its last step's logits under the constraint's allowed tokens


Event = Tokens | Draft | Finished | CanvasLogits


def cut(ids: list[int], eos: Container[int], budget: int) -> tuple[list[int], str | None]:
    """The ids of `ids` to send, up to an end-of-turn and a budget of `budget` more tokens, and why the sequence
    ends there ("stop", "length") or None when it goes on."""
    stop_at = next((i for i, t in enumerate(ids) if t in eos), None)
    out = ids[:stop_at][:budget] if stop_at is not None else ids[:budget]
    if stop_at is not None and stop_at <= budget:
        return out, "stop"
    return out, "length" if len(out) == budget else None


@dataclass
class TextOutput:
    """One sequence's text as its tokens arrive: decoded, cut at the first stop string, and released only up to a
    point no later token can change (no stop string could still begin there, no UTF-8 character is cut)."""

    index: int
    stops: Sequence[str]
    ids: list[int] = field(default_factory=list)
    text: str = ""            # final text so far (stop string removed)
    sent: int = 0             # characters of `text` already released
    finish: str | None = None
    passes: int = 0
    tokens_per_forward: float = 0.0

    def add(self, ids: list[int], tokenizer: Any) -> None:
        """Append tokens; a stop string in the text ends the sequence ("stop") and is cut off. The whole text is
        decoded again each time: byte-level BPE merges across token boundaries, and answers are short."""
        self.ids.extend(ids)
        text = tokenizer.decode(self.ids)
        at = min((p for p in (text.find(s) for s in self.stops) if p >= 0), default=-1)
        if at >= 0:
            self.text, self.finish = text[:at], "stop"
        else:
            self.text = text

    def release(self) -> str:
        """The new text that can be sent now: everything once finished; else up to where no stop string could
        still begin and no UTF-8 character is cut."""
        end = len(self.text)
        if self.finish is None:
            while end and self.text[end - 1] == "\ufffd":
                end -= 1
            for stop in self.stops:
                for k in range(min(len(stop) - 1, end), 0, -1):
                    if self.text[:end].endswith(stop[:k]):
                        end -= k
                        break
        piece = self.text[self.sent:max(end, self.sent)]
        self.sent = max(end, self.sent)
        return piece
