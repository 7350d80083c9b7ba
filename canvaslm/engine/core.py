"""Continuous batching for serving, the core loop: a bounded queue, one loop (a background thread, or the thread that
loaded the model: `Engine.run`), admission up to
`max_batch` running sequences, cancellation, and the end of each sequence. Every step, a runner
(`canvaslm.engine.runners`: diffusion, verified or autoregressive, each request's decoding) advances all its running
sequences with one shared pass (verified: a draft pass and a check pass); their tokens leave through
`canvaslm.engine.output` (events, end-of-turn and budget).

Autoregressive models are served by the same engine, so that a diffusion model and its AR parent can be compared
through one server.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from canvaslm.diffusion.step import Constraint
from canvaslm.engine import verified
from canvaslm.engine.guided import Matcher, llg_tokenizer
from canvaslm.engine.lm import LM
from canvaslm.engine.output import Finished, Tokens, cut
from canvaslm.engine.request import Request, Sequence
from canvaslm.engine.runners import ARRunner, DiffusionRunner, Timer, VerifiedRound, VerifiedRunner
from canvaslm.errors import CanvasError, GenerationError, UnsupportedError
from canvaslm.models.cache import KVCache, encode_prompts, prefill_groups


class QueueFull(CanvasError):
    """The engine's waiting queue is at its limit; try again later (HTTP 429)."""


class EngineDead(CanvasError):
    """The engine loop stopped on an internal error (HTTP 503; /health reports it)."""


