"""The per-kind halves of the serving engine: how a sequence of a diffusion model and of an autoregressive model is
admitted, advanced by one decoder pass shared with its neighbours, and released. The core loop
(`canvaslm.engine.core`) owns the queue, the thread and the order of sequences; a runner owns the model work.

Diffusion: the running sequences that decode in canvases of one size (`canvas_size`) keep their caches of prompt and
committed canvases stacked, a row each (`SizeBatch`; stacked as a sequence joins, a row dropped as it leaves). Each
step runs one decoder pass per size over all their canvases (the head once, over the outputs the steps read: a
masked model's masked positions, `works_out_open_rows_only`), then advances each sequence with `denoise_step`, the
step `generate_steps` takes, with its own temperature step, settings and random generator; the canvases finished in
that step are committed in one causal pass over their rows, copied out of the batch and written back in place
(`KVCache.take`, `KVCache.put`: a 32-request burst in canvases of 4 on a 2-core Xeon ran 15-20% faster than when
every commit restacked the batch). A sequence's tokens therefore do not depend on its neighbours (up to float
rounding; checked canvases under load aside, below), and a sequence alone draws exactly what `LM.generate` draws for
the same seed. After each step the longest left-to-right prefix of the canvas whose tokens are accepted and
unchanged since the previous step is *settled*; with `pin_settled` it is sent at once and held (kept in the canvas
and the committed result), so streamed text is never taken back. Without pinning tokens are sent when their canvas
is committed, and results equal `LM.generate`. A sequence with `commit_check` is encoded at each commit before
anything is sent, keeps its canvas up to the first token its causal pass finds unlikely (its row rolled back by its
own length, `KVCache.rollback`), and streams at its commits only: a settled prefix could be one the check drops.
While more than `max_draft_batch` sequences run here (1 on CPUs), the checked ones' canvases hold one token, the one
the causal pass that committed the text before them draws (an AR step, no decoder pass): a canvas's draft costs a
decoder pass and a commit pass of its size, an AR step one row. A canvas that only that token has written yet is
resized as the load changes, its row moving to the batch of its new size (`resized`).

Verified (a diffusion model's canvas drafts, its causal pass checks; `canvaslm.engine.verified`): the running
sequences share one cache like the AR ones; each step is one draft pass and one check pass over all of them, and
each row keeps its own accepted length (`KVCache.rollback`), draws with its own generator, and alone writes what
`LM.generate(decoding="verified")` writes for the same seed. With more running sequences than `max_draft_batch`
(on CPUs: more than one, `verified.max_draft_batch`) a step is one AR step for all instead, as vLLM turns
speculative decoding off above a batch size: the same distribution, where drafts' rows would cost more than they
keep.

Autoregressive: all running sequences write their next token in one pass over one stacked cache, which rows join
(stacked in after their own prefill) and leave (selected out) as requests come and go. A request with a grammar
samples each token among those its llguidance matcher allows (`guided.Matcher`), so structured answers share the
batch too; the tokens a grammar forces are written one per pass here (`guided_generate`, alone, writes them in
one), which changes the passes, not the tokens.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from canvaslm.diffusion.step import (
    Constraint,
    canvas_size,
    denoise_step,
    first_from_causal_each,
    pins_only,
    reads_self_conditioning,
    resized,
    self_conditioning,
    self_conditioning_dtype,
    start_canvas,
    works_out_open_rows_only,
)
from canvaslm.diffusion.generate import after_first_eos, commit_check, open_logits, read_outputs, unchecked
from canvaslm.diffusion.sampling import append_written, count_tokens, penalties_on, stack_rows
from canvaslm.engine.ar import advance, sample_next, sample_next_each
from canvaslm.engine.guided import GuidedDecodingError, Matcher, llg_tokenizer
from canvaslm.engine.lm import LM
from canvaslm.engine.output import CanvasLogits, Draft
from canvaslm.engine.request import Request, Sequence
from canvaslm.engine.verified import (accept, check_logits, draft_block, draft_logits, draft_size, held_through,
                                     penalized, propose, without_repeats)
from canvaslm.models.cache import KVCache

SendTokens = Callable[[Sequence, list[int]], bool]
"""The core's output: send a sequence's new tokens up to an end-of-turn and its budget; True when it finished."""
VerifiedRound = Callable[[list[int], int], None]
"""After each verified step (for metrics): per running sequence the draft tokens kept, and the drafts proposed."""


class Timer:
    """Times decoder passes and reports (batch size, seconds) to `on_step` (the server's metrics)."""

    def __init__(self, on_step: Callable[[int, float], None] | None) -> None:
        self.on_step = on_step

    def __call__(self, batch: int, work: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = work()
        if self.on_step is not None:
            self.on_step(batch, time.perf_counter() - start)
        return out


def start_answer(lm: LM, seq: Sequence) -> None:
    """A sequence's record of its answer's tokens, empty: their counts [1, V] for its penalties (and as
    {token: times}, which rows sampled together read) and the tokens themselves [1, 0] for `no_repeat_ngram_size`,
    each None when its settings do not read it."""
    penalized = penalties_on(seq.settings)
    seq.counts = torch.zeros(1, lm.network.vocab_size, device=lm.device) if penalized else None
    seq.held = {} if penalized else None
    settings = seq.settings
    n = settings.get("no_repeat_ngram_size", 0) if isinstance(settings, dict) else settings.no_repeat_ngram_size
    seq.written = torch.zeros(1, 0, dtype=torch.long, device=lm.device) if n else None


def record_answer(seq: Sequence, tokens: Tensor) -> None:
    """tokens [1, n] joined the sequence's answer (committed, or in the cache)."""
    count_tokens(seq.counts, tokens)
    if seq.held is not None:
        for token in tokens[0].tolist():
            seq.held[token] = seq.held.get(token, 0.0) + 1.0
    seq.written = append_written(seq.written, tokens)


def by_canvas_size(sequences: list[Sequence]) -> dict[int, list[Sequence]]:
    """The sequences grouped by the size of their canvas (`canvas_size`): a pass takes canvases of one size."""
    sizes: dict[int, list[Sequence]] = {}
    for seq in sequences:
        sizes.setdefault(seq.state.canvas.shape[1], []).append(seq)
    return sizes


@dataclasses.dataclass(eq=False)
class SizeBatch:
    """The running sequences that decode in canvases of one size, and their caches stacked in that order, a row
    each: a sequence joins when it is admitted and leaves when it ends (the only times the rows are copied); a
    commit encodes its rows and writes them back in place (`KVCache.take`, `KVCache.put`)."""

    seqs: list[Sequence]
    cache: KVCache

    def rows(self, seqs: list[Sequence]) -> list[int]:
        return [next(i for i, s in enumerate(self.seqs) if s is seq) for seq in seqs]


class DiffusionRunner:
    def __init__(self, lm: LM, send: SendTokens, timed: Timer, pin_settled: bool,
                 max_draft_batch: int | None = None) -> None:
        """max_draft_batch: the most running sequences whose checked canvases are drafted; while more run, their
        canvases hold one token, the causal pass's (AR steps; None: no limit)."""
        self.lm, self.send, self.timed, self.pin_settled = lm, send, timed, pin_settled
        self.max_draft_batch = max_draft_batch
        self._batches: dict[int, SizeBatch] = {}  # by the size of the canvases their sequences decode now

    def admit(self, seq: Sequence, hidden: Tensor) -> None:
        """After the prompt was encoded (`hidden` [1, P, D]): its cache joins the batch of its canvas size, then
        its first canvas; one that is all pins commits (and may finish) at once."""
        seq.constraint = self._constraint(seq.request)
        if seq.constraint is not None:
            seq.settings = unchecked(seq.settings)
        start_answer(self.lm, seq)
        self._keep_before([seq], hidden)
        size = canvas_size(self.lm.network, seq.settings)
        batch = self._batches.get(size)
        if batch is None:
            self._batches[size] = SizeBatch([seq], seq.cache)
        else:
            batch.seqs.append(seq)
            batch.cache = KVCache.stack([batch.cache, seq.cache])
        seq.cache = None  # its row lives in the batch now
        try:
            self._new_canvases([seq])
        except BaseException:
            self._leave(seq)
            raise

    def step(self, running: list[Sequence]) -> None:
        """One decoder pass per canvas size among the running sequences (`canvas_size`), a step of each, then one
        commit pass for the canvases that finished. Canvases their causal first token filled (one token: AR
        steps, `_next_size`) need no decoder pass; their commit counts as their pass."""
        self._regroup(running)
        finished = []
        for group in by_canvas_size(running).values():
            if all(bool(seq.state.stopped.all()) for seq in group):
                for seq in group:
                    seq.passes += 1
                finished.extend(group)
            else:
                finished.extend(self._step(group))
        self._commit(finished)

    def _next_size(self, seq: Sequence, running: int) -> int:
        """The size of the sequence's canvases while `running` sequences run: its own (`canvas_size`), or one
        token while more than `max_draft_batch` run, for a sequence whose commits are checked and whose canvases
        start with the causal pass's token. Such a canvas is a draft that the causal pass checks; a canvas of one is
        that pass's own next token, an AR step, one row where a canvas costs two passes of its size; vLLM stops
        drafting above a batch size for the same reason. A constrained sequence (pins at fixed positions of its
        canvases) or one whose client watches its canvases (`canvas_drafts`) keeps its size."""
        settings, network = seq.settings, self.lm.network
        size = canvas_size(network, settings)
        if self.max_draft_batch is None or running <= self.max_draft_batch or seq.constraint is not None \
                or seq.request.drafts or not self._checks(seq) or settings.first_token != "causal" \
                or settings.max_denoising_steps < 2 or not getattr(network, "canvas_shift", False) \
                or getattr(network, "mask_token_id", None) is None:
            return size
        return 1

    def _regroup(self, running: list[Sequence]) -> None:
        """Before a step: each canvas that only its causal first token has written yet takes the size the load asks
        for (`_next_size`, `resized`), its row moving to that size's batch; the rows that move do so all at once,
        one copy out of each batch they leave and one stack into each they join."""
        moving: dict[int, list[Sequence]] = {}
        for seq in running:
            size = self._next_size(seq, len(running))
            if size != seq.state.canvas.shape[1] and seq.state.step == 1 and seq.settings.first_token == "causal":
                seq.state = resized(seq.state, size, self.lm.network.mask_token_id)
                moving.setdefault(size, []).append(seq)
        for size, group in moving.items():
            parts, joined = [], []
            for key, batch in list(self._batches.items()):
                leaving = [seq for seq in batch.seqs if any(seq is s for s in group)]
                if not leaving:
                    continue
                parts.append(batch.cache.take(torch.tensor(batch.rows(leaving), dtype=torch.long,
                                                           device=self.lm.device)))
                joined.extend(leaving)
                self._drop(key, leaving)
            batch = self._batches.get(size)
            if batch is None:
                self._batches[size] = SizeBatch(joined, KVCache.stack(parts) if len(parts) > 1 else parts[0])
            else:
                batch.seqs.extend(joined)
                batch.cache = KVCache.stack([batch.cache, *parts])

    def _step(self, running: list[Sequence]) -> list[Sequence]:
        """A decoder pass over canvases of one size and a denoising step of each; the sequences whose canvas is
        done."""
        batch = self._batches[running[0].state.canvas.shape[1]]
        if len(batch.seqs) != len(running) or {id(seq) for seq in batch.seqs} != {id(seq) for seq in running}:
            raise RuntimeError("the engine's running sequences and the runner's rows disagree")
        running, cache = list(batch.seqs), batch.cache  # in the rows' order (rows that moved joined at the end)
        canvases = torch.cat([s.state.canvas for s in running])
        feeds = [self_conditioning(s.state) for s in running]  # per sequence: (logits or None, rows or None)
        with_sc = torch.tensor([bool(rows.all()) if rows is not None else sc is not None for sc, rows in feeds],
                               device=canvases.device)
        sc = None
        if bool(with_sc.any()):
            empty = torch.zeros_like(next(s.state.sc_logits for s in running if s.state.sc_logits is not None))
            sc = torch.cat([s.state.sc_logits if s.state.sc_logits is not None else empty for s in running])
        sc_rows = None if bool(with_sc.all()) else with_sc
        network, finished = self.lm.network, []
        sc_dtype = self_conditioning_dtype(network) if reads_self_conditioning(network) else None
        open_only = [works_out_open_rows_only(network, s.settings,
                                              s.constraint is not None and s.constraint.keep_logits) for s in running]
        if any(open_only):  # the head runs once, on the rows the steps read
            rows = self.timed(len(running), lambda: self._head_rows(running, open_only, canvases, cache, sc, sc_rows))
        else:
            logits = self.timed(len(running), lambda: network.decode(canvases, cache, sc, sc_rows))
            rows = [logits[i:i + 1] for i in range(len(running))]
        for seq, row, packed in zip(list(running), rows, open_only, strict=True):
            if packed:
                row = open_logits(row, seq.state.canvas, network.mask_token_id, seq.before)
            elif seq.before is not None:  # as generate_steps: canvas token i is read from output i - 1
                row = torch.cat([seq.before, row[:, :-1]], dim=1)
            if self._denoise(seq, row, sc_dtype):
                finished.append(seq)
        return finished

    def _head_rows(self, running: list[Sequence], open_only: list[bool], canvases: Tensor, cache: KVCache,
                   sc: Tensor | None, sc_rows: Tensor | None) -> list[Tensor]:
        """One decoder pass, then the head once over the outputs each sequence's step reads: a sequence that works
        out only its masked positions gets those rows [m, V] (`read_outputs`), another all of its canvas [1, C, V]."""
        network = self.lm.network
        hidden = network.decode(canvases, cache, sc, sc_rows, hidden_states=True)                  # [B, C, H]
        shift = getattr(network, "canvas_shift", False)
        reads = torch.stack([read_outputs(s.state.canvas[0:1], network.mask_token_id, shift)[0] if packed
                             else torch.ones_like(s.state.canvas[0], dtype=torch.bool)
                             for s, packed in zip(running, open_only, strict=True)])
        logits = network.logits(hidden[reads])                                                     # [M, V]
        rows = list(logits.split(reads.sum(dim=-1).tolist()))
        return [row if packed else row[None] for row, packed in zip(rows, open_only, strict=True)]

    def release(self, seq: Sequence, row: int, running: int) -> None:
        self._leave(seq)

    def _leave(self, seq: Sequence) -> None:
        """Drop the sequence's row from its batch (if it joined one)."""
        for size, batch in self._batches.items():
            if any(s is seq for s in batch.seqs):
                self._drop(size, [seq])
                return

    def _drop(self, size: int, seqs: list[Sequence]) -> None:
        """Drop the sequences' rows from the batch of canvases of `size` (the batch with them, if none is left)."""
        batch = self._batches[size]
        rows = [i for i, s in enumerate(batch.seqs) if not any(s is q for q in seqs)]
        if not rows:
            del self._batches[size]
            return
        batch.seqs = [batch.seqs[i] for i in rows]
        batch.cache.select(torch.tensor(rows, dtype=torch.long, device=self.lm.device))

    def reset(self) -> None:
        self._batches = {}

    def _keep_before(self, seqs: list[Sequence], hidden: Tensor | None = None, logits: Tensor | None = None) -> None:
        """Shift-trained models predict a canvas's first token from the last encoded position: its logits [k, 1, V]
        (a row per sequence), or the head run once over the last position of `hidden` [k, n, D]."""
        if getattr(self.lm.network, "canvas_shift", False):
            logits = self.lm.network.logits(hidden[:, -1:]) if logits is None else logits
            for i, seq in enumerate(seqs):
                seq.before = logits[i:i + 1]

    def _new_canvases(self, seqs: list[Sequence]) -> None:
        """Each sequence's next canvas, at the size of its batch; one that is all pins commits (and may finish)
        at once, the others' first tokens are drawn from the causal pass together (`first_from_causal_each`)."""
        network, drawing = self.lm.network, []
        mask_token_id = getattr(network, "mask_token_id", None)
        for seq in seqs:
            size = next(size for size, batch in self._batches.items() if any(s is seq for s in batch.seqs))
            pins, seq.allowed = (None, None) if seq.constraint is None else \
                seq.constraint.for_canvas(seq.canvas_index, size)
            seq.state = start_canvas(1, size, network.vocab_size, seq.settings, seq.generator,
                                     self.lm.device, mask_token_id, pins)
            seq.pinned, seq.last_logits = 0, None
            total = seq.request.max_new_tokens + len(seq.request.suffix)
            region = min(size, total - seq.canvas_index * size)
            pinned = pins_only(pins, region, self.lm.eos_token_ids[0] if self.lm.eos_token_ids else 0)
            if pinned is not None:  # as generate_steps: no pass, so both draw the same numbers for later canvases
                seq.state.draft = pinned
                self._commit([seq])
            else:
                drawing.append(seq)
        states = first_from_causal_each([s.state for s in drawing], [s.before for s in drawing],
                                        [s.settings for s in drawing], [s.generator for s in drawing],
                                        mask_token_id=mask_token_id, allowed=[s.allowed for s in drawing],
                                        counts=[s.counts for s in drawing], written=[s.written for s in drawing],
                                        held=[s.held for s in drawing])
        for seq, state in zip(drawing, states, strict=True):
            seq.state = state

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

    def _denoise(self, seq: Sequence, logits: Tensor, sc_dtype: torch.dtype | None) -> bool:
        """One denoising step of one sequence from its decoder logits [1, C, V] (`denoise_step`, as
        `generate_steps` takes it; self-conditioning logits kept in `sc_dtype`, None: none); the settled prefix
        already streamed is held. True when its canvas is done."""
        network, settings, before = self.lm.network, seq.settings, seq.state
        seq.passes += 1
        hold = None
        if seq.pinned:
            hold = torch.zeros_like(before.canvas, dtype=torch.bool)
            hold[:, :seq.pinned] = True
        outcome = denoise_step(before, logits, settings, seq.generator, vocab_size=network.vocab_size,
                               mask_token_id=getattr(network, "mask_token_id", None), allowed=seq.allowed, hold=hold,
                               sc_dtype=sc_dtype, counts=seq.counts, written=seq.written)
        seq.state = state = outcome.state
        draft = state.draft
        if seq.constraint is not None and seq.constraint.keep_logits:
            seq.last_logits = outcome.logits[0]
        if seq.request.drafts:
            seq.request.emit(Draft(seq.canvas_index, state.step, draft[0].tolist()))
        if bool(state.stopped.all()) or state.step == settings.max_denoising_steps:
            return True
        if (self.pin_settled if seq.request.pin_settled is None else seq.request.pin_settled) and not self._checks(seq):
            settled = outcome.accepted & (draft == before.draft)
            settled[:, :seq.pinned] = True
            run = int(settled[0].long().cumprod(0).sum())  # length of the settled left-to-right prefix
            if run > seq.pinned:
                new, seq.pinned = draft[0, seq.pinned:run].tolist(), run
                self.send(seq, new)
        return False

    def _commit(self, finished: list[Sequence]) -> None:
        """Send the finished canvases' tokens; those that go on are encoded into their rows of the batch in one
        causal pass per canvas size (a commit alone costs about what several do), then start their next canvas.
        A sequence with `commit_check` is encoded first, whether it goes on or not, and sends only what the check
        kept (`generate_steps`'s check, the same tokens for the same seed). A checked canvas of one token (an AR step
        under load) holds nothing to check: as in the AR loop, it is encoded only if its sequence goes on."""
        checked = [seq for seq in finished if self._checks(seq) and seq.state.draft.shape[1] > 1]
        kept = self._encode(checked, check=True)
        going = []
        for seq in finished:
            if seq.last_logits is not None:
                seq.request.emit(CanvasLogits(seq.canvas_index, seq.last_logits))
            tokens = seq.state.draft[:, :kept.get(id(seq), seq.state.draft.shape[1])]
            if not self.send(seq, tokens[0, seq.pinned:].tolist()):
                record_answer(seq, tokens)
                going.append(seq)
        encoded = {id(seq) for seq in checked}
        self._encode([seq for seq in going if id(seq) not in encoded], check=False)
        for seq in going:
            seq.canvas_index += 1
        self._new_canvases(going)

    def _checks(self, seq: Sequence) -> bool:
        """Whether the sequence's commits are checked: `commit_check` on (a constrained one's settings are
        `unchecked` at admission: its pins sit at fixed positions of the canvases)."""
        return bool(seq.settings.commit_check)

    def _encode(self, seqs: list[Sequence], check: bool) -> dict[int, int]:
        """Encode the sequences' finished canvases into their rows of the batch, one causal pass per canvas size,
        and keep each one's logits for its next canvas's first token. With `check`, each keeps its canvas up to the
        first token the pass finds unlikely (`commit_check`; its row rolled back): how many it kept, by id."""
        kept: dict[int, int] = {}
        network = self.lm.network
        for size, group in by_canvas_size(seqs).items():
            batch = self._batches[size]
            group = [seq for seq in batch.seqs if any(seq is s for s in group)]  # in the rows' order
            committed = torch.cat([seq.state.draft for seq in group])
            valid = torch.ones_like(committed, dtype=torch.bool)
            if check:
                batch.cache.slack = max(batch.cache.slack, size)  # sliding layers keep what a rollback needs
            whole = len(group) == len(batch.seqs)  # every row commits: in place
            index = None if whole else torch.tensor(batch.rows(group), dtype=torch.long, device=self.lm.device)
            cache = batch.cache if index is None else batch.cache.take(index)
            hidden = network.encode(committed, cache, valid)
            if check:  # one head call: it checks tokens 1.. and predicts the next first token where a row's text ends
                causal = network.logits(hidden)
                is_eos = torch.isin(committed, torch.tensor(self.lm.eos_token_ids, device=committed.device))
                least = torch.tensor([seq.settings.commit_check for seq in group])
                repeats = torch.tensor([seq.settings.adjacent_repeats == "drop" for seq in group])
                last = commit_check(causal[:, :-1], committed, ~after_first_eos(is_eos), least, repeats)
                if bool((last < size).any()):
                    cache.rollback(size, last)
                kept.update((id(seq), int(n)) for seq, n in zip(group, last, strict=True))
                ends = causal[torch.arange(len(group), device=causal.device), last - 1]  # where each row's text ends
                self._keep_before(group, logits=ends[:, None])
            else:
                self._keep_before(group, hidden)
            if index is not None:
                batch.cache.put(index, cache)
        return kept


class SharedCacheRunner:
    """A runner whose running sequences share one cache: a sequence's row joins it after its own prefill (stacked
    in last, as the core appends it) and leaves it when the sequence ends. `admit` does whatever may fail for the
    request alone (a CanvasError) before `_join`, so the core can end that request without touching the rows."""

    def __init__(self, lm: LM, send: SendTokens, timed: Timer) -> None:
        self.lm, self.send, self.timed = lm, send, timed
        self._cache: KVCache | None = None  # rows in the core's running order

    def _join(self, seq: Sequence) -> KVCache:
        self._cache = seq.cache if self._cache is None else KVCache.stack([self._cache, seq.cache])
        seq.cache = None  # its row lives in the shared cache now
        return self._cache

    def release(self, seq: Sequence, row: int, running: int) -> None:
        """Drop row `row` of `running` rows from the shared cache."""
        if self._cache is None:
            return
        keep = [i for i in range(running) if i != row]
        self._cache.select(torch.tensor(keep, dtype=torch.long, device=self._cache.valid.device))
        if not keep:
            self._cache = None

    def reset(self) -> None:
        self._cache = None


class ARRunner(SharedCacheRunner):
    def admit(self, seq: Sequence, hidden: Tensor) -> None:
        """After the prompt was encoded: its next-token logits, and its cache becomes the last row of the shared
        one (the core appended it last to the running sequences)."""
        seq.next_logits, seq.passes = self.lm.network.logits(hidden[:, -1]), 1
        start_answer(self.lm, seq)
        if seq.request.grammar is not None:
            seq.matcher = Matcher(llg_tokenizer(self.lm.require_tokenizer(), self.lm.network.vocab_size),
                                  seq.request.grammar)
        self._join(seq)

    def step(self, running: list[Sequence]) -> None:
        """Every running sequence samples its next token (own options and generator); those that go on write it
        into the shared cache in one pass."""
        going, seqs = [], list(running)
        vocab, eos = self.lm.network.vocab_size, self.lm.eos_token_ids
        tokens = sample_next_each(stack_rows([s.next_logits for s in seqs]), [s.settings for s in seqs],
                                  [s.generator for s in seqs],
                                  [None if s.matcher is None else s.matcher.allowed(vocab, s.next_logits.device)
                                   for s in seqs], [s.counts for s in seqs], [s.written for s in seqs],
                                  [s.held for s in seqs])
        for i, seq in enumerate(seqs):
            matcher, token = seq.matcher, tokens[i:i + 1]
            record_answer(seq, token[:, None])
            ids = [int(token)]
            if matcher is not None:
                try:
                    matcher.consume(ids)
                    ended = matcher.stopped
                except GuidedDecodingError:  # cannot happen under its own mask; the answer just ends unfinished
                    ended = True
                if ended and ids[0] not in eos:
                    ids.append(eos[0])  # where the grammar ends, the sequence stops
            if not self.send(seq, ids):
                going.append((seq, token))
        if not going:
            return
        tokens = torch.cat([token for _, token in going])[:, None]
        logits = self.timed(len(going), lambda: advance(self.lm.network, self._cache, tokens))
        for i, (seq, _) in enumerate(going):
            seq.next_logits = logits[i:i + 1]
            seq.passes += 1


class VerifiedRunner(SharedCacheRunner):
    def __init__(self, lm: LM, send: SendTokens, timed: Timer, on_verified: VerifiedRound | None = None,
                 max_draft_batch: int | None = None) -> None:
        """max_draft_batch: the most running sequences a step drafts for; above it a step is one AR step for all
        (None: no limit)."""
        super().__init__(lm, send, timed)
        self.on_verified, self.max_draft_batch = on_verified, max_draft_batch

    def admit(self, seq: Sequence, hidden: Tensor) -> None:
        """After the prompt was encoded: its first token, drawn from the causal pass (the first anchor); its cache
        becomes the last row of the shared one."""
        options, network = seq.settings, self.lm.network
        seq.anchor = sample_next(network.logits(hidden[:, -1]), options["temperature"], options["top_k"],
                                 options["top_p"], seq.generator)
        seq.passes = 1
        start_answer(self.lm, seq)  # the generated tokens in its cache row
        self._join(seq).slack = draft_size(network)  # sliding layers keep what a rollback of one check needs
        self.send(seq, seq.anchor.tolist())  # final once drawn; it may end the sequence (then released)

    def step(self, running: list[Sequence]) -> None:
        """One draft pass and one check pass for every running sequence; each keeps its accepted drafts and the
        next token, its own length. With more sequences than `max_draft_batch`, one AR step instead."""
        if self.max_draft_batch is not None and len(running) > self.max_draft_batch:
            self._ar_step(running)
            return
        network, cache = self.lm.network, self._cache
        blocks = torch.cat([draft_block(s.anchor, network, s.generator) for s in running])
        logits = self.timed(len(running), lambda: draft_logits(network, blocks, cache))
        proposals = [propose(penalized(logits[i:i + 1], held_through(s.counts, s.anchor[:, None]), s.settings),
                             s.settings, s.generator) for i, s in enumerate(running)]
        draft, anchors = torch.cat([d for d, _ in proposals]), torch.cat([s.anchor for s in running])
        checked = self.timed(len(running), lambda: check_logits(network, anchors, draft, cache))
        tokens = torch.cat([anchors[:, None], draft], dim=1)  # what each check position has read through
        verdicts = [accept(draft[i:i + 1], q, without_repeats(
                        penalized(checked[i:i + 1], held_through(s.counts, tokens[i:i + 1]), s.settings), s.written,
                        tokens[i:i + 1], s.settings), s.settings, s.generator)
                    for i, (s, (_, q)) in enumerate(zip(running, proposals, strict=True))]
        k = torch.cat([kept for kept, _ in verdicts])
        cache.rollback(1 + draft.shape[1], 1 + k)
        if self.on_verified is not None:
            self.on_verified(k.tolist(), draft.shape[1])
        for i, (seq, (_, y)) in enumerate(zip(list(running), verdicts, strict=True)):
            seq.passes += 2
            if not self.send(seq, draft[i, :int(k[i])].tolist() + y.tolist()):
                record_answer(seq, tokens[i:i + 1, :1 + int(k[i])])  # the anchor and the kept drafts
                seq.anchor = y

    def _ar_step(self, running: list[Sequence]) -> None:
        """One causal pass writes every sequence's anchor into the shared cache, and each draws its next token from
        the logits after it: the distribution a round keeps, at one row a sequence where a round costs two passes
        of `draft_size` rows. A sequence that only takes these steps draws what an autoregressive one draws."""
        anchors = torch.cat([s.anchor for s in running])[:, None]
        logits = self.timed(len(running), lambda: advance(self.lm.network, self._cache, anchors))
        seqs = list(running)
        for seq in seqs:
            record_answer(seq, seq.anchor[:, None])  # now in the cache
        anchors = sample_next_each(logits, [s.settings for s in seqs], [s.generator for s in seqs], [None] * len(seqs),
                                   [s.counts for s in seqs], [s.written for s in seqs], [s.held for s in seqs])
        for i, seq in enumerate(seqs):
            seq.anchor = anchors[i:i + 1]
            seq.passes += 1
            self.send(seq, seq.anchor.tolist())  # final once drawn, as a round's next anchor; may end the sequence
