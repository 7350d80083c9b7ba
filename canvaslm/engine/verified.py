"""Verified decoding: the canvas drafts a block, the causal pass checks it, and the output has exactly the
autoregressive distribution of the model's causal pass (speculative decoding with the model as its own drafter).

A block-diffusion model encodes its prompt and every committed canvas causally, and that pass is an AR model (a
converted model whose adapters act only in the canvas pass keeps its parent's causal pass exactly). One round:

    draft   one decoder pass over the canvas [a, noise x (S-1)], a = the last token chosen (not yet in the cache),
            S = `draft_size` (the model's canvas C, or 4 tokens on weights packed for the CPU's int4 kernel):
            q_i = warp(logits_i), d_i ~ q_i (greedy: argmax) for i = 1 .. S-1, drawn independently;
    check   one encoder pass of [a, d_1 .. d_{S-1}] into the cache: p_i = warp(causal logits after d_{i-1});
    accept  greedy: the longest prefix with d_i = argmax p_i, then y = argmax p at the first mismatch (or the
            bonus after the last draft); sampling: d_i is kept with probability min(1, p_i(d_i) / q_i(d_i)), the
            first rejected slot draws y from norm(max(0, p_i - q_i)), and a fully accepted block draws the bonus
            y ~ p_C (Leviathan et al. 2211.17192, Chen et al. 2302.01318);
    commit  the cache keeps a, d_1 .. d_k and forgets the rejected rest (`KVCache.rollback`; rows that accept
            different lengths keep their own positions); y is the next round's a.

warp = temperature, top-k, top-p: the AR options, applied to both p and q, as the exact rule needs. A round costs
two passes and writes 1 + k tokens. ../shared/research/verified-decoding.md has the derivation and the pitfalls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from canvaslm.diffusion.sampling import (append_written, ban, count_tokens, penalize, random_canvas,
                                        repeated_ngram_bans, sample_inverse_cdf)
from canvaslm.engine.ar import check_options, prefill, sample_next, top_k_filter, top_p_filter
from canvaslm.models.cache import KVCache


@dataclass
class VerifiedResult:
    sequences: Tensor       # [B, L + generated] prompt (left-padded), then the tokens, pad after EOS / the budget
    forward_passes: Tensor  # [B] passes that worked on each row: prefill, then 2 per round (draft + check)
    new_tokens: Tensor      # [B] generated tokens per row, EOS included
    rounds: Tensor          # [B] draft-and-check rounds per row
    accepted: Tensor        # [B] draft tokens accepted in all (the checked tokens beyond one per round)
    accepted_lengths: Tensor  # [n + 1] rounds, over all rows, that accepted 0, 1, ..., n of their n drafts


def warp(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """The probabilities [..., V] AR sampling draws from (temperature > 0): tempered, top-k, then top-p."""
    shape = logits.shape
    flat = logits.reshape(-1, shape[-1]).float() / temperature
    return top_p_filter(top_k_filter(flat, top_k), top_p).softmax(dim=-1).reshape(shape)


def accept_greedy(draft: Tensor, check_logits: Tensor) -> tuple[Tensor, Tensor]:
    """(accepted draft tokens k [B], next token y [B]) for drafts [B, n] and the causal logits [B, n + 1, V]
    after the anchor and each draft token: k = the longest prefix equal to the causal argmax, y = its argmax at k."""
    best = check_logits.argmax(dim=-1)                                                   # [B, n + 1]
    k = (draft == best[:, :-1]).long().cumprod(dim=1).sum(dim=1)
    return k, best.gather(1, k[:, None]).squeeze(1)


def accept_sampled(draft: Tensor, q: Tensor, p: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """The exact rule for drafts [B, n] drawn independently from q [B, n, V], checked against p [B, n + 1, V]:
    (accepted k [B], next token y [B]); y ~ norm(max(0, p_k - q_k)) after a rejection, y ~ p_n when all passed."""
    batch, n = draft.shape
    p_d = p[:, :n].gather(2, draft[:, :, None]).squeeze(2)
    q_d = q.gather(2, draft[:, :, None]).squeeze(2)
    u = torch.rand(batch, n, generator=generator, device=draft.device, dtype=p_d.dtype)
    kept = u * q_d < p_d                       # u < p/q, without dividing (q_d > 0: d was drawn from q)
    k = kept.long().cumprod(dim=1).sum(dim=1)                                            # [B]
    residual = p.gather(1, k[:, None, None].expand(-1, 1, p.shape[2])).squeeze(1)        # p_k, or p_n (bonus)
    rejected = k < n
    q_k = torch.zeros_like(residual)
    if bool(rejected.any()):
        q_k[rejected] = q[rejected].gather(1, k[rejected, None, None].expand(-1, 1, q.shape[2])).squeeze(1)
    residual = (residual - q_k).clamp(min=0)
    empty = residual.sum(dim=-1, keepdim=True) <= 0  # p = q exactly: any draw from p is right
    residual = torch.where(empty, p.gather(1, k[:, None, None].expand(-1, 1, p.shape[2])).squeeze(1), residual)
    y = sample_inverse_cdf((residual / residual.sum(dim=-1, keepdim=True))[:, None], generator).squeeze(1)
    return k, y


def draft_size(model: Any) -> int:
    """The canvas a round drafts in, in tokens (the anchor and its drafts): the model's whole canvas, or, when its
    linears are packed for torch's int4 CPU kernel, the most rows that kernel runs at about the cost of one
    (`quant.SMALL_PASS_ROWS`): on a 2-core EPYC a draft of 3 and its check took 21 + 22 ms against 45 + 47 for a
    whole 16-token canvas, whose extra drafts were mostly rejected (2.6 against 2.4 tokens per round), so `smol`
    ran 48.8 tok/s against 28.4 at batch 1 (AR 43.8-48.6). The draft's length never changes which tokens are
    written."""
    return min(model.canvas_length, getattr(model, "small_pass_rows", None) or model.canvas_length)


def max_draft_batch(device: torch.device | str) -> int | None:
    """The most running sequences a serving step drafts for (`runners.VerifiedRunner`, and the checked canvases of
    `runners.DiffusionRunner`); with more, each step is one causal pass writing every sequence's next token, an AR
    step (for verified decoding the same distribution; for canvases, canvases of that one token). On CPUs a
    pass's rows cost: a round of two 4-row passes per sequence loses to AR steps as soon as two sequences run
    (`smol`, 2-core Xeon with AMX, 64-token bursts at T 0.7, tok/s verified / AR: int4 weights 25.4 / 23.6 alone,
    30.0 / 51.5 at two, 45.8 / 88.6 at four; dense bf16 13.3 / 12.6 alone, 20.3 / 24.1 at two), and so does a
    checked canvas of 4, a decoder pass and a commit pass (served, bf16 + int4, tok/s canvases of 4 / of one token:
    38.4 / 28.6 alone, 39.0 / 49.9 at two, 57.7 / 73.5 at four, 85.2 / 95.6 at eight), so only a sequence alone
    drafts there. None (no limit) elsewhere: not measured."""
    return 1 if torch.device(device).type == "cpu" else None


def draft_block(anchor: Tensor, model: Any, generator: torch.Generator | None) -> Tensor:
    """The canvas a round drafts in, [B, `draft_size`]: the anchor [B] (the last token chosen, not yet in the
    cache), then the model's noise (mask tokens, or uniform random tokens)."""
    noise = random_canvas(len(anchor), draft_size(model), model.vocab_size, generator, anchor.device,
                          getattr(model, "mask_token_id", None))
    return torch.cat([anchor[:, None], noise[:, 1:]], dim=1)


