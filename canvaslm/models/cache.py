"""KV cache of the committed prefix, and the attention masks that read it.

Layout: per layer, keys and values [B, Hkv, T, D] for the positions encoded so far. Sliding-window layers keep
only the last `window - 1` positions, exactly like the reference's DynamicSlidingWindowLayer, so a canvas decoded
after a long prompt sees the same keys as in transformers. `valid` [B, length] marks real (non-pad) positions;
positions are shared across the batch (prompts are left-padded), as in the reference `generate`, unless the cache
was built by `KVCache.stack` from caches of different lengths (continuous batching): then each row's positions
skip its own left padding (`offsets`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from canvaslm.hardware import one_query_sdpa_max_rows

PUT_SPARE = 16
"""Padding slots `KVCache.put` adds at least, when a row it writes back has outgrown the batch: a serving step
commits canvases of a few tokens, and every pad copies the whole cache."""


class KVCache:
    """Encoder-written, decoder-read cache. Only `extend` + `commit` write to it; the decoder uses `read`."""

    def __init__(self, windows: list[int | None], batch_size: int, device: torch.device | str = "cpu") -> None:
        self.windows = windows
        self.keys: list[Tensor | None] = [None] * len(windows)
        self.values: list[Tensor | None] = [None] * len(windows)
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)  # [B, length]
        self.length = 0
        self.offsets: Tensor | None = None  # [B] leading slots a row does not count as positions (see `stack`)
        self.slack = 0  # sliding layers keep this many keys beyond their window, so `rollback` can undo a pass

    @classmethod
    def stack(cls, caches: list[KVCache]) -> KVCache:
        """One batch from caches of different lengths (of one or more rows each), each left-padded to the longest.
        A row keeps its own positions: its next slot is position `len(row)`, not the batch's (see `positions`)."""
        length = max(c.length for c in caches)
        device = caches[0].valid.device
        out = cls(caches[0].windows, sum(c.batch_size for c in caches), device)
        for layer, window in enumerate(out.windows):
            kept = length if window is None else min(length, window - 1)
            for name in ("keys", "values"):
                rows = [getattr(c, name)[layer] for c in caches]
                if any(r is None for r in rows):
                    continue
                getattr(out, name)[layer] = torch.cat([F.pad(r, (0, 0, kept - r.shape[2], 0)) for r in rows])
        out.valid = torch.cat([F.pad(c.valid, (length - c.length, 0), value=False) for c in caches])
        out.length = length
        out.offsets = torch.cat([(torch.zeros(c.batch_size, dtype=torch.long, device=device) if c.offsets is None
                                  else c.offsets) + (length - c.length) for c in caches])
        out.slack = max(c.slack for c in caches)  # takes effect from the next pass (stacking keeps no slack keys)
        return out

    def unstack(self) -> list[KVCache]:
        """Each row as a cache of its own, the inverse of `stack`: the row without the left padding the batch gave
        it, its positions its own (`offsets` None again where it had none)."""
        rows = []
        for b in range(self.batch_size):
            row = copy.copy(self)
            row.keys, row.values = list(self.keys), list(self.values)
            row.select(torch.tensor([b], device=self.valid.device))  # drops the slots that are padding in it
            if row.offsets is not None and not bool(row.offsets.any()):
                row.offsets = None
            rows.append(row)
        return rows

    def take(self, rows: Tensor) -> KVCache:
        """A cache of some rows (an index tensor), copied out: passes over it leave this cache alone until `put`
        writes them back."""
        part = copy.copy(self)
        part.keys, part.values = list(self.keys), list(self.values)
        part.select(rows)
        return part

    def put(self, rows: Tensor, part: KVCache) -> None:
        """Write back rows `take` copied out, after passes appended positions to them: this cache keeps its other
        rows as they are, and each written row ends at the last slot again (its left padding shrinks by what it
        grew; `offsets` keep its positions its own). Where a row's padding is too short, every row is padded on
        the left first, by at least `PUT_SPARE` slots, so that the next few writes find room."""
        longest = part.length - (0 if part.offsets is None else int(part.offsets.min()))  # a row's real slots
        if longest > self.length:
            self.pad_left(max(longest - self.length, PUT_SPARE))
        for layer in range(len(self.windows)):
            for name in ("keys", "values"):
                into, new = getattr(self, name)[layer], getattr(part, name)[layer]
                if into is None or new is None:  # a layer that stores no keys of its own
                    continue
                slots = into.shape[2]
                into[rows] = F.pad(new, (0, 0, slots - new.shape[2], 0)) if new.shape[2] < slots \
                    else new[:, :, new.shape[2] - slots:]
        own = torch.zeros(part.batch_size, dtype=torch.long, device=self.valid.device) if part.offsets is None \
            else part.offsets
        self.valid[rows] = F.pad(part.valid, (self.length - part.length, 0), value=False) \
            if part.length < self.length else part.valid[:, part.length - self.length:]
        if self.offsets is None:
            self.offsets = torch.zeros(self.batch_size, dtype=torch.long, device=self.valid.device)
        self.offsets[rows] = own + (self.length - part.length)

    def pad_left(self, n: int) -> None:
        """n padding slots before every row: the positions of the rows stay their own (`offsets`)."""
        for layer, window in enumerate(self.windows):
            for name in ("keys", "values"):
                stored = getattr(self, name)[layer]
                if stored is None:
                    continue
                slots = stored.shape[2]  # a sliding layer pads only up to what its window shows
                add = n if window is None else max(0, min(slots + n, window - 1) - slots)
                if add:
                    getattr(self, name)[layer] = F.pad(stored, (0, 0, add, 0))
        self.valid = F.pad(self.valid, (n, 0), value=False)
        self.length += n
        self.offsets = (torch.zeros(self.batch_size, dtype=torch.long, device=self.valid.device)
                        if self.offsets is None else self.offsets) + n

    def positions(self, n: int) -> Tensor:
        """Positions of the next n slots: [n], shared by all rows, or [B, n] for a stacked cache."""
        positions = torch.arange(self.length, self.length + n, device=self.valid.device)
        return positions if self.offsets is None else positions[None, :] - self.offsets[:, None]

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def kept(self, layer: int) -> int:
        """How many of the last positions `layer` keeps (all of them for full-attention layers)."""
        window = self.windows[layer]
        return self.length if window is None else min(self.length, window - 1)

    def _stored(self, layer: int, length: int) -> int:
        """How many of the last `length` positions `layer` stores: its window plus the slack."""
        window = self.windows[layer]
        return length if window is None else min(length, window - 1 + self.slack)

    def read(self, layer: int) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """Cached keys, values and their validity [B, kept] for `layer`."""
        kept = self.kept(layer)
        k, v = self.keys[layer], self.values[layer]
        if k is not None and k.shape[2] > kept:  # the slack is not visible
            k, v = k[:, :, k.shape[2] - kept:], v[:, :, v.shape[2] - kept:]
        return k, v, self.valid[:, self.length - kept:]

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append new keys/values [B, Hkv, n, D]; returns cached + new for this forward pass.

        The stored tensors are truncated to the window only after the pass, which is why the new chunk itself
        still sees every key inside its own window."""
        old_k = self.keys[layer]
        if self.windows[layer] is None and (old_k is None or old_k.shape[2] == self.length):
            # a full layer that holds just its positions stores what it returns: what follows, ~8 us a layer less
            if old_k is None:  # kept contiguous: see below
                full_k, full_v = k.contiguous(), v.contiguous()
            else:
                full_k, full_v = torch.cat([old_k, k], dim=2), torch.cat([self.values[layer], v], dim=2)
            self.keys[layer], self.values[layer] = full_k, full_v
            return full_k, full_v
        old_k, old_v, _ = self.read(layer)
        if old_k is None:
            # kept contiguous, as every later concatenation is: the new keys arrive as a transposed view, and a
            # cache whose strides change after its first pass makes torch.compile build each pass twice
            k, v = k.contiguous(), v.contiguous()
        full_k = k if old_k is None else torch.cat([old_k, k], dim=2)
        full_v = v if old_v is None else torch.cat([old_v, v], dim=2)
        if self.keys[layer] is None or self.keys[layer] is old_k:
            stored_k, stored_v = full_k, full_v
        else:  # the slack behind the window is kept too
            stored_k, stored_v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        keep = self._stored(layer, self.length + k.shape[2])
        self.keys[layer], self.values[layer] = stored_k[:, :, -keep:], stored_v[:, :, -keep:]
        return full_k, full_v

    def commit(self, valid: Tensor) -> None:
        """Record that `valid.shape[1]` positions were encoded in every layer (call once per encoder pass)."""
        self.valid = torch.cat([self.valid, valid.to(self.valid.device, torch.bool)], dim=1)
        self.length = self.valid.shape[1]

    def select(self, rows: Tensor) -> None:
        """Keep only batch rows `rows` (an index tensor), e.g. to drop finished requests. A stacked cache also
        drops the leading slots that are padding in every remaining row."""
        self.keys = [None if k is None else k[rows] for k in self.keys]
        self.values = [None if v is None else v[rows] for v in self.values]
        self.valid = self.valid[rows]
        if self.offsets is None:
            return
        self.offsets = self.offsets[rows]
        drop = int(self.offsets.min()) if len(self.offsets) else 0
        if drop <= 0:
            return
        self.valid, self.length, self.offsets = self.valid[:, drop:], self.length - drop, self.offsets - drop
        for i in range(len(self.windows)):
            if self.keys[i] is not None:
                cut = self.keys[i].shape[2] - self._stored(i, self.length)
                if cut > 0:
                    self.keys[i], self.values[i] = self.keys[i][:, :, cut:], self.values[i][:, :, cut:]

    def rollback(self, n: int, keep: Tensor) -> None:
        """Undo part of the last pass, which wrote `n` positions: row b keeps the first keep[b] of them (a verified
        draft's accepted tokens) and forgets the rest. Each row's kept positions then end at the last slot: a row
        that forgot more is shifted right, and the slots freed on its left are padding that its `offsets` skip,
        so its next position is still its own. Sliding layers need `slack` >= n (set before the pass), or keys
        inside the window would already be gone."""
        drop = n - keep.to(self.valid.device).long()                                        # [B]
        if bool((drop < 0).any()) or bool((drop > n).any()):
            raise ValueError(f"rollback keeps between 0 and {n} positions per row, got {keep.tolist()}")
        if any(w is not None for w in self.windows) and self.slack < n:
            raise ValueError(f"rollback of {n} positions on sliding-window layers needs slack >= {n}")
        common = int(drop.min()) if len(drop) else 0
        if common:  # forgotten by every row: cut off
            self.valid, self.length = self.valid[:, :self.length - common], self.length - common
            for i in range(len(self.windows)):
                if self.keys[i] is not None:
                    end = self.keys[i].shape[2] - common
                    self.keys[i], self.values[i] = self.keys[i][:, :, :end], self.values[i][:, :, :end]
        shift = drop - common
        if bool((shift > 0).any()):
            self.valid = _shift_right(self.valid, shift, False)
            for i in range(len(self.windows)):
                if self.keys[i] is not None:
                    self.keys[i] = _shift_right(self.keys[i], shift, 0.0, dim=2)
                    self.values[i] = _shift_right(self.values[i], shift, 0.0, dim=2)
        self.offsets = shift if self.offsets is None else self.offsets + shift


def _shift_right(x: Tensor, shift: Tensor, fill: float | bool, dim: int = 1) -> Tensor:
    """Row b of x (batch on dim 0) moved `shift[b]` slots to the right along `dim`; the slots freed on the left hold
    `fill` and the last shift[b] slots fall off. The rows of each shift are copied as one block (a shift is less than
    a canvas, so there are few), in place where x is contiguous: x is a cache's own tensor, which nothing else holds
    between passes. At 32 rows of a 150-token SmolLM2 cache a rollback takes ~20 ms this way, ~90 ms as a gather
    over every element."""
    out, length = x.contiguous(), x.shape[dim]
    for s in shift.unique().tolist():
        if s == 0:
            continue
        rows = (shift == s).nonzero().squeeze(1)
        moved = x.index_select(0, rows).narrow(dim, 0, max(length - s, 0))
        freed = list(moved.shape)
        freed[dim] = min(s, length)
        out.index_copy_(0, rows, torch.cat([moved.new_full(freed, fill), moved], dim=dim))
    return out


PREFILL_CHUNK = 512
"""Prompt tokens encoded per pass: attention scores of a chunk take chunk x (cache + chunk) entries per head, so
a long prompt is encoded in pieces instead of materialising prompt^2 of them at once."""


def encode_chunked(model: Any, input_ids: Tensor, cache: KVCache, valid: Tensor,
                   chunk: int = PREFILL_CHUNK) -> Tensor:
    """`model.encode` over input_ids [B, n] in chunks of `chunk` positions (chunked prefill); the cache ends up the
    same as after one pass (sliding layers truncate after each chunk, which every later chunk's window allows).
    Returns the final hidden state of the last position, [B, 1, H]."""
    hidden = None
    for start in range(0, input_ids.shape[1], chunk):
        hidden = model.encode(input_ids[:, start:start + chunk], cache, valid[:, start:start + chunk])
    if hidden is None:
        raise ValueError("encode_chunked needs at least one position")
    return hidden[:, -1:]


PREFILL_PADDING = 0.25
"""Prompts admitted together share a causal pass while padding them to the longest adds at most this share of
their own positions (plus `PREFILL_SLACK`): a burst of chat requests, alike in length, then costs a few passes."""
PREFILL_SLACK = 32
PREFILL_POSITIONS = 8 * PREFILL_CHUNK
"""At most this many (padded) positions in one shared prompt pass."""


def prefill_groups(lengths: list[int]) -> list[list[int]]:
    """The indices of prompts of these lengths, in groups to encode together (`encode_prompts`): shortest first,
    a group growing while its padding stays within `PREFILL_PADDING` and `PREFILL_SLACK` and its padded positions
    within `PREFILL_POSITIONS`."""
    groups: list[list[int]] = []
    total = 0
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        group = groups[-1] if groups else None
        if group is not None:
            padded = lengths[i] * (len(group) + 1)  # sorted: this prompt is the group's longest
            real = total + lengths[i]
            if padded <= (1 + PREFILL_PADDING) * real + PREFILL_SLACK and padded <= PREFILL_POSITIONS:
                group.append(i)
                total = real
                continue
        groups.append([i])
        total = lengths[i]
    return groups


def encode_prompts(model: Any, prompts: list[list[int]], device: torch.device | str) -> tuple[list[KVCache], Tensor]:
    """Each prompt into a KV cache of its own, all in one chunked causal pass: the prompts left-padded to the
    longest, each row at its own positions (`offsets`) and the padding masked, then unstacked, so every cache is the
    one its prompt alone gives (up to float rounding; a single prompt takes exactly the plain path). Returns the
    caches and the final hidden state of each prompt's last position [k, 1, H]."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)
    valid = torch.tensor([[False] * (longest - len(p)) + [True] * len(p) for p in prompts], device=device)
    cache = model.new_cache(len(prompts), device)
    if len(prompts) == 1:
        return [cache], encode_chunked(model, ids, cache, valid)
    cache.offsets = (~valid).sum(dim=1)  # a row's first real token is its position 0
    hidden = encode_chunked(model, ids, cache, valid)
    return cache.unstack(), hidden


def encoder_mask(cache: KVCache, layer: int, valid_new: Tensor) -> Tensor:
    """Causal (and windowed) mask [B, 1, n, kept + n] for a chunk of n new positions appended after the cache.

    A query sees keys that are real tokens, not in its future and, on sliding layers, fewer than `window`
    positions back. A padded query also sees itself, so its (unused) row never becomes NaN."""
    n = valid_new.shape[1]
    kept = cache.kept(layer)
    q_pos = torch.arange(cache.length, cache.length + n, device=valid_new.device)
    k_pos = torch.arange(cache.length - kept, cache.length + n, device=valid_new.device)
    k_valid = torch.cat([cache.valid[:, cache.length - kept:], valid_new.bool()], dim=1)  # [B, kept + n]
    allowed = k_pos[None, :] <= q_pos[:, None]
    window = cache.windows[layer]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    mask = allowed[None] & k_valid[:, None, :]
    mask |= (k_pos[None, :] == q_pos[:, None])[None]
    return mask[:, None]


def decoder_mask(cache: KVCache, layer: int, canvas_length: int) -> Tensor | None:
    """Bidirectional mask [B, 1, C, kept + C]: the canvas sees every real cached key and all of itself.

    Returns None when nothing is padded, which lets SDPA run unmasked."""
    k_valid = cache.valid[:, cache.length - cache.kept(layer):]
    if bool(k_valid.all()):
        return None
    k_valid = F.pad(k_valid, (0, canvas_length), value=True)
    return k_valid[:, None, None, :].expand(-1, 1, canvas_length, -1)


def pass_mask(mask: Tensor | None, groups: int) -> Tensor | None:
    """The bool mask [B, 1, n, T] a pass hands all its layers, made once for `attend` (groups: query heads per kv
    head). None where it hides nothing: one query over unpadded keys (an AR step at batch 1), which SDPA then runs
    unmasked, ~25% faster a layer. n > 1 queries: laid out for attend's grouped rows [B, 1, G * n, T] here, once,
    instead of repeated in every layer (~35 us a layer for a 4-row commit of SmolLM2). Other masks as they are."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    if mask.shape[2] == 1:
        return None if bool(mask.all()) else mask
    return mask.repeat(1, 1, groups, 1) if groups > 1 else mask


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """Grouped-query attention. q [B, H, n, D], k/v [B, Hkv, T, D], mask [B, 1, n, T] bool (or [B, 1, G * n, T]
    from `pass_mask`; or an additive float mask [B or 1, H, n, T], n > 1: a grid canvas's relation bias)
    -> [B, n, H*D]."""
    batch, heads, n, dim = q.shape
    groups = heads // k.shape[1]
    if n == 1 and batch > one_query_sdpa_max_rows(q.device.type):
        # one query (an AR step) in many rows: plain matmuls over the grouped heads, no repeated k/v. torch's CPU
        # flash kernel costs 5-7x more here in bfloat16 (4.9 vs 0.7 ms for 64 rows x 60 keys on a 2-core EPYC);
        # in few rows on AMX CPUs it is 2-4x faster (`one_query_sdpa_max_rows`) and takes the grouped path below
        grouped = q.view(batch, k.shape[1], groups, dim)                       # [B, Hkv, G, D]
        scores = (grouped @ k.transpose(-1, -2)).float() * scale               # [B, Hkv, G, T]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, :, 0, None, :], float("-inf"))
        out = scores.softmax(dim=-1).to(v.dtype) @ v                          # [B, Hkv, G, D]
        return out.reshape(batch, 1, heads * dim)
    if groups > 1 and (mask is None or mask.dtype == torch.bool):
        # the heads of a group read the same keys: their queries go in as one longer sequence per kv head
        # ([B, Hkv, G * n, D], row g * n + i is query i of head g), each row masked as its query. Bit-equal to
        # repeating k/v per head (SDPA works row by row), without copying them, and torch's CPU flash kernel is
        # 1.3-2x faster on fewer, longer heads (a 32-sequence batch of 16-token canvases over ~300 cached keys: 2.6
        # vs 5.6 ms a layer in bfloat16 on a 2-core Xeon)
        grouped = q.reshape(batch, k.shape[1], groups * n, dim)
        if mask is not None and mask.shape[2] == n > 1:  # not laid out by `pass_mask`; one query's mask row
            mask = mask.repeat(1, 1, groups, 1)         # [B, 1, 1, T] broadcasts over the group's rows
        out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scale)
        return out.reshape(batch, heads, n, dim).transpose(1, 2).reshape(batch, n, -1)
    if groups > 1:  # a per-head float bias (a grid canvas's relations) needs every head's own rows
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(batch, n, -1)
