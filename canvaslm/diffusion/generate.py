"""Block-diffusion generation: canvases written one after another, each denoised in parallel.

The loop reproduces transformers' `DiffusionGemmaGenerationMixin.generate` step for step (same random draws
in the same order from the given generator), so a seeded run gives the reference's tokens. `generate_steps`
yields one event per denoising step (for live views and streaming); `generate` runs it to the end.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from canvaslm.diffusion.sampling import DiffusionSampling, append_written, count_tokens, penalties_on
from canvaslm.diffusion.step import (
    Constraint,
    canvas_size,
    denoise_step,
    first_from_causal,
    pins_only,
    self_conditioning,
    self_conditioning_dtype,
    start_canvas,
    works_out_open_rows_only,
)
from canvaslm.errors import GenerationError
from canvaslm.models.cache import KVCache, encode_chunked

class DiffusionModel(Protocol):
    canvas_length: int
    vocab_size: int

    def new_cache(self, batch_size: int, device: torch.device | None = None) -> KVCache: ...
    def encode(self, input_ids: Tensor, cache: KVCache, valid: Tensor) -> Tensor: ...
    def decode(self, canvas_ids: Tensor, cache: KVCache, self_conditioning_logits: Tensor | None,
               self_conditioning_rows: Tensor | None = None) -> Tensor: ...  # rows: only with think passes


@dataclass
class DenoisingStep:
    """One decoder pass of one canvas (all rows of the batch)."""
    canvas: int                # index of the canvas being written (0-based)
    step: int                  # denoising steps done on this canvas so far (1-based)
    max_steps: int
    draft: Tensor              # [B, C] argmax of this step's logits: the best guess so far
    accepted: Tensor           # [B, C] bool, positions the sampler kept this step
    finished: Tensor           # [B] bool, rows whose canvas has stopped denoising
    logits: Tensor | None = None  # [B, C, V] this step's tempered logits under the allowed tokens, when the
                                  # constraint asks for them (`Constraint.keep_logits`): how sure each kept token was


@dataclass
class CanvasCommitted:
    """A finished canvas, appended to the sequences and encoded into the cache."""
    canvas: int
    tokens: Tensor             # [B, C] with pad after EOS
    finished: Tensor           # [B] bool, rows that are done with the whole generation
    logits: Tensor | None = None  # [B, C, V] the last step's constrained logits (`Constraint.keep_logits`; None
                                  # when not asked for, or when the canvas was all pins and needed no pass)
    kept: Tensor | None = None    # [B] tokens of each row's canvas that `commit_check` kept, the rest pad in
                                  # `tokens` and gone from the cache (None: the check is off, all kept)


@dataclass
class DiffusionResult:
    sequences: Tensor          # [B, L + generated] prompt (left-padded) then canvases
    forward_passes: Tensor     # [B] decoder passes that counted for each row (a canvas its causal first token
                               # filled, one of one token, counts the commit that encodes it)
    tokens_per_forward: Tensor # [B] generated non-pad tokens / forward_passes, as the reference defines it
    commit_passes: Tensor | None = None  # [B] causal passes that encoded a row's canvases (the prompt's not
                                         # counted, nor those forward_passes counts): with forward_passes, every
                                         # pass its text cost


def generate_steps(
    model: DiffusionModel,
    input_ids: Tensor,
    valid: Tensor,
    max_new_tokens: int,
    settings: DiffusionSampling,
    eos_token_ids: list[int],
    pad_token_id: int | None,
    generator: torch.Generator | None,
    constraint: Constraint | None = None,
    skip_finished: bool = False,
) -> Iterator[DenoisingStep | CanvasCommitted | DiffusionResult]:
    """Run generation, yielding every denoising step and committed canvas, and lastly the result.

    `skip_finished` runs the decoder only on rows still denoising: rows whose canvas stopped, and rows that
    finished the whole generation, cost nothing. A row's tokens are the reference's as long as no row of the
    batch has finished the whole generation (the random draws do not depend on the logits' values); after that
    the loop no longer waits for finished rows to look "stopped", so later canvases' draws can differ.

    `constraint` (`canvaslm.diffusion.step.Constraint`) restricts the generated region: its pins are written
    into each new canvas and held certain in every step, so the free positions are denoised seeing them on both
    sides (infill, a puzzle's givens, a schema's skeleton); its allowed-token masks put -inf on the tempered
    logits of tokens a format forbids. Without it the loop is the reference's.

    Phases (numbered as in the reference):
      1.a encode the new tokens (the prompt, then each committed canvas) into the cache
      1.b start a canvas of uniform random tokens (or mask tokens; with `first_token = "causal"` its first token
          drawn from the causal pass's last position)
      1.c for each step N..1: decode, then `denoise_step`: temperature; sample; accept by entropy bound;
          renoise the rest; stop rows that are stable and confident; keep the logits for self-conditioning
      1.d commit the argmax canvas; 1.e pad after EOS, stop when every row is finished
    With `commit_check` the canvas is encoded at 1.d, before it is yielded, and each row keeps its canvas up to the
    first token the causal pass finds unlikely (`commit_check`); rows then differ in length, each at its own
    positions (`KVCache.rollback`), and the loop runs until every row has max_new_tokens or its EOS.
    """
    batch, canvas_length, device = input_ids.shape[0], canvas_size(model, settings), input_ids.device
    if constraint is not None:
        constraint.check(batch, model.vocab_size)
        settings = unchecked(settings)
    check = settings.commit_check
    if check and pad_token_id is None:
        raise GenerationError("commit_check needs the model's pad token (pad_token_id), which fills what a row "
                              "drops; this model has none")
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
    cache = model.new_cache(batch, device)
    if check:
        cache.slack = canvas_length  # sliding layers keep what a rollback of one canvas needs
    generated = input_ids.new_zeros(batch, 0)          # [B, G] each row's canvases, what it kept of each
    length = torch.zeros(batch, dtype=torch.long, device=device)  # [B] slots of `generated` each row filled
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    forward_passes = torch.zeros(batch, dtype=torch.long, device=device)
    commit_passes = torch.zeros(batch, dtype=torch.long, device=device)
    sc_dtype = self_conditioning_dtype(model)
    # models trained with absorbing-state noise or with the shift trick (neither is DiffusionGemma's default)
    mask_id, shift = getattr(model, "mask_token_id", None), getattr(model, "canvas_shift", False)
    open_only = works_out_open_rows_only(model, settings, constraint is not None and constraint.keep_logits)
    # the committed text's tokens, which the penalties read (None: off)
    counts = torch.zeros(batch, model.vocab_size, device=device) if penalties_on(settings) else None
    # the committed text itself, which `no_repeat_ngram_size` reads (-1: pad; None: off)
    written = input_ids.new_zeros(batch, 0) if settings.no_repeat_ngram_size else None
    if open_only:
        sc_dtype = None  # such a model reads no self-conditioning
    hidden = encode_chunked(model, input_ids, cache, valid)                                   # 1.a the prompt
    before = model.logits(hidden[:, -1:]) if shift else None  # [B, 1, V] predicts canvas token 0
    canvas_index = 0
    while True:
        pins, allowed = (None, None) if constraint is None else constraint.for_canvas(canvas_index, canvas_length)
        state = start_canvas(batch, canvas_length, model.vocab_size, settings, generator, device, mask_id, pins,
                             done if skip_finished else None)                                 # 1.b
        draft, steps = state.draft, settings.max_denoising_steps
        region = min(canvas_length, max_new_tokens - canvas_index * canvas_length)
        pinned = pins_only(pins, region, int(eos[0]) if len(eos) else 0)
        filled = torch.zeros_like(done)
        if pinned is not None:  # nothing to write; positions past max_new_tokens are never returned
            draft, steps = pinned, 0
        else:  # `first_token = "causal"`: the first token from the causal pass, a decoder pass fewer
            open_before = ~(state.stopped | done)
            state = first_from_causal(state, before, settings, generator, mask_token_id=mask_id, allowed=allowed,
                                      counts=counts, written=written)
            filled = open_before & state.stopped  # by its first token: its commit is its one pass, counted here
            forward_passes += filled
            draft, steps = state.draft, 0 if bool(state.stopped.all()) else steps - state.step
        rows, row_cache, last_logits = None, cache, None
        for _ in range(steps):                                                                # 1.c
            forward_passes += ~(state.stopped | done)
            sc, sc_rows = self_conditioning(state)
            if open_only and not bool(state.stopped.any()):  # the head and the sampler on the masked positions
                hidden = model.decode(state.canvas, cache, sc, hidden_states=True)
                logits = open_logits(model.logits(hidden[read_outputs(state.canvas, mask_id, shift)]),
                                     state.canvas, mask_id, before)
            elif skip_finished and bool(state.stopped.any()):
                active = (~state.stopped).nonzero().squeeze(1)
                if rows is None or not torch.equal(rows, active):
                    rows, row_cache = active, copy.copy(cache)
                    row_cache.select(rows)
                logits = _fill(state.sc_logits, batch, model.vocab_size, state.canvas)
                sc, sc_rows = (None, None) if sc is None else (sc[rows], None if sc_rows is None else sc_rows[rows])
                logits[rows] = _decode(model, state.canvas[rows], row_cache, sc, sc_rows).to(logits.dtype)
            else:
                logits = _decode(model, state.canvas, cache, sc, sc_rows)
            if shift and logits.dim() == 3:  # token i is read from output i - 1, token 0 from the last encoded one
                logits = torch.cat([before, logits[:, :-1]], dim=1)
            outcome = denoise_step(state, logits, settings, generator, vocab_size=model.vocab_size,
                                   mask_token_id=mask_id, allowed=allowed, sc_dtype=sc_dtype, counts=counts,
                                   written=written)
            state, draft = outcome.state, outcome.state.draft
            if constraint is not None and constraint.keep_logits:
                last_logits = outcome.logits
            yield DenoisingStep(canvas_index, state.step, settings.max_denoising_steps, draft, outcome.accepted,
                                state.stopped.clone(), last_logits)
            if bool(state.stopped.all()):
                break
        tokens, finished_now, padded = _finalize_canvas(draft, eos, pad_token_id, done)        # 1.d, 1.e
        kept = None
        if check:  # encoded now, so that what the causal pass drops never reaches the caller
            hidden = model.encode(tokens, cache, torch.ones_like(tokens, dtype=torch.bool))
            commit_passes += ~done & ~filled
            causal = model.logits(hidden)  # one head call: the check, and each row's next first token (with shift)
            kept = commit_check(causal[:, :-1], tokens, ~padded, check, settings.adjacent_repeats == "drop")
            if bool((kept < canvas_length).any()):
                cache.rollback(canvas_length, kept)
            dropped = torch.arange(canvas_length, device=device)[None] >= kept[:, None]
            finished_now = (torch.isin(tokens, eos) & ~padded & ~dropped).any(dim=-1)
            tokens, padded = tokens.masked_fill(dropped, pad_token_id), padded | dropped
            if shift:  # the next canvas's first token is predicted where each row's kept text ends
                before = causal[torch.arange(batch, device=device), kept - 1][:, None]
            kept = kept.masked_fill(done, 0)  # a row done before this canvas keeps none of its pads
        count_tokens(counts, tokens, None if kept is None else (~padded).float())
        written = append_written(written, tokens.masked_fill(padded, -1))
        generated, length = _append(generated, length, tokens, kept, pad_token_id)
        done |= finished_now | (length >= max_new_tokens)  # the last as the reference's MaxLengthCriteria
        yield CanvasCommitted(canvas_index, tokens, done.clone(), last_logits, kept)
        if bool(done.all()):
            break
        if not check:                                                                         # 1.a the canvas
            hidden = encode_chunked(model, tokens, cache, torch.ones_like(tokens, dtype=torch.bool))
            commit_passes += ~done & ~filled
            before = model.logits(hidden[:, -1:]) if shift else None
        canvas_index += 1
    sequences = torch.cat([input_ids, generated[:, :int(length.max())]], dim=1)
    generated = sequences[:, input_ids.shape[1]:]
    counted = generated.shape[1] if pad_token_id is None else (generated != pad_token_id).sum(dim=-1)
    yield DiffusionResult(sequences, forward_passes, counted / forward_passes, commit_passes)


def unchecked(settings: DiffusionSampling) -> DiffusionSampling:
    """The settings a constrained canvas runs under: no commit check, since it drops tokens and a constraint's pins
    sit at fixed positions; a doubled token that `adjacent_repeats = "drop"` left to the check waits for a pass that
    sees its neighbour instead ("wait")."""
    return settings.replace(commit_check=0.0,
                            adjacent_repeats="wait" if settings.adjacent_repeats == "drop" else None)


def commit_check(causal_logits: Tensor, tokens: Tensor, checked: Tensor, min_probability: float | Tensor,
                 drop_repeats: bool | Tensor = False) -> Tensor:
    """`commit_check`: how many tokens of each row's canvas tokens [B, C] to keep, [B]: those before the first
    checked position (checked [B, C] bool; position 0 never is, so every canvas keeps at least one token and a
    generation always advances) whose token the causal pass gives less than `min_probability` (a number, or one
    per row [B]), at temperature 1; all C when there is none. causal_logits [B, C - 1, V]: the causal pass over the
    canvas, row i predicting token i + 1. `drop_repeats` (a bool, or one per row [B]; `adjacent_repeats = "drop"`):
    a checked token equal to the one before it, where that one is not position 0, is dropped too: in a canvas written
    in one pass the decoder drew both without seeing the other (it saw position 0 when it drew position 1), and the
    causal pass then decides whether the repeat comes."""
    if tokens.shape[1] < 2:  # a canvas of one token holds only position 0, which is never checked
        return torch.full(tokens.shape[:1], tokens.shape[1], dtype=torch.long, device=tokens.device)
    logp = causal_logits.float().log_softmax(dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)    # [B, C - 1]
    least = torch.as_tensor(min_probability, dtype=torch.float32, device=logp.device).reshape(-1, 1).log()
    bad = logp < least
    if drop_repeats is not False:
        repeat = torch.zeros_like(bad)
        repeat[:, 1:] = tokens[:, 2:] == tokens[:, 1:-1]                                  # token i + 1 == token i
        bad |= repeat & torch.as_tensor(drop_repeats, device=bad.device).reshape(-1, 1)
    bad &= checked[:, 1:]
    first = bad.long().argmax(dim=-1) + 1
    return torch.where(bad.any(dim=-1), first, tokens.shape[1])


def _append(generated: Tensor, length: Tensor, tokens: Tensor, kept: Tensor | None, pad_token_id: int | None
            ) -> tuple[Tensor, Tensor]:
    """Each row's canvas tokens [B, C] written at its own end of `generated` [B, G] (length [B]: the slots it
    filled), of which it keeps kept[b] (None: all; the rest are overwritten by its next canvas). Without drops
    every row ends at G and this is a concatenation."""
    if kept is None and bool((length == generated.shape[1]).all()):
        return torch.cat([generated, tokens], dim=1), length + tokens.shape[1]
    width = int(length.max()) + tokens.shape[1]
    if width > generated.shape[1]:
        generated = torch.nn.functional.pad(generated, (0, width - generated.shape[1]),
                                            value=0 if pad_token_id is None else pad_token_id)
    index = length[:, None] + torch.arange(tokens.shape[1], device=tokens.device)[None]
    generated = generated.scatter(1, index, tokens)
    return generated, length + (tokens.shape[1] if kept is None else kept)


def read_outputs(canvas: Tensor, mask_token_id: int, shift: bool) -> Tensor:
    """[B, C] bool: the decoder outputs a step that works out only a masked canvas's masked positions reads (their
    own, or with the shift, which reads position i from output i - 1, the ones before them; a masked position 0 then
    reads the causal pass's logits instead)."""
    masked = canvas == mask_token_id
    return torch.nn.functional.pad(masked[:, 1:], (0, 1)) if shift else masked


def open_logits(head_rows: Tensor, canvas: Tensor, mask_token_id: int, before: Tensor | None) -> Tensor:
    """[n, V] logits of a masked canvas's n masked positions, row-major (what `denoise_step` takes as open rows),
    from the head's rows [m, V] of `read_outputs`. With the shift a masked position 0 (a canvas whose first token
    the decoder writes) takes its row of `before` [B, 1, V], the last encoded position's logits."""
    first = canvas[:, 0] == mask_token_id
    if before is None or not bool(first.any()):
        return head_rows
    masked = canvas == mask_token_id
    at_first = torch.zeros_like(masked)
    at_first[:, 0] = True
    at_first = at_first[masked]                                                          # [n]: which rows are a 0
    rows = head_rows.new_empty(at_first.shape[0], head_rows.shape[-1])
    rows[at_first] = before[first, 0].to(rows.dtype)
    rows[~at_first] = head_rows
    return rows


def _decode(model: DiffusionModel, canvas: Tensor, cache: KVCache, sc: Tensor | None, sc_rows: Tensor | None
            ) -> Tensor:
    """The decoder pass; the rows that read self-conditioning are named only when some do not (think passes), so a
    model whose `decode` takes no rows (the reference's adapter in the tests) runs everything else."""
    return model.decode(canvas, cache, sc) if sc_rows is None else model.decode(canvas, cache, sc, sc_rows)


def _fill(sc_logits: Tensor | None, batch: int, vocab_size: int, canvas: Tensor) -> Tensor:
    """What a row that is not decoded this step holds: its last logits (float32), or zeros before any step."""
    if sc_logits is None:
        return torch.zeros(batch, canvas.shape[1], vocab_size, device=canvas.device)
    return sc_logits.float().clone()


def _finalize_canvas(tokens: Tensor, eos: Tensor, pad_token_id: int | None, done: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Pad a committed canvas: whole rows already finished, and every token after a row's first EOS.

    Returns (tokens [B, C], rows that hit EOS in this canvas [B], the positions padded [B, C])."""
    is_eos = torch.isin(tokens, eos)
    finished_now = is_eos.any(dim=-1)
    if pad_token_id is None:
        return tokens, finished_now, torch.zeros_like(is_eos)
    pad = after_first_eos(is_eos) | done[:, None]
    return tokens.masked_fill(pad, pad_token_id), finished_now, pad


def after_first_eos(is_eos: Tensor) -> Tensor:
    """[B, C] bool: the positions after each row's first EOS (is_eos [B, C]), which are pad, not text."""
    return (is_eos.cumsum(dim=-1) - is_eos.long()) > 0


def generate(model: DiffusionModel, input_ids: Tensor, valid: Tensor, max_new_tokens: int,
             settings: DiffusionSampling, eos_token_ids: list[int], pad_token_id: int | None,
             generator: torch.Generator | None, constraint: Constraint | None = None,
             skip_finished: bool = False) -> DiffusionResult:
    """Run `generate_steps` to the end and return its result."""
    for event in generate_steps(model, input_ids, valid, max_new_tokens, settings, eos_token_ids,
                                pad_token_id, generator, constraint, skip_finished):
        if isinstance(event, DiffusionResult):
            return event
    raise AssertionError("generate_steps ended without a result")