def draft_logits(model: Any, blocks: Tensor, cache: KVCache) -> Tensor:
    """One decoder pass over the blocks [B, C]: the logits [B, C - 1, V] of the draft tokens after each anchor."""
    logits = model.decode(blocks, cache, None)
    # shift-trained models read canvas token i from output i - 1; the others from output i
    return logits[:, :-1] if getattr(model, "canvas_shift", False) else logits[:, 1:]


def propose(logits: Tensor, options: Mapping[str, Any], generator: torch.Generator | None
            ) -> tuple[Tensor, Tensor | None]:
    """(draft tokens [B, n], the distribution q [B, n, V] they were drawn from; None when greedy)."""
    if options["temperature"] == 0.0:
        return logits.argmax(dim=-1), None
    q = warp(logits, options["temperature"], options["top_k"], options["top_p"])
    return sample_inverse_cdf(q, generator), q


def held_through(counts: Tensor | None, tokens: Tensor) -> Tensor | None:
    """[B, m, V]: what each row's answer holds after each of tokens [B, m] (the anchor, then the drafts), given
    counts [B, V] of what its cache already holds; None when penalties are off. Position i of a check predicts the
    token after tokens[:, i], so its penalties read the counts through it (exactness: p is the AR distribution with
    penalties at every position, q any distribution the drafts were drawn from)."""
    if counts is None:
        return None
    return counts[:, None] + torch.nn.functional.one_hot(tokens, counts.shape[-1]).to(counts.dtype).cumsum(dim=1)


