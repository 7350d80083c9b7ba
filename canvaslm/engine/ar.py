"""Autoregressive decoding: prefill the KV cache with the prompt, then one forward pass per new token.

This is the baseline every diffusion speed claim is measured against, so it is the plain, honest loop of
gpt-fast's `generate.py`: no speculation, no tricks beyond the KV cache.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from canvaslm.diffusion.sampling import (append_written, count_tokens, held_of, penalize, penalize_rows,
                                        sample_inverse_cdf, without_next_repeats)
from canvaslm.errors import GenerationError
from canvaslm.knobs import BY_NAME
from canvaslm.models.cache import KVCache, encode_chunked


class ARModel(Protocol):
    eos_token_ids: list[int]

    def new_cache(self, batch_size: int, device: torch.device | None = None) -> KVCache: ...
    def encode(self, input_ids: Tensor, cache: KVCache, valid: Tensor) -> Tensor: ...
    def logits(self, hidden: Tensor) -> Tensor: ...


@dataclass
class ARResult:
    sequences: Tensor   # [B, L + steps] prompt (left-padded) then generated tokens, pad after EOS
    forward_passes: int  # prefill + one pass per generated token after the first
    new_tokens: Tensor  # [B] generated tokens per row, EOS included, pad excluded


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row [B, V]; the rest become -inf. k = 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus); p = 1 keeps all."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # the top token has 0 before it, so it is always kept
    drop = (mass_before >= p).scatter(-1, order, mass_before >= p)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None, allowed: Tensor | None = None, counts: Tensor | None = None,
                presence_penalty: float = 0.0, frequency_penalty: float = 0.0, written: Tensor | None = None,
                no_repeat_ngram_size: int = 0) -> Tensor:
    """Next token [B] from logits [B, V]: argmax when temperature is 0, else filtered sampling; only tokens in
    `allowed` [B, V] bool when given (a grammar's or a puzzle's restriction); the penalties for the tokens the
    answer holds, `counts` [B, V] (`penalize`); no token that would repeat an n-gram of the answer itself,
    `written` [B, L] (-1 where a row has none; `no_repeat_ngram_size`).

    The draw is by inverse CDF (one uniform per row and a binary search): the same distribution as
    torch.multinomial, which spends V exponential draws per row (~65 ms per step at batch 64 on a 2-core CPU)."""
    logits = without_next_repeats(penalize(logits, counts, presence_penalty, frequency_penalty), written,
                                  no_repeat_ngram_size)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    return sample_inverse_cdf(logits.softmax(dim=-1), generator)


def sample_next_each(logits: Tensor, options: Sequence[Mapping[str, Any]], generators: list[torch.Generator | None],
                     allowed: list[Tensor | None], counts: list[Tensor | None], written: list[Tensor | None],
                     held: list[dict[int, float] | None] | None = None) -> Tensor:
    """`sample_next` for rows [n, V] that each have their own options and random generator (the serving engine's
    running sequences), [n]. The rows that sample (temperature above 0) with no allowed-token mask and no n-gram
    bans, alike in top_k and top_p, are drawn in one batch: penalties and temperatures per row, one uniform from
    each row's own generator. Each row gets the token `sample_next` draws for it alone; the other rows are drawn
    alone. `held`: each row's counts as {token: times} (`held_of`), kept by the caller so that no pass reads the
    counts."""
    tokens = torch.empty(len(options), dtype=torch.long, device=logits.device)
    groups: dict[tuple[int, float], list[int]] = {}
    for i, o in enumerate(options):
        if o["temperature"] == 0.0 or allowed[i] is not None or (o["no_repeat_ngram_size"] and written[i] is not None):
            tokens[i:i + 1] = sample_next(logits[i:i + 1], o["temperature"], o["top_k"], o["top_p"], generators[i],
                                          allowed[i], counts[i], o["presence_penalty"], o["frequency_penalty"],
                                          written[i], o["no_repeat_ngram_size"])
        else:
            groups.setdefault((o["top_k"], o["top_p"]), []).append(i)
    for (top_k, top_p), rows in groups.items():
        part = logits if len(rows) == len(options) else logits[rows]  # all rows: no copy
        part = penalize_rows(part, [held[i] if held is not None else held_of(counts[i]) for i in rows],
                             [options[i]["presence_penalty"] for i in rows],
                             [options[i]["frequency_penalty"] for i in rows])
        temperatures = torch.tensor([options[i]["temperature"] for i in rows], device=logits.device)[:, None]
        part = top_p_filter(top_k_filter(part.float() / temperatures, top_k), top_p)
        uniforms = torch.cat([torch.rand(1, 1, generator=generators[i], device=logits.device) for i in rows])
        tokens[rows] = sample_inverse_cdf(part.softmax(dim=-1), None, uniforms=uniforms)
    return tokens


def prefill(model: ARModel, input_ids: Tensor, cache: KVCache, valid: Tensor) -> Tensor:
    """Encode prompts [B, L] into `cache` (in chunks); the next-token logits [B, V]."""
    return model.logits(encode_chunked(model, input_ids, cache, valid)[:, -1])


def advance(model: ARModel, cache: KVCache, tokens: Tensor, valid: Tensor | None = None) -> Tensor:
    """Write tokens [B, n] (valid [B, n]: False for a finished row's pad) into `cache` in one forward pass; the
    next-token logits [B, V]. The one AR step of every loop: `ar_generate`, guided decoding, the serving engine,
    the Sudoku baseline."""
    valid = torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid
    return model.logits(model.encode(tokens, cache, valid)[:, -1])


def check_options(max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                  presence_penalty: float = 0.0, frequency_penalty: float = 0.0, no_repeat_ngram_size: int = 0
                  ) -> None:
    """A GenerationError for a budget or an AR option out of range (the knob list's bounds)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    for name, value in {"temperature": temperature, "top_p": top_p, "top_k": top_k,
                        "presence_penalty": presence_penalty, "frequency_penalty": frequency_penalty,
                        "no_repeat_ngram_size": no_repeat_ngram_size}.items():
        BY_NAME[name].check(value)


@torch.inference_mode()
def ar_generate(
    model: ARModel,
    input_ids: Tensor,
    valid: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    no_repeat_ngram_size: int = 0,
    eos_token_ids: list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[Tensor], None] | None = None,
) -> ARResult:
    """Generate up to max_new_tokens after left-padded prompts input_ids [B, L] (valid [B, L] marks real tokens).

    eos_token_ids default to the model's; pad_token_id (written after a row's EOS) defaults to the first EOS.
    on_token, if given, receives each step's tokens [B] as they are produced (for streaming).
    Stops early once every row has emitted an EOS. The penalties and `no_repeat_ngram_size` read each row's
    generated tokens."""
    check_options(max_new_tokens, temperature, top_p, top_k, presence_penalty, frequency_penalty, no_repeat_ngram_size)
    eos = torch.tensor(model.eos_token_ids if eos_token_ids is None else eos_token_ids,
                       dtype=torch.long, device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else int(eos[0]) if len(eos) else 0
    batch = input_ids.shape[0]
    cache = model.new_cache(batch, input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    new_tokens = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
    generated: list[Tensor] = []
    forward_passes = 0
    counts = torch.zeros(batch, model.vocab_size, device=input_ids.device) if presence_penalty or frequency_penalty \
        else None
    written = input_ids.new_zeros(batch, 0) if no_repeat_ngram_size else None  # the answers' tokens, for the rule
    if max_new_tokens > 0:
        logits = prefill(model, input_ids, cache, valid)
        forward_passes = 1
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator, None, counts, presence_penalty,
                            frequency_penalty, written, no_repeat_ngram_size)
        token = torch.where(finished, pad, token)  # [B]
        count_tokens(counts, token[:, None])
        written = append_written(written, token.masked_fill(finished, -1)[:, None])
        active = ~finished
        new_tokens += active
        finished = finished | torch.isin(token, eos)
        generated.append(token)
        if on_token is not None:
            on_token(token)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        # a finished row's pad is not a real token
        logits = advance(model, cache, token[:, None], active[:, None])
        forward_passes += 1
    new = torch.stack(generated, dim=1) if generated else input_ids.new_zeros(batch, 0)
    return ARResult(torch.cat([input_ids, new], dim=1), forward_passes, new_tokens)
