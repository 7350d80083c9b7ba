"""What the serving engine is asked to do (`Request`) and what it keeps about each sequence while it runs
(`Sequence`): the data the core loop, the runners and the output share."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from canvaslm.diffusion.step import CanvasState, Constraint
from canvaslm.engine.output import Event
from canvaslm.models.cache import KVCache


@dataclass
class Request:
    """One sequence to generate. `emit` receives its events from the engine thread (it must be thread-safe)."""

    prompt: list[int]
    max_new_tokens: int
    emit: Callable[[Event], None]
    sampling: dict[str, Any] = field(default_factory=dict)   # diffusion or AR options, checked on submit
    seed: int | None = None
    drafts: bool = False            # also emit a Draft after every denoising step
    suffix: list[int] = field(default_factory=list)  # infill: fixed right after the max_new_tokens generated ones
    ignore_eos: bool = False        # benchmarks: always write max_new_tokens tokens
    constraint: Constraint | None = None  # pins / allowed tokens over the generated region (batch of one row);
                                          # with keep_logits, a CanvasLogits event before each canvas's tokens
    pin_settled: bool | None = None  # stream and hold settled prefixes (None: the engine's setting)
    grammar: str | None = None      # AR: an llguidance grammar (`guided.json_grammar`) every token must follow;
                                    # the sequence stops ("stop") where the grammar ends
    decoding: str | None = None     # a diffusion model's way to write (`knobs.DECODING`; None: diffusion)
    id: int = field(default_factory=itertools.count().__next__)


@dataclass
class Sequence:
    """A running request: its cache, random stream and progress; the fields from `canvas_index` on belong to its
    runner (diffusion, verified or autoregressive)."""

    request: Request
    generator: torch.Generator
    cache: KVCache | None
    settings: Any                   # DiffusionSampling, or the AR options dict
    mode: str = "diffusion"         # its decoding, which picks its runner
    emitted: int = 0                # tokens sent so far
    passes: int = 0                 # forward passes that worked on this sequence
    canvas_index: int = 0
    constraint: Constraint | None = None  # the request's, with the suffix as pins
    state: CanvasState | None = None  # diffusion: the current canvas
    allowed: Tensor | None = None   # [1, C, V] the constraint's allowed tokens in the current canvas
    last_logits: Tensor | None = None  # [C, V] the current canvas's last step logits (constraint.keep_logits)
    pinned: int = 0                 # canvas positions [0, pinned) are settled and already emitted
    next_logits: Tensor | None = None  # AR: logits of the next token [1, V]
    anchor: Tensor | None = None    # verified: the last token chosen [1], not yet in the cache
    matcher: Any = None             # AR under a grammar: its `guided.Matcher`
    before: Tensor | None = None    # shift-trained diffusion: logits [1, 1, V] of the last encoded position,
                                    # the prediction of the canvas's first token
    counts: Tensor | None = None    # [1, V] the tokens its answer holds (committed, or verified: in the cache),
                                    # which the penalties read; None when its settings have none
    held: dict[int, float] | None = None  # counts' tokens as {token: times}, which rows sampled together read
    written: Tensor | None = None   # [1, L] those tokens in order, which `no_repeat_ngram_size` reads; None: off
