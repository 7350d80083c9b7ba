"""Continuous batching for serving: the canvases of many requests, each at its own denoising step, share one
decoder pass.

Every sequence (one per choice of a request) keeps its own KV cache of its prompt and committed canvases. Each
engine step stacks the running sequences' caches (`KVCache.stack`; rebuilt only when a sequence joins, leaves or
commits a canvas), runs one decoder pass over all their canvases, then advances each sequence with
`canvaslm.diffusion.step.denoise_step`, the step `generate_steps` takes, with its own temperature step, settings
and random generator. A sequence's tokens therefore do not depend on its neighbours (up to float rounding), and a
sequence alone draws exactly what `LM.generate` draws for the same seed.

Streaming: after each step the longest left-to-right prefix of the canvas whose tokens are accepted and unchanged
since the previous step is *settled*. With `pin_settled` (the server's default) it is emitted at once and pinned:
kept in the canvas and in the committed result, so streamed text is never taken back, and a sequence can end as
soon as an end-of-turn or its token budget has settled, before its canvas has converged. Without pinning tokens
are emitted when their canvas is committed, and results equal `LM.generate`.

Autoregressive models are served by the same engine, so that a diffusion model and its AR parent can be compared
through one server: all running AR sequences write their next token in one pass over one stacked cache, which
rows join (stacked in after their own prefill) and leave (selected out) as requests come and go.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from canvaslm.diffusion.step import (CanvasState, Constraint, denoise_step, pins_only, self_conditioning_dtype,
                                     start_canvas)
from canvaslm.engine.ar import advance, sample_next
from canvaslm.engine.lm import LM
from canvaslm.errors import CanvasError, GenerationError, UnsupportedError
from canvaslm.models.cache import KVCache, encode_chunked


class QueueFull(CanvasError):
    """The engine's waiting queue is at its limit; try again later (HTTP 429)."""


class EngineDead(CanvasError):
    """The engine thread stopped on an internal error (HTTP 503; /health reports it)."""


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
    id: int = field(default_factory=itertools.count().__next__)


@dataclass
class _Sequence:
    request: Request
    generator: torch.Generator
    cache: KVCache
    settings: Any                   # DiffusionSampling, or the AR options dict
    emitted: int = 0                # tokens sent so far
    passes: int = 0                 # forward passes that worked on this sequence
    canvas_index: int = 0
    constraint: Constraint | None = None  # the request's, with the suffix as pins
    state: CanvasState | None = None  # diffusion: the current canvas
    allowed: Tensor | None = None   # [1, C, V] the constraint's allowed tokens in the current canvas
    last_logits: Tensor | None = None  # [C, V] the current canvas's last step logits (constraint.keep_logits)
    pinned: int = 0                 # canvas positions [0, pinned) are settled and already emitted
    next_logits: Tensor | None = None  # AR: logits of the next token [1, V]
    before: Tensor | None = None    # shift-trained diffusion: logits [1, 1, V] of the last encoded position,
                                    # the prediction of the canvas's first token