def penalized(logits: Tensor, held: Tensor | None, options: Mapping[str, Any]) -> Tensor:
    """`options`' presence and frequency penalties on logits [B, m, V] for what the answer holds (held [B, m or 1,
    V], `held_through`)."""
    return penalize(logits, held, options["presence_penalty"], options["frequency_penalty"])


def without_repeats(logits: Tensor, written: Tensor | None, tokens: Tensor, options: Mapping[str, Any]) -> Tensor:
    """A check's logits [B, m, V] (position i predicts the token after tokens[:, i], tokens [B, m]: the anchor, then
    the drafts) with -inf for every token that would repeat an n-gram of the answer, written [B, L] (-1 where a row
    has none) then the tokens through i (`no_repeat_ngram_size`): the AR distribution at every position."""
    n = options.get("no_repeat_ngram_size", 0)
    if not n or written is None:
        return logits
    text = torch.nn.functional.pad(torch.cat([written, tokens], dim=1), (0, 1), value=-1)
    return ban(logits, repeated_ngram_bans(text, n, written.shape[1] + 1))


def check_logits(model: Any, anchor: Tensor, draft: Tensor, cache: KVCache) -> Tensor:
    """The commit pass, which checks: [anchor, draft] encoded causally into the cache (roll back what is not
    kept); the next-token logits [B, n + 1, V] after each of them."""
    checked = torch.cat([anchor[:, None], draft], dim=1)
    return model.logits(model.encode(checked, cache, torch.ones_like(checked, dtype=torch.bool)))


