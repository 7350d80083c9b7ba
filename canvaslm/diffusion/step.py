"""One denoising step: a canvas's decoder logits -> the canvas the next decoder pass reads.

`generate_steps` (every row of a batch at the same step) and the serving engine (each sequence at its own step)
both advance a canvas with `denoise_step`, so they draw the same random numbers in the same order and cannot drift:

    penalties -> temperature -> allowed tokens -> pins -> carry-over -> n-gram bans -> propose -> accept (a drawn
    repeat waits) -> re-noise -> revise -> argmax -> hold -> stop test (a draft that repeats is not committed early;
    at the last step it is repaired)

(A masked model's draft shows the tokens it kept rather than their argmax, and its canvas stops as soon as no mask
is left and nothing was revised: the pass the stability test would spend after that can only repeat the canvas.)

The pieces are the pure functions of `canvaslm.diffusion.sampling`; this module only composes them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

from canvaslm.diffusion.sampling import (
    DiffusionSampling,
    accept,
    ban,
    carry_over,
    drawn_twice,
    held_of,
    kept_tokens,
    open_sub_block,
    penalize,
    penalize_rows,
    pin,
    propose,
    random_canvas,
    renoise,
    repeated_ngram_bans,
    repeated_ngrams,
    revise,
    sample_inverse_cdf,
    stable_and_confident,
    stack_rows,
    temperature_at,
)
from canvaslm.errors import GenerationError


@dataclass(frozen=True)
class Constraint:
    """What the generated region must hold, position by position: pinned tokens and allowed-token sets.

    One type for every restriction: an infill's suffix, a puzzle's givens and a JSON schema's skeleton are pins
    (written into each canvas, certain, never re-noised, so the free positions are denoised seeing them on both
    sides); digit-only cells and a value's grammar are allowed-token masks (-inf elsewhere, before sampling)."""
    pins: Tensor | None = None      # [B, n] the token position i must hold, -1 where free
    allowed: Tensor | None = None   # [B, n, V] bool: the tokens position i may take (past n: any)
    keep_logits: bool = False       # hand each canvas's last-step logits to the caller (`CanvasCommitted.logits`)

    def check(self, batch: int, vocab_size: int) -> None:
        """A GenerationError unless pins are [batch, n] token ids (or -1) and allowed is [batch, n, vocab] bool."""
        if self.pins is not None:
            pins = self.pins
            if not isinstance(pins, Tensor) or pins.dim() != 2 or pins.shape[0] != batch or pins.is_floating_point():
                raise GenerationError(f"constraint pins must be an integer tensor [{batch}, n], got "
                                      f"{getattr(pins, 'shape', type(pins).__name__)}")
            if pins.numel() and (int(pins.min()) < -1 or int(pins.max()) >= vocab_size):
                raise GenerationError(f"constraint pins must be token ids in [0, {vocab_size}) or -1 (free)")
        if self.allowed is not None:
            allowed = self.allowed
            if not isinstance(allowed, Tensor) or allowed.dtype != torch.bool or allowed.dim() != 3 \
                    or allowed.shape[0] != batch or allowed.shape[2] != vocab_size:
                raise GenerationError(f"constraint allowed must be a bool tensor [{batch}, n, {vocab_size}], got "
                                      f"{getattr(allowed, 'shape', type(allowed).__name__)}")

    def for_canvas(self, index: int, length: int) -> tuple[Tensor | None, Tensor | None]:
        """(pins [B, C], allowed [B, C, V]) of canvas `index` of `length` positions; None where nothing applies."""
        start, stop = index * length, (index + 1) * length
        pins = allowed = None
        if self.pins is not None and bool((self.pins[:, start:stop] >= 0).any()):
            part = self.pins[:, start:stop]
            pins = torch.nn.functional.pad(part, (0, length - part.shape[1]), value=-1)
        if self.allowed is not None and start < self.allowed.shape[1]:
            part = self.allowed[:, start:stop]
            allowed = torch.nn.functional.pad(part, (0, 0, 0, length - part.shape[1]), value=True)
        return pins, allowed


