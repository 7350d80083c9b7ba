"""Sampling settings and the pure tensor functions one denoising step is made of.

`DiffusionSampling` is built from the diffusion knobs of `canvaslm.knobs` (names and defaults are those of
transformers' `DiffusionGemmaGenerationConfig`); the functions reproduce its
`LinearTemperatureScheduleLogitsProcessor`, `EntropyBoundSampler` and `StableAndConfidentStoppingCriteria`
numerically, as small functions instead of stateful classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from canvaslm.errors import GenerationError
from canvaslm.knobs import knobs

class _Settings:
    """What DiffusionSampling adds to its fields: the knobs' checks and `replace`."""

    def __post_init__(self) -> None:
        for knob in knobs("diffusion"):
            knob.check(getattr(self, knob.name))
        if self.t_max <= self.t_min:  # type: ignore[attr-defined]
            raise GenerationError(f"t_max must be > t_min, got t_max={self.t_max!r} <= "  # type: ignore[attr-defined]
                                  f"t_min={self.t_min!r}")  # type: ignore[attr-defined]
        if self.adjacent_repeats == "drop" and not self.commit_check:  # type: ignore[attr-defined]
            raise GenerationError("adjacent_repeats = 'drop' is done by the commit check: set commit_check > 0, "
                                  "or adjacent_repeats to 'keep' or 'wait'")

    def replace(self, **overrides: Any) -> DiffusionSampling:
        """A copy with `overrides` applied; None values leave a field as it is, unknown names are an error."""
        names = {f.name for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise GenerationError(f"unknown diffusion sampling option(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})  # type: ignore


# the diffusion knobs of canvaslm.knobs as a frozen dataclass: field = knob, default = the knob's default
DiffusionSampling = dataclasses.make_dataclass(
    "DiffusionSampling", [(k.name, k.kind, dataclasses.field(default=k.default)) for k in knobs("diffusion")],
    bases=(_Settings,), frozen=True, namespace={"__module__": __name__})
DiffusionSampling.__doc__ = "How a canvas is denoised:\n\n" + "\n".join(
    f"* {k.name} ({k.kind.__name__}, default {k.default!r}): {k.help}" for k in knobs("diffusion"))


def penalize(logits: Tensor, counts: Tensor | None, presence: float, frequency: float) -> Tensor:
    """OpenAI's penalties: logits [..., V] less `presence` for every token the answer already holds and
    `frequency` times how often it holds it, counts [..., V] (broadcast against the logits). Applied before the
    temperature, as vLLM does. The logits themselves when both are 0 or there are no counts."""
    if counts is None or (not torch.is_tensor(presence) and not torch.is_tensor(frequency)
                          and presence == 0 and frequency == 0):  # tensors: one of each per row
        return logits
    if not torch.is_tensor(frequency) and frequency == 0:  # the same values as below, in fewer passes over [.., V]
        return torch.where(counts > 0, logits - torch.as_tensor(presence, dtype=torch.float32).to(logits.dtype),
                           logits)
    return logits - (presence * (counts > 0) + frequency * counts).to(logits.dtype)


def penalize_rows(logits: Tensor, held: list[Mapping[int, float] | None], presence: list[float],
                  frequency: list[float]) -> Tensor:
    """`penalize` for rows [n, ..., V] of their own penalties, each row's answer given as {token: times it holds
    it} (`held_of` its counts; None: no penalties): a copy of the logits with only those tokens' positions worked
    out (one gather, one scatter), not passes over all of [n, ..., V] and the counts. Elsewhere `penalize` subtracts
    an exact zero, so every row gets what `penalize` gives it alone, bit for bit (the serving engine's rows sampled
    together)."""
    on = [h is not None and bool(h) and bool(p or f) for h, p, f in zip(held, presence, frequency, strict=True)]
    if not any(on):
        return logits
    rows = [j for j, row in enumerate(on) if row for _ in held[j]]
    tokens = torch.tensor([t for j, row in enumerate(on) if row for t in held[j]], device=logits.device)
    index = torch.tensor(rows, device=logits.device)
    amount = torch.tensor(presence, dtype=torch.float32, device=logits.device)[index]
    if any(frequency):  # as `penalize`: presence * 1 + frequency * times, in float32, then the logits' dtype
        times = torch.tensor([c for j, row in enumerate(on) if row for c in held[j].values()], dtype=torch.float32,
                             device=logits.device)
        amount = amount + torch.tensor(frequency, dtype=torch.float32, device=logits.device)[index] * times
    out = logits.clone(memory_format=torch.contiguous_format)
    flat = out.view(out.shape[0], -1, out.shape[-1])                                             # [n, M, V]
    flat[index, :, tokens] = flat[index, :, tokens] - amount.to(out.dtype)[:, None]
    return out


def held_of(counts: Tensor | None) -> dict[int, float] | None:
    """A row's counts [1, V] as {token: times} over the tokens it holds (what `penalize_rows` reads)."""
    if counts is None:
        return None
    tokens = counts[0].nonzero().squeeze(1)
    return dict(zip(tokens.tolist(), counts[0, tokens].tolist(), strict=True))


def stack_rows(rows: list[Tensor]) -> Tensor:
    """Rows [1, ...] as one [n, ...] tensor: a view where they lie one after another in one tensor (the serving
    engine's next-token logits, rows of one head call: no copy of [n, V] read from memory that the pass left
    cold), else `torch.cat`."""
    first, size = rows[0], rows[0].numel()
    storage = first.untyped_storage().data_ptr()
    if all(row.is_contiguous() and row.shape == first.shape and row.dtype == first.dtype
           and row.untyped_storage().data_ptr() == storage and row.storage_offset() == first.storage_offset() + j * size
           for j, row in enumerate(rows)):
        return first.as_strided((len(rows), *first.shape[1:]), (size, *first.stride()[1:]))
    return torch.cat(rows)


def count_tokens(counts: Tensor | None, tokens: Tensor, weight: Tensor | None = None) -> Tensor | None:
    """counts [B, V] plus each row's tokens [B, n] (weighted [B, n]: 0 leaves one out), in place; None stays None
    (penalties off)."""
    if counts is not None:
        counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=counts.dtype) if weight is None
                            else weight.to(counts.dtype))
    return counts