class Engine:
    """Runs sequences from a bounded queue in one loop, `max_batch` at a time: in a background thread (`start`) or
    in the caller's (`run`)."""

    def __init__(self, lm: LM, max_batch: int = 32, max_queue: int = 256, pin_settled: bool = True,
                 on_step: Callable[[int, float], None] | None = None,
                 on_verified: VerifiedRound | None = None, max_draft_batch: int | None = None) -> None:
        """max_draft_batch: the most running verified sequences a step drafts for, and the most running checked
        canvas sequences that draft canvases; more take AR steps (None: this device's default,
        `verified.max_draft_batch`)."""
        if max_draft_batch is not None and max_draft_batch < 1:
            raise GenerationError(f"max_draft_batch must be >= 1, got {max_draft_batch}")
        self.lm, self.max_batch, self.max_queue, self.pin_settled = lm, max_batch, max_queue, pin_settled
        self._timed = Timer(on_step)    # (batch size, seconds) after every forward pass, for metrics
        self._runners: dict[str, Any] = {"autoregressive": ARRunner(lm, self._send, self._timed)}
        if lm.kind == "diffusion":
            drafts = max_draft_batch if max_draft_batch is not None else verified.max_draft_batch(lm.device)
            self._runners["diffusion"] = DiffusionRunner(lm, self._send, self._timed, pin_settled, drafts)
            self._runners["verified"] = VerifiedRunner(lm, self._send, self._timed, on_verified, drafts)
        self._waiting: deque[Request] = deque()
        self._running: list[Sequence] = []
        self._cancelled: set[int] = set()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._looping = False
        self.error: BaseException | None = None

    # ---- public, any thread ----------------------------------------------------------------------------------

    def start(self) -> Engine:
        """The loop (`run`) in a background thread of its own."""
        self._thread = threading.Thread(target=self.run, name="canvaslm-engine", daemon=True)
        self._looping = True  # alive from now on, not from when the thread gets to run
        self._thread.start()
        return self

    def run(self, started: Callable[[], None] | None = None) -> None:
        """The loop in the calling thread, until `stop` (from another thread) or an error; `started` is called
        once the engine is alive, before its first step (what takes requests starts there). A process whose one
        thread loads the model and runs this loop does all its torch work in that thread, which is what `canvaslm
        serve` does: torch's OpenMP runtime (libgomp) keeps a pool of worker threads per thread that has run a
        parallel op, and with more pooled threads than cores it stops letting them spin between ops. On a 2-core
        CPU the loop then ran at half speed in a thread of its own (the AR loop at one request: 25 tok/s, against
        57 in the thread that loaded the model)."""
        self._looping = True
        try:
            if started is not None:
                started()
            self._loop()
        finally:
            self._looping = False

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._looping and self.error is None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def check(self, request: Request) -> Any:
        """The request's settings, or a CanvasError for options this model (in the request's decoding) does not
        take or values out of range."""
        sampling = self.lm.infill_sampling(request.sampling) if request.suffix else dict(request.sampling)
        return self.lm.resolve_sampling(sampling, request.decoding)

    def submit(self, request: Request) -> None:
        mode = self.lm.decoding_mode(request.decoding)
        if (request.suffix or request.constraint is not None) and mode != "diffusion":
            raise UnsupportedError("infill (a suffix) and canvas constraints need a diffusion model's canvases: "
                                   f"{mode} decoding cannot see text to the right of what it writes")
        if request.grammar is not None:
            if mode != "autoregressive":
                raise UnsupportedError("a grammar guides autoregressive decoding token by token; a diffusion "
                                       "model's structured output is a canvas constraint (Request.constraint)")
            if not self.lm.eos_token_ids:
                raise UnsupportedError(f"{self.lm.source}: a grammar needs an end-of-turn token to stop at")
            # llguidance installed and the grammar compiles: refused here, not in the engine thread
            Matcher(llg_tokenizer(self.lm.require_tokenizer(), self.lm.network.vocab_size), request.grammar)
        if not request.prompt:  # a causal pass needs a position to start from (and the shared prefill a row)
            raise GenerationError("a request's prompt must hold at least one token id")
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
        admitted: deque[Request] = deque()  # taken from the queue, not yet running
        try:
            with torch.inference_mode():
                while True:
                    with self._wake:
                        while not (self._stopping or self._waiting or self._running or self._cancelled):
                            self._wake.wait()
                        if self._stopping:
                            break
                        self._drop_cancelled()
                        while self._waiting and len(self._running) + len(admitted) < self.max_batch:
                            admitted.append(self._waiting.popleft())
                    if admitted:
                        self._admit(admitted)
                    for mode, runner in self._runners.items():  # one shared pass (or two) per decoding mode
                        group = self._group(mode)
                        if group:
                            runner.step(group)
        except BaseException as error:  # surfaced by /health and to every open request
            self.error = error
            with self._wake:
                for seq in self._running:
                    seq.request.emit(Finished("abort", seq.emitted, seq.passes, 0.0))
                for request in [*admitted, *self._waiting]:
                    request.emit(Finished("abort", 0, 0, 0.0))
                self._running.clear()
                self._waiting.clear()
                for runner in self._runners.values():
                    runner.reset()
            if isinstance(error, KeyboardInterrupt | SystemExit):  # `run` in the main thread: the process stops
                raise

    def _drop_cancelled(self) -> None:
        if not self._cancelled:
            return
        for seq in [s for s in self._running if s.request.id in self._cancelled]:
            self._finish(seq, "abort")
        for request in [r for r in self._waiting if r.id in self._cancelled]:
            self._waiting.remove(request)
            request.emit(Finished("abort", 0, 0, 0.0))
        self._cancelled.clear()

    def _admit(self, admitted: deque[Request]) -> None:
        """Encode the admitted prompts into their sequences' own caches, those of similar length in one pass
        (`prefill_groups`), then hand each sequence to its runner, in the order they came (a runner's rows)."""
        lm = self.lm
        caches: dict[int, KVCache] = {}
        hidden: dict[int, Tensor] = {}
        for group in prefill_groups([len(request.prompt) for request in admitted]):
            prompts = [admitted[i].prompt for i in group]
            encoded, last = self._timed(len(group), lambda: encode_prompts(lm.network, prompts, lm.device))
            for j, i in enumerate(group):
                caches[i], hidden[i] = encoded[j], last[j:j + 1]
        for i in range(len(admitted)):
            request = admitted.popleft()
            generator = torch.Generator(lm.device)
            generator.manual_seed(request.seed if request.seed is not None
                                  else int(torch.randint(0, 2**62, ()).item()))
            seq = Sequence(request, generator, caches[i], self.check(request),
                           mode=lm.decoding_mode(request.decoding))
            self._running.append(seq)
            try:
                self._runners[seq.mode].admit(seq, hidden[i])
            except CanvasError:  # this request's own problem (a grammar llguidance refuses): it alone ends
                if seq in self._running:
                    self._running.remove(seq)
                request.emit(Finished("abort", seq.emitted, seq.passes, 0.0))

    def _group(self, mode: str) -> list[Sequence]:
        """The running sequences of one decoding mode, in the order they joined (their runner's row order)."""
        return [s for s in self._running if s.mode == mode]

    def _send(self, seq: Sequence, ids: list[int]) -> bool:
        """Send ids up to an end-of-turn and the token budget; True (and the sequence is finished) when one of
        them was reached."""
        eos = () if seq.request.ignore_eos else self.lm.eos_token_ids
        out, reason = cut(ids, eos, seq.request.max_new_tokens - seq.emitted)
        if out:
            seq.emitted += len(out)
            seq.request.emit(Tokens(out))
        if reason is not None:
            self._finish(seq, reason)
            return True
        return False

    def _finish(self, seq: Sequence, reason: str) -> None:
        group = self._group(seq.mode)
        self._runners[seq.mode].release(seq, group.index(seq), len(group))
        self._running.remove(seq)
        seq.cache = seq.state = seq.allowed = seq.next_logits = None
        passes = max(seq.passes, 1)
        seq.request.emit(Finished(reason, seq.emitted, passes, seq.emitted / passes))