@dataclass
class CanvasState:
    """A canvas being denoised (all rows of a batch, or one sequence)."""
    canvas: Tensor                   # [B, C] the tokens the next decoder pass reads
    draft: Tensor                    # [B, C] argmax of the last step: the best guess so far
    history: Tensor                  # [S, B, C] the last S drafts, for the stability test
    stopped: Tensor                  # [B] bool: rows that stopped denoising keep their state
    pins: Tensor | None = None       # [B, C] tokens the canvas must hold (-1 where free): certain, never re-noised
    sc_logits: Tensor | None = None  # the last step's tempered logits, fed back as self-conditioning
    step: int = 0                    # denoising steps done
    waited: Tensor | None = None     # [B] passes in a row that kept no new token (think passes; None: none yet)


@dataclass
class StepOutcome:
    state: CanvasState               # the canvas after this step
    accepted: Tensor                 # [B, C] bool: positions the sampler kept this step
    entropy: Tensor                  # [B, C] the tempered distributions' entropy
    logits: Tensor                   # [B, C, V] this step's tempered logits under the allowed mask (before pins)


def canvas_size(model: object, settings: DiffusionSampling) -> int:
    """Tokens each canvas holds when `model` decodes under `settings`: `canvas_size`, or the canvas the model was
    trained on (0); a GenerationError when asked for more than that, which the model never saw."""
    trained = model.canvas_length  # type: ignore[attr-defined]
    if settings.canvas_size > trained:
        raise GenerationError(f"canvas_size must be at most this model's trained canvas of {trained} tokens "
                              f"(or 0 for that canvas), got {settings.canvas_size}")
    return settings.canvas_size or trained


def start_canvas(batch: int, canvas_length: int, vocab_size: int, settings: DiffusionSampling,
                 generator: torch.Generator | None, device: torch.device, mask_token_id: int | None = None,
                 pins: Tensor | None = None, stopped: Tensor | None = None) -> CanvasState:
    """A canvas drawn from the prior (uniform tokens, or all mask tokens), with `pins` written in."""
    canvas = random_canvas(batch, canvas_length, vocab_size, generator, device, mask_token_id)
    if pins is not None:
        canvas = torch.where(pins >= 0, pins, canvas)
    history = torch.full((settings.stability_threshold, batch, canvas_length), -1, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device) if stopped is None else stopped.clone()
    return CanvasState(canvas, canvas, history, stopped, pins)


def held_tokens(counts: Tensor | None, canvas: Tensor, mask_token_id: int | None) -> Tensor | None:
    """[B, V] how often each row's answer holds each token while this canvas is written: the committed text's
    counts [B, V] and the tokens the canvas keeps (a masked model's unmasked positions; a uniform-noise canvas keeps
    nothing final). None when there are no counts (penalties off)."""
    if counts is None or mask_token_id is None:
        return counts
    return counts.scatter_add(1, canvas, (canvas != mask_token_id).to(counts.dtype))


def _penalized(logits: Tensor, state: CanvasState, settings: DiffusionSampling, counts: Tensor | None,
               mask_token_id: int | None) -> Tensor:
    """A step's logits [B, C, V] (or open rows [n, V], row-major over the masked positions) with the settings'
    presence and frequency penalties for what each row's answer holds (`held_tokens`)."""
    if counts is None or not (settings.presence_penalty or settings.frequency_penalty):
        return logits
    held = held_tokens(counts, state.canvas, mask_token_id)
    held = held[(state.canvas == mask_token_id).nonzero()[:, 0]] if logits.dim() == 2 else held[:, None]
    return penalize(logits, held, settings.presence_penalty, settings.frequency_penalty)