class Engine:
    """Runs sequences from a bounded queue in one background thread, `max_batch` at a time."""

    def __init__(self, lm: LM, max_batch: int = 32, max_queue: int = 256, pin_settled: bool = True,
                 on_step: Callable[[int, float], None] | None = None) -> None:
        self.lm, self.max_batch, self.max_queue, self.pin_settled = lm, max_batch, max_queue, pin_settled
        self.on_step = on_step          # (batch size, seconds) after every forward pass, for metrics
        self._waiting: deque[Request] = deque()
        self._running: list[_Sequence] = []
        self._cancelled: set[int] = set()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stacked: tuple[tuple[tuple[int, int], ...], KVCache] | None = None
        self._ar_cache: KVCache | None = None  # AR: the running sequences' cache, rows in `_running` order
        self.error: BaseException | None = None

    # ---- public, any thread ----------------------------------------------------------------------------------

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="canvaslm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def check(self, request: Request) -> Any:
        """The request's settings, or a CanvasError for options this model does not take."""
        return self.lm.resolve_sampling(dict(request.sampling))

    def submit(self, request: Request) -> None:
        if (request.suffix or request.constraint is not None) and self.lm.kind != "diffusion":
            raise UnsupportedError("infill (a suffix) and canvas constraints need a diffusion model: an "
                                   "autoregressive model cannot see text to the right of what it writes")
        self.lm.check_length(len(request.prompt) + len(request.suffix), request.max_new_tokens)
        if request.constraint is not None:
            if not isinstance(request.constraint, Constraint):
                raise GenerationError(f"a request's constraint must be a Constraint, got "
                                      f"{type(request.constraint).__name__}")
            request.constraint.check(1, self.lm.network.vocab_size)
        self.check(request)
        with self._wake:
            if not self.alive:
                raise EngineDead("the engine is not running")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are waiting")
            self._waiting.append(request)
            self._wake.notify()

    def cancel(self, request_id: int) -> None:
        """Stop a request (a client went away): it leaves the batch at the next step and its cache is freed."""
        with self._wake:
            self._cancelled.add(request_id)
            self._wake.notify()

    # ---- engine thread ---------------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._wake:
                        while not (self._stopping or self._waiting or self._running or self._cancelled):
                            self._wake.wait()
                        if self._stopping:
                            break
                        self._drop_cancelled()
                        admitted = []
                        while self._waiting and len(self._running) + len(admitted) < self.max_batch:
                            admitted.append(self._waiting.popleft())
                    for request in admitted:
                        self._admit(request)
                    if self._running:
                        self._step()
        except BaseException as error:  # surfaced by /health and to every open request
            self.error = error
            with self._wake:
                for seq in self._running:
                    seq.request.emit(Finished("abort", seq.emitted, seq.passes, 0.0))
                for request in self._waiting:
                    request.emit(Finished("abort", 0, 0, 0.0))
                self._running.clear()
                self._waiting.clear()
                self._ar_cache = None

    def _drop_cancelled(self) -> None:
        if not self._cancelled:
            return
        for seq in [s for s in self._running if s.request.id in self._cancelled]:
            self._finish(seq, "abort")
        for request in [r for r in self._waiting if r.id in self._cancelled]:
            self._waiting.remove(request)
            request.emit(Finished("abort", 0, 0, 0.0))
        self._cancelled.clear()

    def _admit(self, request: Request) -> None:
        lm = self.lm
        generator = torch.Generator(lm.device)
        generator.manual_seed(request.seed if request.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        seq = _Sequence(request, generator, lm.network.new_cache(1, lm.device), self.check(request),
                        constraint=self._constraint(request))
        prompt = torch.tensor([request.prompt], device=lm.device)
        valid = torch.ones_like(prompt, dtype=torch.bool)
        hidden = self._timed(1, lambda: encode_chunked(lm.network, prompt, seq.cache, valid))
        if lm.kind == "diffusion":
            self._running.append(seq)  # first: a first canvas that is all pins commits (and may finish) at once
            self._keep_before(seq, hidden)
            self._new_canvas(seq)
        else:
            seq.next_logits, seq.passes = lm.network.logits(hidden[:, -1]), 1
            self._ar_cache = seq.cache if self._ar_cache is None else KVCache.stack([self._ar_cache, seq.cache])
            seq.cache = None  # type: ignore[assignment]  # its row lives in the shared cache now
            self._running.append(seq)

    def _timed(self, batch: int, work: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = work()
        if self.on_step is not None:
            self.on_step(batch, time.perf_counter() - start)
        return out

    def _step(self) -> None:
        if self.lm.kind == "autoregressive":
            self._ar_step()
            return
        rows = self._running
        cache = self._batch_cache()
        canvases = torch.cat([s.state.canvas for s in rows])
        with_sc = torch.tensor([s.state.sc_logits is not None for s in rows], device=canvases.device)
        sc = None
        if bool(with_sc.any()):
            empty = torch.zeros_like(next(s.state.sc_logits for s in rows if s.state.sc_logits is not None))
            sc = torch.cat([s.state.sc_logits if s.state.sc_logits is not None else empty for s in rows])
        logits = self._timed(len(rows), lambda: self.lm.network.decode(canvases, cache, sc,
                                                                       None if bool(with_sc.all()) else with_sc))
        for i, seq in enumerate(list(rows)):
            row = logits[i:i + 1]
            if seq.before is not None:  # as generate_steps: canvas token i is read from output i - 1
                row = torch.cat([seq.before, row[:, :-1]], dim=1)
            self._denoise(seq, row)

    def _keep_before(self, seq: _Sequence, hidden: Tensor) -> None:
        """Shift-trained models predict a canvas's first token from the last encoded position."""
        if getattr(self.lm.network, "canvas_shift", False):
            seq.before = self.lm.network.logits(hidden[:, -1:])

    def _batch_cache(self) -> KVCache:
        """The stacked cache of the running sequences, rebuilt only when one joined, left or committed."""
        key = tuple((s.request.id, s.cache.length) for s in self._running)
        if self._stacked is None or self._stacked[0] != key:
            self._stacked = (key, self._running[0].cache if len(self._running) == 1
                             else KVCache.stack([s.cache for s in self._running]))
        return self._stacked[1]

    def _new_canvas(self, seq: _Sequence) -> None:
        network = self.lm.network
        pins, seq.allowed = (None, None) if seq.constraint is None else \
            seq.constraint.for_canvas(seq.canvas_index, network.canvas_length)
        seq.state = start_canvas(1, network.canvas_length, network.vocab_size, seq.settings, seq.generator,
                                 self.lm.device, getattr(network, "mask_token_id", None), pins)
        seq.pinned, seq.last_logits = 0, None
        total = seq.request.max_new_tokens + len(seq.request.suffix)
        region = min(network.canvas_length, total - seq.canvas_index * network.canvas_length)
        pinned = pins_only(pins, region, self.lm.eos_token_ids[0] if self.lm.eos_token_ids else 0)
        if pinned is not None:  # as generate_steps: no pass, so both draw the same numbers for later canvases
            seq.state.draft = pinned
            self._commit(seq)

    def _constraint(self, request: Request) -> Constraint | None:
        """The request's constraint, with an infill suffix pinned at generated positions max_new_tokens ..
        + len(suffix): the middle is denoised seeing what follows it."""
        if not request.suffix:
            return request.constraint
        suffix = torch.tensor([[-1] * request.max_new_tokens + request.suffix], device=self.lm.device)
        if request.constraint is None or request.constraint.pins is None:
            pins = suffix
        else:
            pins = torch.nn.functional.pad(request.constraint.pins.to(self.lm.device),
                                           (0, suffix.shape[1] - request.constraint.pins.shape[1]), value=-1)
            pins = torch.where(suffix >= 0, suffix, pins)
        return Constraint(pins) if request.constraint is None else dataclasses.replace(request.constraint, pins=pins)

    def _denoise(self, seq: _Sequence, logits: Tensor) -> None:
        """One denoising step of one sequence from its decoder logits [1, C, V] (`denoise_step`, as
        `generate_steps` takes it); the settled prefix already streamed is held."""
        network, settings, before = self.lm.network, seq.settings, seq.state
        seq.passes += 1
        hold = None
        if seq.pinned:
            hold = torch.zeros_like(before.canvas, dtype=torch.bool)
            hold[:, :seq.pinned] = True
        outcome = denoise_step(before, logits, settings, seq.generator, vocab_size=network.vocab_size,
                               mask_token_id=getattr(network, "mask_token_id", None), allowed=seq.allowed, hold=hold,
                               sc_dtype=self_conditioning_dtype(network))
        seq.state = state = outcome.state
        draft = state.draft
        if seq.constraint is not None and seq.constraint.keep_logits:
            seq.last_logits = outcome.logits[0]
        if seq.request.drafts:
            seq.request.emit(Draft(seq.canvas_index, state.step, draft[0].tolist()))
        if bool(state.stopped.all()) or state.step == settings.max_denoising_steps:
            self._commit(seq)
        elif self.pin_settled if seq.request.pin_settled is None else seq.request.pin_settled:
            settled = outcome.accepted & (draft == before.draft)
            settled[:, :seq.pinned] = True
            run = int(settled[0].long().cumprod(0).sum())  # length of the settled left-to-right prefix
            if run > seq.pinned:
                new, seq.pinned = draft[0, seq.pinned:run].tolist(), run
                self._emit_tokens(seq, new)

    def _emit_tokens(self, seq: _Sequence, ids: list[int]) -> bool:
        """Send ids up to an end-of-turn and the token budget; True (and the sequence is finished) when one of
        them was reached."""
        eos = [] if seq.request.ignore_eos else self.lm.eos_token_ids
        stop_at = next((i for i, t in enumerate(ids) if t in eos), None)
        budget = seq.request.max_new_tokens - seq.emitted
        out = ids[:stop_at][:budget] if stop_at is not None else ids[:budget]
        if out:
            seq.emitted += len(out)
            seq.request.emit(Tokens(out))
        if stop_at is not None and stop_at <= budget:
            self._finish(seq, "stop")
            return True
        if seq.emitted >= seq.request.max_new_tokens:
            self._finish(seq, "length")
            return True
        return False

    def _commit(self, seq: _Sequence) -> None:
        if seq.last_logits is not None:
            seq.request.emit(CanvasLogits(seq.canvas_index, seq.last_logits))
        tokens = seq.state.draft[0].tolist()
        if self._emit_tokens(seq, tokens[seq.pinned:]):
            return
        committed = seq.state.draft
        hidden = self.lm.network.encode(committed, seq.cache, torch.ones_like(committed, dtype=torch.bool))
        self._keep_before(seq, hidden)
        seq.canvas_index += 1
        self._new_canvas(seq)

    def _ar_step(self) -> None:
        """Every running AR sequence samples its next token (own options and generator); those that go on write it
        into the shared cache in one pass."""
        going = []
        for seq in list(self._running):
            options = seq.settings
            token = sample_next(seq.next_logits, options["temperature"], options["top_k"], options["top_p"],
                                seq.generator)
            if not self._emit_tokens(seq, [int(token)]):
                going.append((seq, token))
        if not going:
            return
        tokens = torch.cat([token for _, token in going])[:, None]
        logits = self._timed(len(going), lambda: advance(self.lm.network, self._ar_cache, tokens))
        for i, (seq, _) in enumerate(going):
            seq.next_logits = logits[i:i + 1]
            seq.passes += 1

    def _finish(self, seq: _Sequence, reason: str) -> None:
        if self._ar_cache is not None:  # drop its row from the shared AR cache
            index = self._running.index(seq)
            keep = [i for i in range(len(self._running)) if i != index]
            self._ar_cache.select(torch.tensor(keep, dtype=torch.long, device=self._ar_cache.valid.device))
            if not keep:
                self._ar_cache = None
        self._running.remove(seq)
        seq.cache = seq.state = seq.allowed = seq.next_logits = None  # type: ignore[assignment]
        passes = max(seq.passes, 1)
        seq.request.emit(Finished(reason, seq.emitted, passes, seq.emitted / passes))