def accept(draft: Tensor, q: Tensor | None, logits: Tensor, options: Mapping[str, Any],
           generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(accepted draft tokens k [B], the next token y [B]): greedy when q is None, else the exact rule."""
    if q is None:
        return accept_greedy(draft, logits)
    p = warp(logits, options["temperature"], options["top_k"], options["top_p"])
    return accept_sampled(draft, q, p, generator)


def settled_tokens(draft: Tensor, k: Tensor, next_anchor: Tensor) -> Tensor:
    """[B, n + 1]: row b's first k[b] + 1 entries are what its round settled, the accepted drafts then the next
    anchor (final once drawn: it is written before the round that drafts after it)."""
    settled = torch.cat([draft, torch.zeros_like(draft[:, :1])], dim=1)
    return settled.scatter(1, k[:, None], next_anchor[:, None])


@torch.inference_mode()
def verified_generate(model: Any, input_ids: Tensor, valid: Tensor, max_new_tokens: int, *,
                      temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                      presence_penalty: float = 0.0, frequency_penalty: float = 0.0, no_repeat_ngram_size: int = 0,
                      eos_token_ids: list[int], pad_token_id: int | None = None,
                      generator: torch.Generator | None = None) -> VerifiedResult:
    """Generate after left-padded prompts input_ids [B, L] (valid [B, L]) with a block-diffusion `model`,
    drafting with its canvas pass and checking with its causal pass: the tokens have the distribution of
    `ar_generate` on the same model and options, penalties and `no_repeat_ngram_size` included (greedy: the same
    tokens, up to float rounding near ties)."""
    check_options(max_new_tokens, temperature, top_p, top_k, presence_penalty, frequency_penalty, no_repeat_ngram_size)
    options = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "presence_penalty": presence_penalty,
               "frequency_penalty": frequency_penalty, "no_repeat_ngram_size": no_repeat_ngram_size}
    device, batch = input_ids.device, input_ids.shape[0]
    eos = set(eos_token_ids)
    pad = pad_token_id if pad_token_id is not None else eos_token_ids[0] if eos_token_ids else 0
    out = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
    written = torch.zeros(batch, dtype=torch.long, device=device)   # tokens of each row in `out`
    passes = torch.zeros(batch, dtype=torch.long, device=device)
    rounds = torch.zeros(batch, dtype=torch.long, device=device)
    accepted = torch.zeros(batch, dtype=torch.long, device=device)
    lengths = torch.zeros(draft_size(model), dtype=torch.long, device=device)
    if max_new_tokens == 0:
        return VerifiedResult(input_ids, passes, written, rounds, accepted, lengths)
    cache: KVCache = model.new_cache(batch, device)
    cache.slack = draft_size(model)  # sliding layers keep what a rollback of one check pass needs
    anchor = sample_next(prefill(model, input_ids, cache, valid), temperature, top_k, top_p, generator)
    passes += 1
    # the generated tokens each row's cache holds (the anchor is not in it yet), for the penalties; None: off
    counts = torch.zeros(batch, model.vocab_size, device=device) if presence_penalty or frequency_penalty else None
    written_ids = input_ids.new_zeros(batch, 0) if no_repeat_ngram_size else None  # the same tokens, for the rule
    rows = torch.arange(batch, device=device)   # the rows still generating, in cache order
    # the anchor is final once drawn: written (and maybe the end of its row) before the round that drafts after it
    done = _write(out, written, rows, anchor[:, None], torch.ones_like(anchor), eos, max_new_tokens)
    rows, anchor, counts, written_ids = _drop(done, rows, anchor, cache, counts, written_ids)
    while len(rows):
        drafted = draft_logits(model, draft_block(anchor, model, generator), cache)
        draft, q = propose(penalized(drafted, held_through(counts, anchor[:, None]), options), options, generator)
        checked = torch.cat([anchor[:, None], draft], dim=1)
        p = penalized(check_logits(model, anchor, draft, cache), held_through(counts, checked), options)
        k, next_anchor = accept(draft, q, without_repeats(p, written_ids, checked, options), options, generator)
        cache.rollback(1 + draft.shape[1], 1 + k)
        count_tokens(counts, checked, torch.arange(checked.shape[1], device=device)[None] <= k[:, None])
        written_ids = append_written(written_ids, checked, 1 + k)
        passes[rows] += 2
        rounds[rows] += 1
        accepted[rows] += k
        lengths += torch.bincount(k, minlength=len(lengths))
        done = _write(out, written, rows, settled_tokens(draft, k, next_anchor), k + 1, eos, max_new_tokens)
        rows, anchor, counts, written_ids = _drop(done, rows, next_anchor, cache, counts, written_ids)
    return VerifiedResult(torch.cat([input_ids, out], dim=1), passes, written, rounds, accepted, lengths)


def _drop(done: Tensor, rows: Tensor, anchor: Tensor, cache: KVCache, counts: Tensor | None,
          written: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The rows (their anchors, token counts and tokens in the cache) that go on; the finished ones leave the
    cache."""
    if not bool(done.any()):
        return rows, anchor, counts, written
    keep = (~done).nonzero().squeeze(1)
    cache.select(keep)
    return rows[keep], anchor[keep], None if counts is None else counts[keep], None if written is None else \
        written[keep]


def _write(out: Tensor, written: Tensor, rows: Tensor, tokens: Tensor, counts: Tensor, eos: set[int],
           budget: int) -> Tensor:
    """Append the first counts[i] of tokens[i] [n, m] to row rows[i] of `out`, up to its first EOS and the budget;
    returns which of `rows` are finished."""
    done = torch.zeros(len(rows), dtype=torch.bool, device=out.device)
    for i, (row, count) in enumerate(zip(rows.tolist(), counts.tolist(), strict=True)):
        for token in tokens[i, :count].tolist():
            out[row, int(written[row])] = token
            written[row] += 1
            if token in eos or int(written[row]) == budget:
                done[i] = True
                break
    return done