def first_from_causal(state: CanvasState, before: Tensor | None, settings: DiffusionSampling,
                      generator: torch.Generator | None, *, mask_token_id: int | None = None,
                      allowed: Tensor | None = None, counts: Tensor | None = None,
                      written: Tensor | None = None) -> CanvasState:
    """`first_token = "causal"`: a fresh canvas's first token drawn from `before` [B, 1, V], the causal pass's logits
    at the last encoded position. A shift-trained masked model's first decoder pass reads that token from exactly
    these logits (`generate_steps`), at the first step's temperature (or `first_token_temperature`), and its
    left-to-right rule always keeps it; so it is drawn here the way `denoise_step` draws it (temperature, allowed
    tokens, never the mask token, the sampler), it stands in the canvas as a kept token, and the step counts as done
    without a decoder pass. The first pass then sees it, where it would have read only masks; a canvas it fills (one
    token, or one whose other positions are pinned) stops without any.

    The state is returned as it is for another setting, a model without the shift or the mask, a budget of one step
    (its one pass must write the whole draft) or a canvas already begun; rows that stopped (finished) or whose
    first position is pinned keep theirs. `counts` [B, V]: the committed text's tokens, for the penalties;
    `written` [B, L]: the committed text itself (-1 where a row has none), for `no_repeat_ngram_size`."""
    if not _drawn_from_causal(state, before, settings, mask_token_id):
        return state
    before = _penalized(before, state, settings, counts, mask_token_id)
    logits = before.float() / _first_temperature(settings)
    if allowed is not None:
        logits = logits.masked_fill(~allowed[:, :1], float("-inf"))
    logits[..., mask_token_id] = float("-inf")  # in place: the division made a new tensor
    logits = _without_repeats(logits, state.canvas[:, :1], written, settings, mask_token_id)
    if settings.sampler == "fast":  # as the AR loop draws (`sample_next`): one softmax, no entropy to work out
        token = sample_inverse_cdf(logits.softmax(dim=-1), generator)                           # [B, 1]
    else:
        token, _ = propose(logits, settings, generator)
    return _with_first(state, token, mask_token_id)


def _drawn_from_causal(state: CanvasState, before: Tensor | None, settings: DiffusionSampling,
                       mask_token_id: int | None) -> bool:
    return settings.first_token == "causal" and before is not None and mask_token_id is not None \
        and state.step == 0 and settings.max_denoising_steps >= 2


def _first_temperature(settings: DiffusionSampling) -> float | Tensor:
    return settings.first_token_temperature or temperature_at(settings.max_denoising_steps, settings)


def first_from_causal_each(states: list[CanvasState], befores: list[Tensor | None],
                           settings: list[DiffusionSampling], generators: list[torch.Generator | None], *,
                           mask_token_id: int | None, allowed: list[Tensor | None], counts: list[Tensor | None],
                           written: list[Tensor | None], held: list[dict[int, float] | None] | None = None
                           ) -> list[CanvasState]:
    """`first_from_causal` for sequences of one row each with their own settings and random generators (the
    serving engine's canvases that start in one step), the usual ones drawn in one batch: the penalties, the
    temperature, the softmax and the inverse CDF over [n, 1, V] at once, one uniform from each row's own generator.
    Each row draws the token `first_from_causal` draws for it alone. Rows with allowed tokens,
    `no_repeat_ngram_size`, another sampler than "fast" or a first position not free are drawn alone. `held`: each
    row's counts as {token: times} (`held_of`), kept by the caller so that no pass reads the counts."""
    out = list(states)
    together = []
    for i, (state, before, options) in enumerate(zip(states, befores, settings, strict=True)):
        if not _drawn_from_causal(state, before, options, mask_token_id):
            continue
        if allowed[i] is None and not options.no_repeat_ngram_size and options.sampler == "fast" \
                and state.pins is None and not bool(state.stopped.any()):
            together.append(i)
        else:
            out[i] = first_from_causal(state, before, options, generators[i], mask_token_id=mask_token_id,
                                       allowed=allowed[i], counts=counts[i], written=written[i])
    if not together:
        return out
    logits = stack_rows([befores[i] for i in together])                                         # [n, 1, V]
    # a fresh canvas holds no token yet: each row's `held_tokens` are its counts
    logits = penalize_rows(logits, [held[i] if held is not None else held_of(counts[i]) for i in together],
                           [settings[i].presence_penalty for i in together],
                           [settings[i].frequency_penalty for i in together])
    temperatures = torch.tensor([float(_first_temperature(settings[i])) for i in together], dtype=torch.float32,
                                device=logits.device).reshape(-1, 1, 1)
    logits = logits.float() / temperatures
    logits[..., mask_token_id] = float("-inf")
    uniforms = torch.cat([torch.rand(1, 1, 1, generator=generators[i], device=logits.device) for i in together])
    tokens = sample_inverse_cdf(logits.softmax(dim=-1), None, uniforms=uniforms)                # [n, 1]
    for j, i in enumerate(together):  # a fresh canvas of masks, its first position free: the token, then masks
        state = states[i]
        canvas = torch.cat([tokens[j:j + 1], state.canvas[:, 1:]], dim=1)
        out[i] = dataclasses.replace(state, canvas=canvas, draft=canvas, step=1,
                                     stopped=state.stopped | (canvas.shape[1] == 1))
    return out