def penalties_on(options: Any) -> bool:
    """Whether a decoding's settings (a DiffusionSampling or the AR options dict) penalize anything."""
    get = options.get if isinstance(options, dict) else lambda name, default: getattr(options, name, default)
    return bool(get("presence_penalty", 0.0) or get("frequency_penalty", 0.0))


def _ngrams(text: Tensor, n: int, start: int) -> tuple[Tensor, Tensor, Tensor]:
    """The n-grams of text [B, T] (token ids, -1 where unknown) that end at positions `start`.., and the ones each
    may repeat: (ends [B, Q, n] with Q = T - start, windows [B, W, n] with W = T - n + 1, before [Q, W] bool: window
    w ends before position start + q). An n-gram that would start before the text holds unknowns."""
    padded = torch.nn.functional.pad(text, (n - 1, 0), value=-1)                     # [B, T + n - 1]
    windows = text.unfold(1, n, 1) if text.shape[1] >= n else text.new_empty(text.shape[0], 0, n)
    before = torch.arange(windows.shape[1], device=text.device)[None] + n - 1 < \
        torch.arange(start, text.shape[1], device=text.device)[:, None]
    return padded[:, start:].unfold(1, n, 1), windows, before


def repeated_ngram_bans(text: Tensor, n: int, start: int) -> Tensor:
    """`no_repeat_ngram_size`: (row, position - start, token) [k, 3] for every token that, at a position of text
    [B, T] from `start` on (-1: unknown), would complete an n-gram the row holds ending before it. A position whose
    n - 1 tokens before it are not all known gets none (a canvas's undecided neighbours: `repeated_ngrams` checks
    what they become)."""
    ends, windows, before = _ngrams(text, n, start)
    context = (ends[..., :-1] >= 0).all(dim=-1)                                       # [B, Q]
    full = (windows >= 0).all(dim=-1)                                                 # [B, W]
    same = (ends[:, :, None, :-1] == windows[:, None, :, :-1]).all(dim=-1)            # [B, Q, W]
    b, q, w = (same & full[:, None] & before[None] & context[..., None]).nonzero(as_tuple=True)
    return torch.stack([b, q, windows[b, w, -1]], dim=1).unique(dim=0)


def repeated_ngrams(text: Tensor, n: int, start: int) -> Tensor:
    """[B, T - start] bool: positions of text [B, T] (-1: unknown) from `start` on that end an n-gram, all of it
    known, which the row already holds ending before it (`no_repeat_ngram_size`)."""
    ends, windows, before = _ngrams(text, n, start)
    same = (ends[:, :, None] == windows[:, None]).all(dim=-1)                         # [B, Q, W]
    return (same & before[None]).any(dim=-1) & (ends >= 0).all(dim=-1)