def _with_first(state: CanvasState, token: Tensor, mask_token_id: int) -> CanvasState:
    """The fresh canvas with its first token [B, 1] written where position 0 is free (`first_from_causal`)."""
    free = (state.canvas[:, :1] == mask_token_id) & ~state.stopped[:, None]
    canvas = torch.cat([torch.where(free, token, state.canvas[:, :1]), state.canvas[:, 1:]], dim=1)
    draft = torch.cat([torch.where(free, token, state.draft[:, :1]), state.draft[:, 1:]], dim=1)
    written_out = (canvas != mask_token_id).all(dim=-1)  # a canvas of one token: nothing left for a decoder pass
    return dataclasses.replace(state, canvas=canvas, draft=draft, step=1, stopped=state.stopped | written_out)


def resized(state: CanvasState, size: int, mask_token_id: int) -> CanvasState:
    """A canvas that only its causal first token has written (`first_from_causal`, no decoder pass yet), at another
    size: that token, then masks; a canvas of one token is done. The state `start_canvas` and `first_from_causal`
    would have made at that size (a masked canvas draws no noise), which the serving engine uses to change a
    sequence's canvas size with its load (`runners.DiffusionRunner`)."""
    first, batch = state.canvas[:, :1], state.canvas.shape[0]
    masks = torch.full((batch, size - 1), mask_token_id, dtype=first.dtype, device=first.device)
    history = torch.full((state.history.shape[0], batch, size), -1, dtype=state.history.dtype, device=first.device)
    return dataclasses.replace(state, canvas=torch.cat([first, masks], dim=1),
                               draft=torch.cat([state.draft[:, :1], masks], dim=1), history=history,
                               stopped=torch.full_like(state.stopped, size == 1))


def _without_repeats(logits: Tensor, canvas: Tensor, written: Tensor | None, settings: DiffusionSampling,
                     mask_token_id: int) -> Tensor:
    """`no_repeat_ngram_size`: a step's logits [B, C, V] (or open rows [n, V]) with -inf for every token that would
    complete, at an undecided position whose n - 1 neighbours before it are known (written text, kept tokens,
    pins), an n-gram the answer already holds."""
    n = settings.no_repeat_ngram_size
    if not n or written is None:
        return logits
    undecided = canvas == mask_token_id
    bans = repeated_ngram_bans(torch.cat([written, canvas.masked_fill(undecided, -1)], dim=1), n, written.shape[1])
    bans = bans[undecided[bans[:, 0], bans[:, 1]]]  # a kept token or a pin stays what it is
    if logits.dim() == 3:
        return ban(logits, bans)
    row = _open_row(undecided)
    return ban(logits[None], torch.stack([torch.zeros_like(bans[:, 0]), row[bans[:, 0], bans[:, 1]],
                                          bans[:, 2]], dim=1))[0]


def _open_row(undecided: Tensor) -> Tensor:
    """[B, C]: each undecided position's row among open-row logits [n, V], which are row-major."""
    return undecided.flatten().long().cumsum(dim=0).view_as(undecided) - 1


def _repeating(proposal: Tensor, accepted: Tensor, free: Tensor, written: Tensor, settings: DiffusionSampling
               ) -> Tensor:
    """[B, C] bool: undecided positions this step would keep whose token ends an n-gram, all of it written, kept
    or kept now, that the answer already holds (`no_repeat_ngram_size`). The bans cover a position whose neighbours
    were known before the step; this covers one whose neighbours are drawn in the same step. Under the
    left-to-right order the run of kept positions then ends before it."""
    n = settings.no_repeat_ngram_size
    kept_now = torch.where(accepted | ~free, proposal, -1)
    repeats = repeated_ngrams(torch.cat([written, kept_now], dim=1), n, written.shape[1]) & free & accepted
    if settings.order == "left_to_right":
        repeats = repeats.long().cummax(dim=-1).values.bool() & free  # what follows it waits too
    return repeats


def _final_draft(draft: Tensor, undecided: Tensor, logits: Tensor, written: Tensor, n: int,
                 open_rows: Tensor | None) -> Tensor:
    """The draft [B, C] a canvas commits at its last step, its undecided positions taken left to right: one whose
    token ends an n-gram the text already holds takes its most likely token that does not (`no_repeat_ngram_size`).
    `logits` are the step's [B, C, V], or with `open_rows` [B, C] (the positions they belong to) [m, V]."""
    draft, start = draft.clone(), written.shape[1]
    row = None if open_rows is None else _open_row(open_rows)
    for j in range(draft.shape[1]):
        text = torch.cat([written, draft[:, :j + 1]], dim=1)
        repeats = repeated_ngrams(text, n, start + j)[:, 0] & undecided[:, j]
        if not bool(repeats.any()):
            continue
        bans = repeated_ngram_bans(torch.nn.functional.pad(text[:, :-1], (0, 1), value=-1), n, start + j)
        for b in repeats.nonzero()[:, 0].tolist():
            scores = (logits[b, j] if row is None else logits[row[b, j]]).clone()
            scores[bans[bans[:, 0] == b, 2]] = float("-inf")
            draft[b, j] = scores.argmax()
    return draft


def pins_only(pins: Tensor | None, region: int, filler: int) -> Tensor | None:
    """The committed canvas [B, C] when its first `region` positions (the part still to be generated) are all
    pinned (an infill's suffix, a schema's closing brackets): the pins, `filler` elsewhere; it then costs no decoder
    pass. None when something is free."""
    if pins is None or not bool((pins[:, :region] >= 0).all()):
        return None
    return torch.where(pins >= 0, pins, filler)