def without_next_repeats(logits: Tensor, written: Tensor | None, n: int) -> Tensor:
    """logits [B, V] of the token after each row's answer written [B, L] (-1 where a row has none), with -inf for
    every token that would repeat an n-gram of it (`no_repeat_ngram_size` = n; 0 or no answer: the logits)."""
    if not n or written is None:
        return logits
    text = torch.nn.functional.pad(written, (0, 1), value=-1)
    return ban(logits[:, None], repeated_ngram_bans(text, n, written.shape[1]))[:, 0]


def append_written(written: Tensor | None, tokens: Tensor, lengths: Tensor | None = None) -> Tensor | None:
    """Each row's answer written [B, L] (-1 where a row has none, on the left) followed by the first lengths[b] of
    tokens [B, m] (None: all; a -1 among them is no token), the -1s moved to the left again so every row's latest
    token stays last. None stays None (`no_repeat_ngram_size` off)."""
    if written is None:
        return None
    known = tokens >= 0
    if lengths is not None:
        known &= torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None]
    both = torch.cat([written, tokens.masked_fill(~known, -1)], dim=1)
    order = (both >= 0).long().argsort(dim=1, stable=True)  # the -1s first, the tokens in their order
    return both.gather(1, order)


def ban(logits: Tensor, bans: Tensor) -> Tensor:
    """logits [B, Q, V] with -inf at each (row, position, token) of `bans` [k, 3] (`repeated_ngram_bans`)."""
    if bans.shape[0] == 0:
        return logits
    logits = logits.clone()
    logits[bans[:, 0], bans[:, 1], bans[:, 2]] = float("-inf")
    return logits


def temperature_at(step: int, settings: DiffusionSampling) -> Tensor:
    """Temperature when `step` steps remain (N..1): t_min + (t_max - t_min) * step / N, in float32 like the
    reference (which turns the step into an int32 tensor)."""
    fraction = torch.tensor(step, dtype=torch.int32) / settings.max_denoising_steps
    return settings.t_min + (settings.t_max - settings.t_min) * fraction


def entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of softmax(logits) over the last dim: [B, C, V] -> [B, C]."""
    log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
    log_probs_clamped = log_probs.clamp(min=torch.finfo(log_probs.dtype).min)
    return -(log_probs_clamped * log_probs.softmax(dim=-1)).sum(dim=-1)


def entropy_bound_accept(token_entropy: Tensor, bound: float) -> Tensor:
    """Accept the lowest-entropy tokens while sum(entropy) - max(entropy) <= bound (arXiv 2505.24857).

    The most certain token is always accepted. [B, C] float -> [B, C] bool."""
    sorted_entropy, order = torch.sort(token_entropy, dim=-1)
    selected = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= bound
    return torch.zeros_like(selected).scatter(-1, order, selected)


def open_sub_block(free: Tensor, size: int) -> Tensor:
    """[B, C] bool: each row's first sub-block of `size` positions that still holds an undecided (`free`) one; a
    row with none left gets its last sub-block."""
    blocks = torch.arange(free.shape[-1], device=free.device) // size                            # [C]
    current = torch.where(free, blocks, blocks[-1]).amin(dim=-1, keepdim=True)                 # [B, 1]
    return blocks == current


def threshold_accept(top: Tensor, threshold: float, free: Tensor | None = None,
                     force: Tensor | None = None) -> Tensor:
    """Accept tokens whose top probability is >= threshold, and always the most confident one (Fast-dLLM).

    top [B, C] (each position's top probability) -> [B, C] bool. `free` [B, C] bool marks the positions still
    undecided (a masked model's mask tokens): the most confident one is taken among them, since a kept token or a
    pin is certain and would otherwise always be "the most confident", leaving a step that keeps nothing new (and,
    with a greedy sampler, every later step too). `force` [B] bool: the rows that take that most confident one
    (None: all); another row keeps only what reaches the threshold, so a pass may keep nothing (a "think pass",
    `think_passes`)."""
    ranked = top if free is None else top.masked_fill(~free, -1.0)
    best = torch.zeros_like(top, dtype=torch.bool).scatter(-1, ranked.argmax(dim=-1, keepdim=True), True)
    if force is not None:
        best &= force[:, None]
    return (top >= threshold) | best


def top_k_accept(token_entropy: Tensor, k: int) -> Tensor:
    """Accept the k lowest-entropy tokens of each row. [B, C] -> [B, C] bool. The loop passes k = accept_k × step:
    every step re-proposes the whole canvas, so a fixed k would cap the canvas at k settled tokens."""
    k = min(k, token_entropy.shape[-1])
    order = token_entropy.topk(k, dim=-1, largest=False).indices
    return torch.zeros_like(token_entropy, dtype=torch.bool).scatter(-1, order, True)


def factor_accept(top: Tensor, factor: float, free: Tensor | None = None) -> Tensor:
    """Fast-dLLM v2's factor rule: with top probabilities sorted c_1 >= c_2 >= ..., accept the longest prefix with
    c_n >= 1 - factor / (n + 1) (the (n + 1) * eps <= 1 bound of its parallel-decoding theorem, with slack).

    top [B, C] (each position's top probability) -> [B, C] bool; the most confident token is always accepted. With
    `free` (as in `threshold_accept`) only the undecided positions are ranked: decided ones would fill the prefix."""
    top, order = (top if free is None else top.masked_fill(~free, -1.0)).sort(dim=-1, descending=True)
    n = torch.arange(1, top.shape[-1] + 1, device=top.device, dtype=top.dtype)
    ok = (top >= 1 - factor / (n + 1)).cumprod(dim=-1).bool()
    ok[..., 0] = True
    return torch.zeros_like(ok).scatter(-1, order, ok)


def drawn_twice(open_: Tensor, tokens: Tensor) -> Tensor:
    """[B, C] bool: open positions whose token equals the one drawn in the same pass for the open position just
    before them (`adjacent_repeats = "wait"`). Neither saw the other, so the pair is two independent draws of a
    word, not a word written twice on purpose."""
    twice = torch.zeros_like(open_)
    twice[:, 1:] = open_[:, 1:] & open_[:, :-1] & (tokens[:, 1:] == tokens[:, :-1])
    return twice


def left_to_right_accept(logits: Tensor, token_entropy: Tensor, settings: DiffusionSampling, free: Tensor,
                         force: Tensor | None = None, top: Tensor | None = None,
                         proposal: Tensor | None = None) -> Tensor:
    """`settings.acceptance` applied along the canvas rather than by certainty (`order = "left_to_right"`): the
    kept tokens are a prefix of the undecided (`free`) positions, the first of them always (in the rows of `force`;
    None: all), then each next one while the rule still holds over the run so far:

    * entropy_bound: sum(entropy) - max(entropy) of the run <= entropy_bound;
    * threshold: each token's top probability >= accept_probability;
    * top_k: accept_k new tokens per step;
    * adaptive: the entropy bound, or the n-th token of the run has c_n >= 1 - accept_factor / (n + 1).

    A masked model picked "the most certain anywhere" places a confident token (a full stop, a list mark) ahead of
    text it cannot see yet, and the text between must then fit it; this order never does. Decided positions (kept
    tokens, pins) are always kept. [B, C, V], [B, C] -> [B, C] bool. `top` [B, C]: each position's top
    probability when the caller has it (then `logits` is not read). `proposal` [B, C]: the tokens drawn, which
    `settings.adjacent_repeats = "wait"` reads: the run also ends at a token drawn for the undecided position
    before it too, which a later pass, seeing that neighbour, draws again."""
    rank = free.long().cumsum(dim=-1)                        # n: the position's place among the undecided, 1-based
    first = free & (rank == 1)
    if force is not None:
        first &= force[:, None]
    rule = settings.acceptance
    if rule == "top_k":
        ok = rank <= settings.accept_k
    elif rule == "threshold":
        ok = top_probability(logits, top) >= settings.accept_probability
    else:
        run = token_entropy.masked_fill(~free, 0.0)
        ok = run.cumsum(dim=-1) - run.cummax(dim=-1).values <= settings.entropy_bound
        if rule == "adaptive":
            ok |= top_probability(logits, top) >= 1 - settings.accept_factor / (rank + 1)
    if settings.adjacent_repeats == "wait":
        if proposal is None:
            raise ValueError("adjacent_repeats = 'wait' needs the proposal")
        ok = ok & ~drawn_twice(free, proposal)  # never the first free position: the one before it is decided
    run = (ok | ~free | first).long().cumprod(dim=-1).bool()  # decided positions never break the run
    return run | ~free


def top_probability(logits: Tensor | None, top: Tensor | None = None) -> Tensor:
    """Each position's top probability [B, C]: `top` when the caller has it, else from the logits [B, C, V]."""
    return top if top is not None else logits.softmax(dim=-1).amax(dim=-1)


def accept(logits: Tensor | None, token_entropy: Tensor, settings: DiffusionSampling, step: int = 1,
           free: Tensor | None = None, force: Tensor | None = None, top: Tensor | None = None,
           proposal: Tensor | None = None) -> Tensor:
    """The tokens denoising step `step` (1-based) keeps under `settings.acceptance`: [B, C, V] tempered logits
    -> [B, C] bool. `free` [B, C] bool: the positions still undecided (a masked model's mask tokens; None: all).
    `force` [B] bool (threshold rule): the rows that keep their most confident free token even below the
    threshold (None: all). With `free` and `settings.order = "left_to_right"` the rule runs along the canvas
    (`left_to_right_accept`). `top` [B, C]: each position's top probability when the caller has it (a step that
    worked out only the undecided positions passes no logits). `proposal` [B, C]: the tokens drawn
    (`left_to_right_accept`)."""
    if free is not None and settings.order == "left_to_right":
        return left_to_right_accept(logits, token_entropy, settings, free, force, top, proposal)
    rule = settings.acceptance
    if rule == "entropy_bound":
        return entropy_bound_accept(token_entropy, settings.entropy_bound)
    if rule == "top_k":
        return top_k_accept(token_entropy, settings.accept_k * step)
    top = top_probability(logits, top)
    if rule == "threshold":
        return threshold_accept(top, settings.accept_probability, free, force)
    bounded = entropy_bound_accept(token_entropy, settings.entropy_bound)
    return bounded | factor_accept(top, settings.accept_factor, free)


def random_canvas(batch_size: int, canvas_length: int, vocab_size: int, generator: torch.Generator | None,
                  device: torch.device | str = "cpu", mask_token_id: int | None = None) -> Tensor:
    """A canvas [B, C] drawn from the diffusion prior: uniformly random ids, or all `mask_token_id` for an
    absorbing-state (masked) model."""
    if mask_token_id is not None:
        return torch.full((batch_size, canvas_length), mask_token_id, device=device)
    return torch.randint(0, vocab_size, (batch_size, canvas_length), generator=generator, device=device)


def renoise(canvas: Tensor, accepted: Tensor, vocab_size: int, generator: torch.Generator | None,
            mask_token_id: int | None = None) -> Tensor:
    """Replace every non-accepted position with fresh noise (a uniformly random token, or the mask token)."""
    noise = random_canvas(*canvas.shape, vocab_size, generator, canvas.device, mask_token_id)
    return torch.where(accepted, canvas, noise)


def revise(canvas: Tensor, previous: Tensor, logits: Tensor, pins: Tensor | None, mask_token_id: int,
           probability: float) -> tuple[Tensor, Tensor]:
    """Revision for masked models trained to correct their canvas (wrong tokens in training inputs): a token kept
    in an earlier step (not a pin) changes to the model's most likely token at that position when that one differs
    and has at least `probability`. `logits` [B, C, V] are this step's tempered, allowed-masked logits as the model
    gave them (before carry-over). Returns (canvas [B, C], revised [B, C] bool)."""
    top, best = logits.softmax(dim=-1).max(dim=-1)
    kept = previous != mask_token_id
    if pins is not None:
        kept &= pins < 0
    revised = kept & (best != previous) & (top >= probability)
    return torch.where(revised, best, canvas), revised


def pin(logits: Tensor, fixed: Tensor) -> Tensor:
    """Positions with a fixed token (fixed >= 0: a given, a suffix, a format's punctuation) predict it with
    certainty, so it is sampled, has entropy 0 and is accepted; -1 marks free positions. [B, C, V], [B, C]."""
    keep, index = (fixed >= 0)[..., None], fixed.clamp(min=0)[..., None]
    # one pass over [B, C, V] (the sampler runs this every step): -1e4 across the fixed positions, then 0 at each
    # one's token; a free position gets its own logit back at the index scattered into
    value = torch.where(keep, 0.0, logits.gather(-1, index))
    return logits.masked_fill(keep, -1e4).scatter_(-1, index, value)


def kept_tokens(canvas: Tensor, mask_token_id: int) -> Tensor:
    """A masked canvas's kept tokens [B, C] (pins included), -1 where it is still masked: what `pin` and
    `propose` take."""
    return canvas.masked_fill(canvas == mask_token_id, -1)


def carry_over(logits: Tensor, canvas: Tensor, mask_token_id: int) -> Tensor:
    """Absorbing-state (masked) models: a position whose token is not the mask keeps it with certainty (MDLM's
    SUBS parameterisation), since such models are only trained to predict masked positions. [B, C, V]."""
    return pin(logits, kept_tokens(canvas, mask_token_id))


def sample_tokens(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One multinomial draw per position: [B, C, V] probabilities -> [B, C] ids."""
    batch, length, vocab = probs.shape
    return torch.multinomial(probs.view(-1, vocab), 1, generator=generator).view(batch, length)


def sample_inverse_cdf(probs: Tensor, generator: torch.Generator | None, rows: Tensor | None = None,
                       uniforms: Tensor | None = None) -> Tensor:
    """One draw per position from [B, C, V] probabilities with a single uniform each (inverse CDF): the same
    distribution as `sample_tokens`, a different random stream, far cheaper than V exponential draws. With `rows`
    [B, C] bool, probs [n, V] holds only those positions: the uniforms are drawn for all of [B, C] (the random
    stream is the same as without `rows`) and those of `rows` are used. `uniforms` [B, C, 1]: drawn already (rows
    of their own generators), in place of the generator's."""
    cdf = probs.cumsum(dim=-1)
    shape = probs.shape[:-1] if rows is None else rows.shape
    u = torch.rand(*shape, 1, generator=generator, device=probs.device, dtype=cdf.dtype) if uniforms is None \
        else uniforms.to(cdf.dtype)
    u = (u if rows is None else u[rows]) * cdf[..., -1:]
    # right=True: the first index whose cdf exceeds u, so a draw of exactly 0 never lands on a zero-probability token
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def exp_probabilities(log_probs: Tensor) -> tuple[Tensor, Tensor]:
    """(exp(log_probs) with the probabilities below float32's normal range (< 1.2e-38) as 0, log_probs clamped at
    -87). torch's vectorized exp takes a slow path (~20x on this CPU) for arguments below -87, which every pinned or
    carried-over position of a canvas is full of (its -1e4 logits); the clamp keeps it on the fast one, and nothing
    above -87 changes. The clamped log-probabilities are finite, so p * log p needs no other clamp (0 below -87)."""
    floor = log_probs.clamp(min=-87.0)
    return floor.exp().masked_fill_(log_probs <= -87.0, 0.0), floor


def propose(logits: Tensor, settings: DiffusionSampling, generator: torch.Generator | None,
            fixed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(sampled tokens [B, C], token entropy [B, C]) of one step's tempered logits, by `settings.sampler`.

    `fixed` [B, C] (the fast and greedy samplers): the token of each position that `pin` made certain, -1 at the
    others. Only the others are worked out, over [n, V] instead of [B, C, V] (about half of a canvas, on average,
    is kept tokens); a fixed position proposes its token with entropy -0.0, which is what the whole computation
    gives for it, and the random stream is the same. Logits [n, V] are those open positions' already (row-major:
    a step that worked out only them)."""
    if settings.sampler == "reference":
        return sample_tokens(logits.softmax(dim=-1), generator), entropy(logits)
    rows = None if fixed is None else fixed < 0
    open_logits = logits if rows is None or logits.dim() == 2 else logits[rows]
    log_probs = open_logits.log_softmax(dim=-1)
    probs, floor = exp_probabilities(log_probs)
    token_entropy = -(probs * floor).sum(dim=-1)
    tokens = open_logits.argmax(dim=-1) if settings.sampler == "greedy" else \
        sample_inverse_cdf(probs, generator, rows)
    if rows is None:
        return tokens, token_entropy
    return (fixed.masked_scatter(rows, tokens),
            torch.full_like(fixed, -0.0, dtype=token_entropy.dtype).masked_scatter(rows, token_entropy))


def stable_and_confident(history: Tensor, argmax: Tensor, token_entropy: Tensor,
                         confidence_threshold: float) -> tuple[Tensor, Tensor]:
    """The stop test: argmax unchanged over the whole history [S, B, C] and mean entropy below the threshold.

    Returns (stop [B] bool, updated history). With S = 0 stability always holds."""
    confident = token_entropy.mean(dim=-1) < confidence_threshold
    if history.shape[0] == 0:
        return confident, history
    stable = (history == argmax[None]).all(dim=-1).all(dim=0)
    history = torch.cat([history[1:], argmax[None]], dim=0)
    return stable & confident, history