def denoise_step(state: CanvasState, logits: Tensor, settings: DiffusionSampling,
                 generator: torch.Generator | None, *, vocab_size: int, mask_token_id: int | None = None,
                 allowed: Tensor | None = None, hold: Tensor | None = None,
                 sc_dtype: torch.dtype | None = torch.float32, counts: Tensor | None = None,
                 written: Tensor | None = None) -> StepOutcome:
    """Advance `state` by one step from the decoder's logits [B, C, V] for its canvas (already shifted for
    shift-trained models), or, where `works_out_open_rows_only` allows, from [n, V]: those of the canvas's n masked
    positions alone, row-major (`open_logits`). A kept position's logits are never read (it keeps its token with
    certainty), so both give the same step; the second skips the kept positions' head rows and sampler work.

    `allowed` [B, C, V] bool restricts each position to its tokens (a `Constraint`'s mask for this canvas).
    `hold` [B, C] bool marks positions whose last draft token stays in the canvas and the draft whatever the
    logits say (the serving engine's settled, already streamed prefix). Rows in `state.stopped` keep their
    whole state. Self-conditioning logits are kept in `sc_dtype` (the embedding's, as the reference does); None
    keeps none (a model that does not read them, `reads_self_conditioning`). `StepOutcome.logits` is [n, V] for
    open rows. `counts` [B, V]: the committed text's tokens, which with the canvas's kept ones the settings'
    presence and frequency penalties read (`held_tokens`). `written` [B, L]: the committed text itself (-1 where a
    row has none), which `no_repeat_ngram_size` reads with the canvas (`_without_repeats`, `_repeating`)."""
    step = state.step + 1
    undecided = None if mask_token_id is None else state.canvas == mask_token_id  # pins sit in the canvas
    open_rows = logits.dim() == 2
    if open_rows:
        _check_open_rows(state, logits, settings, mask_token_id, sc_dtype)
    logits = _penalized(logits, state, settings, counts, mask_token_id)
    logits = logits / temperature_at(settings.max_denoising_steps - state.step, settings)
    if allowed is not None:
        logits = logits.masked_fill(~(allowed[undecided] if open_rows else allowed), float("-inf"))
    constrained = logits
    if state.pins is not None and not open_rows:  # pins sit in the canvas: never among the open rows
        logits = pin(logits, state.pins)
    kept = None
    if mask_token_id is not None:
        if not open_rows:
            logits = carry_over(logits, state.canvas, mask_token_id)
        # a drawn mask token would read as "still masked": never propose it
        logits[..., mask_token_id] = float("-inf")  # in place: carry_over or the temperature made a new tensor
        kept = kept_tokens(state.canvas, mask_token_id)  # certain now: propose works out only the others
        logits = _without_repeats(logits, state.canvas, written, settings, mask_token_id)
    proposal, token_entropy = propose(logits, settings, generator, kept)
    top = None
    if open_rows and settings.acceptance in ("threshold", "adaptive"):  # a kept token is certain
        top = torch.ones(state.canvas.shape, dtype=logits.dtype, device=logits.device)
        top[undecided] = logits.softmax(dim=-1).amax(dim=-1)
    free = undecided
    waited, force = state.waited, None
    if free is not None and settings.think_passes > 0 and settings.acceptance == "threshold":
        # a stuck canvas (nothing free reaches the threshold) re-reads its own beliefs for up to think_passes
        # passes before it keeps its most confident free token anyway
        waited = torch.zeros(free.shape[0], dtype=torch.long, device=free.device) if waited is None else waited
        force = waited >= settings.think_passes
    ranked, deferred = token_entropy, None
    if free is not None and settings.sub_block > 0:
        # undecided positions past the first open sub-block wait: the canvas fills left to right in chunks
        deferred = free & ~open_sub_block(free, settings.sub_block)
        free, ranked = free & ~deferred, token_entropy.masked_fill(deferred, float("inf"))
    accepted = accept(None if open_rows else logits, ranked, settings, step, free, force, top, proposal)
    if deferred is not None:
        accepted &= ~deferred
    if free is not None and written is not None and settings.no_repeat_ngram_size:
        accepted &= ~_repeating(proposal, accepted, free, written, settings)
    if force is not None:
        waited = torch.where((accepted & free).any(dim=-1), 0, waited + 1)
    if state.pins is not None:  # top-k and the like may not pick every pinned position
        accepted |= state.pins >= 0
    canvas = renoise(proposal, accepted, vocab_size, generator, mask_token_id)
    revised = None
    if mask_token_id is not None and settings.revise_probability > 0:
        canvas, revised = revise(canvas, state.canvas, constrained, state.pins, mask_token_id,
                                 settings.revise_probability)
        accepted = accepted | revised
    if mask_token_id is None:
        draft = logits.argmax(dim=-1)
    else:  # absorbing state: a kept token stands, so the draft shows it (the argmax only where still masked)
        masked = canvas == mask_token_id
        if open_rows:  # the argmax of every open row, then kept where the position is still masked
            draft = torch.where(masked, state.canvas.masked_scatter(undecided, logits.argmax(dim=-1)), canvas)
        else:
            draft = canvas.masked_scatter(masked, logits[masked].argmax(dim=-1))
    if hold is not None and bool(hold.any()):
        canvas, draft = torch.where(hold, state.draft, canvas), torch.where(hold, state.draft, draft)
    stopped = state.stopped
    if bool(stopped.any()):  # rows that already stopped keep their state (their stop flag stays set)
        draft = torch.where(stopped[:, None], state.draft, draft)
        canvas = torch.where(stopped[:, None], state.canvas, canvas)
        if sc_dtype is not None:
            kept = state.sc_logits if state.sc_logits is not None else torch.zeros((), device=logits.device)
            logits = torch.where(stopped[:, None, None], kept, logits)  # no [B, C, V] copy in the hot loop
    stop, history = stable_and_confident(state.history, draft, token_entropy, settings.confidence_threshold)
    if mask_token_id is not None and settings.adjacent_repeats == "wait":
        # a canvas that stops early commits its draft, whose undecided positions would bring back the doubled
        # tokens the rule keeps waiting
        stop = stop & ~drawn_twice(canvas == mask_token_id, draft).any(dim=-1)
    if written is not None and settings.no_repeat_ngram_size:
        # a canvas commits its draft when it stops or runs out of steps: the positions it has not decided (a masked
        # canvas's undecided ones, every one of a uniform-noise canvas) must not bring back an n-gram
        n = settings.no_repeat_ngram_size
        open_now = torch.ones_like(draft, dtype=torch.bool) if mask_token_id is None else canvas == mask_token_id
        repeats = (repeated_ngrams(torch.cat([written, draft], dim=1), n, written.shape[1]) & open_now).any(dim=-1)
        repeats &= ~stopped
        if mask_token_id is not None:
            stop = stop & ~repeats  # the next pass decides them under the bans
        ending = torch.full_like(repeats, step >= settings.max_denoising_steps)
        fix = repeats & (ending if mask_token_id is not None else ending | stop)
        if bool(fix.any()):
            final = _final_draft(draft, open_now, logits, written, n, undecided if open_rows else None)
            draft = torch.where(fix[:, None], final, draft)
    if mask_token_id is not None:  # nothing left to unmask: one more pass could only repeat this canvas
        settled = (canvas != mask_token_id).all(dim=-1)
        stop = stop | (settled if revised is None else settled & ~revised.any(dim=-1))  # a revision is re-read
    new = dataclasses.replace(state, canvas=canvas, draft=draft, history=history, stopped=stopped | stop,
                              sc_logits=None if sc_dtype is None else logits.to(sc_dtype), step=step,
                              waited=waited)
    return StepOutcome(new, accepted, token_entropy, constrained)


def works_out_open_rows_only(model: object, settings: DiffusionSampling, keep_logits: bool = False) -> bool:
    """Whether a step of `model` under `settings` may be given only its masked positions' logits (`denoise_step`):
    a masked model whose decoder hands out its hidden states (`decode(..., hidden_states=True)`), which reads no
    self-conditioning, under a sampler that draws position by position (not the reference's multinomial) and
    without revision or kept logits, which read every position."""
    return (getattr(model, "mask_token_id", None) is not None and settings.sampler != "reference"
            and settings.revise_probability == 0 and not keep_logits and not reads_self_conditioning(model)
            and _decodes_hidden_states(type(model)))


@functools.cache
def _decodes_hidden_states(model_type: type) -> bool:
    decode = getattr(model_type, "decode", None)
    return decode is not None and "hidden_states" in inspect.signature(decode).parameters


def _check_open_rows(state: CanvasState, logits: Tensor, settings: DiffusionSampling, mask_token_id: int | None,
                     sc_dtype: torch.dtype | None) -> None:
    """A ValueError unless open-row logits [n, V] fit this step (`works_out_open_rows_only`)."""
    if mask_token_id is None or sc_dtype is not None or settings.revise_probability > 0 \
            or settings.sampler == "reference" or bool(state.stopped.any()):
        raise ValueError("open-row logits need a masked model without self-conditioning, revision, stopped rows "
                         "or the reference sampler")
    masked = int((state.canvas == mask_token_id).sum())
    if logits.shape[0] != masked:
        raise ValueError(f"{logits.shape[0]} open-row logits for {masked} masked positions")


def self_conditioning(state: CanvasState) -> tuple[Tensor | None, Tensor | None]:
    """What the next decoder pass reads as self-conditioning: (logits [B, C, V] or None, rows [B] bool that read
    them or None for all). The last step's logits, as the reference feeds them; with think passes on
    (`think_passes`, `state.waited` set) only a think pass reads them, over the canvas they were formed on: a model
    trained on beliefs recycled over one canvas (Sudoku's `data.recycle_passes`) never met beliefs of another."""
    if state.sc_logits is None or state.waited is None:
        return state.sc_logits, None
    rows = state.waited > 0
    return (state.sc_logits, rows) if bool(rows.any()) else (None, None)


def reads_self_conditioning(model: object) -> bool:
    """Whether the model's next pass reads self-conditioning logits: not when its block adds exactly nothing (a
    model trained without self-conditioning, such as `smol`; `SelfConditioning.adds_nothing`), so a loop need not
    keep or stack them (a 32-sequence serving step stacked 50 MB of them for nothing)."""
    block = getattr(model, "self_conditioning", None)
    adds_nothing = getattr(block, "adds_nothing", None)
    return not (callable(adds_nothing) and adds_nothing())


def self_conditioning_dtype(model: object) -> torch.dtype:
    """The dtype self-conditioning logits are kept in: the token embedding's (bf16 on GPU), as the reference."""
    embed = getattr(model, "embed_tokens", None)
    return embed.weight.dtype if isinstance(embed, torch.nn.Module) else torch.float32
