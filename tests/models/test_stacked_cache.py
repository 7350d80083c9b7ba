"""Continuous batching reads several requests' caches in one decoder pass: `KVCache.stack` left-pads single-row
caches of different lengths (sliding windows included) and keeps each row's own positions, so a stacked decode
equals decoding every request alone."""

from __future__ import annotations

import pytest
import torch

import canvaslm
from canvaslm.models import llama
from canvaslm.models.cache import PUT_SPARE, KVCache, encode_chunked
from tests.reference import tiny_checkpoint
from tests.train.toy_config import MODEL_INIT


def _diffusion_gemma(tmp_path):
    tiny_checkpoint(tmp_path, layer_types=("sliding_attention", "sliding_attention", "full_attention"))
    return canvaslm.load(tmp_path, device="cpu").network


def _llama(tmp_path):
    torch.manual_seed(0)
    config = llama.Config.from_hf({"model_type": "llama", **MODEL_INIT, "sliding_window": 5}, "test")
    return llama.Model(config).to_diffusion(4).eval()


@pytest.mark.parametrize("build", [_diffusion_gemma, _llama], ids=["diffusion_gemma", "llama"])
def test_stacked_decode_equals_decoding_each_request_alone(build, tmp_path):
    network = build(tmp_path)
    torch.manual_seed(1)
    prompts = [torch.randint(3, 30, (1, n)) for n in (3, 9, 6)]  # shorter and longer than the sliding window
    caches = []
    with torch.no_grad():
        for prompt in prompts:
            cache = network.new_cache(1, "cpu")
            network.encode(prompt, cache, torch.ones_like(prompt, dtype=torch.bool))
            if prompt.shape[1] == 6:  # a committed canvas after the prompt, as between canvases
                canvas = torch.randint(3, 30, (1, network.canvas_length))
                network.encode(canvas, cache, torch.ones_like(canvas, dtype=torch.bool))
            caches.append(cache)
        canvases = torch.randint(3, 30, (3, network.canvas_length))
        alone = torch.cat([network.decode(canvases[i:i + 1], caches[i], None) for i in range(3)])
        stacked = KVCache.stack(caches)
        assert stacked.length == max(c.length for c in caches)
        assert stacked.positions(2).tolist() == [[c.length, c.length + 1] for c in caches]
        together = network.decode(canvases, stacked, None)
        assert (together - alone).abs().max().item() < 1e-4
        sc = torch.randn(3, network.canvas_length, network.vocab_size)
        alone = torch.cat([network.decode(canvases[i:i + 1], caches[i], sc[i:i + 1]) for i in range(3)])
        assert (network.decode(canvases, stacked, sc) - alone).abs().max().item() < 1e-4
        stacked.select(torch.tensor([2, 0]))
        assert (network.decode(canvases[[2, 0]], stacked, None) - together[[2, 0]]).abs().max().item() < 1e-4


def test_stacking_multi_row_caches_and_dropping_rows_keeps_every_row_exact(tmp_path):
    """The AR engine keeps one shared cache: rows join by stacking, write tokens together, and leave by `select`,
    which also trims padding no remaining row needs; every row's logits stay those of its solo run."""
    network = _llama(tmp_path)
    torch.manual_seed(2)
    prompts = [torch.randint(3, 30, (1, n)) for n in (9, 3, 6)]
    steps = torch.randint(3, 30, (3, 4))
    with torch.no_grad():
        solo = []
        for prompt, tokens in zip(prompts, steps, strict=True):
            cache = network.new_cache(1, "cpu")
            network.encode(prompt, cache, torch.ones_like(prompt, dtype=torch.bool))
            outs = [network(tokens[None, j:j + 1], cache, torch.ones(1, 1, dtype=torch.bool))[0, -1]
                    for j in range(4)]
            solo.append(torch.stack(outs))
        caches = []
        for prompt in prompts:
            cache = network.new_cache(1, "cpu")
            network.encode(prompt, cache, torch.ones_like(prompt, dtype=torch.bool))
            caches.append(cache)
        shared = KVCache.stack([KVCache.stack(caches[:2]), caches[2]])  # a stacked cache joined by a third row
        ones = torch.ones(3, 1, dtype=torch.bool)
        first = network(steps[:, 0:1], shared, ones)[:, -1]
        shared.select(torch.tensor([1, 2]))  # the longest row (9 tokens) leaves: 3 padding slots are trimmed
        assert shared.length == 6 + 1 and shared.offsets.tolist() == [3, 0]
        rest = [network(steps[1:, j:j + 1], shared, ones[1:])[:, -1] for j in range(1, 4)]
    assert (first - torch.stack([s[0] for s in solo])).abs().max() < 1e-4
    for j, out in enumerate(rest, start=1):
        assert (out - torch.stack([solo[1][j], solo[2][j]])).abs().max() < 1e-4


@pytest.mark.parametrize("build", [_diffusion_gemma, _llama], ids=["diffusion_gemma", "llama"])
def test_chunked_prefill_equals_one_pass(build, tmp_path):
    """A long prompt encoded in chunks (sliding windows included, a padded row too) leaves the same cache: the
    next canvas decodes to the same logits."""
    network = build(tmp_path)
    torch.manual_seed(3)
    ids = torch.randint(3, 30, (2, 21))
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, :7] = False  # left padding spanning more than one chunk
    canvas = torch.randint(3, 30, (2, network.canvas_length))
    with torch.no_grad():
        whole = network.new_cache(2, "cpu")
        last = network.encode(ids, whole, valid)[:, -1:]
        chunked = network.new_cache(2, "cpu")
        assert (encode_chunked(network, ids, chunked, valid, chunk=4) - last).abs().max() < 1e-4
        assert chunked.length == whole.length and torch.equal(chunked.valid, whole.valid)
        assert (network.decode(canvas, chunked, None) - network.decode(canvas, whole, None)).abs().max() < 1e-4


@pytest.mark.parametrize("build", [_diffusion_gemma, _llama], ids=["diffusion_gemma", "llama"])
def test_a_rolled_back_pass_leaves_the_cache_each_row_would_have_without_it(build, tmp_path):
    """Verified decoding writes a checked block, then each row keeps its own accepted prefix (`rollback`): the
    next pass must see what encoding only the kept tokens gives, sliding windows and rows of different lengths
    included, and again after a second rollback and after dropping a row."""
    network = build(tmp_path)
    torch.manual_seed(2)
    batch, n = 3, 4
    prompt = torch.randint(3, 30, (batch, 7))
    valid = torch.ones_like(prompt, dtype=torch.bool)
    valid[0, :2] = False  # a left-padded row
    blocks = [torch.randint(3, 30, (batch, n)) for _ in range(3)]
    keeps = [torch.tensor([1, 4, 2]), torch.tensor([3, 0, 4])]
    with torch.no_grad():
        cache = network.new_cache(batch, "cpu")
        cache.slack = n
        network.encode(prompt, cache, valid)
        for block, keep in zip(blocks, keeps, strict=False):
            network.encode(block, cache, torch.ones_like(block, dtype=torch.bool))
            cache.rollback(n, keep)
        rows = torch.tensor([0, 2])
        cache.select(rows)
        last = network.logits(network.encode(blocks[2][rows], cache, torch.ones(2, n, dtype=torch.bool)))
        for i, row in enumerate(rows.tolist()):
            kept = [prompt[row:row + 1]] + [b[row:row + 1, :int(k[row])] for b, k in zip(blocks, keeps, strict=False)]
            alone = network.new_cache(1, "cpu")
            ids = torch.cat(kept, dim=1)
            mask = torch.cat([valid[row:row + 1], torch.ones(1, ids.shape[1] - 7, dtype=torch.bool)], dim=1)
            network.encode(ids, alone, mask)
            expected = network.logits(network.encode(blocks[2][row:row + 1], alone, torch.ones(1, n, dtype=torch.bool)))
            torch.testing.assert_close(last[i:i + 1], expected, atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="between 0 and 4"):
            cache.rollback(n, torch.tensor([5, 0]))


def test_rollback_on_sliding_layers_needs_slack(tmp_path):
    network = _diffusion_gemma(tmp_path)
    cache = network.new_cache(1, "cpu")
    ids = torch.randint(3, 30, (1, 6))
    with torch.no_grad():
        network.encode(ids, cache, torch.ones_like(ids, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs slack >= 3"):
        cache.rollback(3, torch.tensor([1]))


@pytest.mark.parametrize("build", [_diffusion_gemma, _llama], ids=["diffusion_gemma", "llama"])
def test_commits_written_back_into_the_batch_leave_every_row_its_own_cache(build, tmp_path):
    """The serving engine keeps its running sequences' caches stacked: the canvases finished in a step are
    encoded over their rows copied out (`take`) and written back in place (`put`), the batch padded on the left
    when a row outgrows it. Every row, committed or not, then decodes as its own cache alone does (sliding windows
    included), and so after a second round of commits and after a row leaves."""
    network = build(tmp_path)
    torch.manual_seed(3)
    prompts = [torch.randint(3, 30, (1, n)) for n in (3, 9, 6)]  # shorter and longer than the sliding window
    size = network.canvas_length
    rounds = [([1, 2], torch.randint(3, 30, (2, size))), ([0, 1], torch.randint(3, 30, (2, size)))]
    canvases = torch.randint(3, 30, (3, size))
    with torch.no_grad():
        alone = []
        for prompt in prompts:
            cache = network.new_cache(1, "cpu")
            network.encode(prompt, cache, torch.ones_like(prompt, dtype=torch.bool))
            alone.append(cache)
        batch = KVCache.stack([copy_of(network, cache) for cache in alone])
        for rows, committed in rounds:
            ones = torch.ones_like(committed, dtype=torch.bool)
            index = torch.tensor(rows)
            part = batch.take(index)
            hidden = network.encode(committed, part, ones)
            batch.put(index, part)
            for i, row in enumerate(rows):
                solo = network.encode(committed[i:i + 1], alone[row], ones[i:i + 1])
                torch.testing.assert_close(hidden[i:i + 1], solo, atol=1e-5, rtol=0)
        assert 2 * size <= PUT_SPARE and batch.length == 9 + PUT_SPARE  # one pad made room for both rounds
        assert batch.positions(1)[:, 0].tolist() == [c.length for c in alone] == [3 + size, 9 + 2 * size, 6 + size]
        together = network.decode(canvases, batch, None)
        for i in range(3):
            torch.testing.assert_close(together[i:i + 1], network.decode(canvases[i:i + 1], alone[i], None),
                                       atol=1e-4, rtol=0)
        batch.select(torch.tensor([0, 2]))
        torch.testing.assert_close(network.decode(canvases[[0, 2]], batch, None), together[[0, 2]],
                                   atol=1e-4, rtol=0)


def copy_of(network, cache: KVCache) -> KVCache:
    """The same cache in tensors of its own (`put` writes into the batch, never into the caches stacked)."""
    out = network.new_cache(1, "cpu")
    out.keys = [None if k is None else k.clone() for k in cache.keys]
    out.values = [None if v is None else v.clone() for v in cache.values]
    out.valid, out.length = cache.valid.clone(), cache.length
    return out


@pytest.mark.parametrize("build", [_diffusion_gemma, _llama], ids=["diffusion_gemma", "llama"])
def test_prompts_encoded_together_give_the_caches_each_prompt_gives_alone(build, tmp_path):
    """The serving engine's batched prefill: prompts of different lengths in one left-padded pass, each row at its
    own positions; every cache it returns is the one that prompt alone gives (no padding left, no offsets), and so
    are the last hidden states."""
    from canvaslm.models.cache import encode_prompts

    network = build(tmp_path)
    torch.manual_seed(4)
    prompts = [torch.randint(3, 30, (n,)).tolist() for n in (3, 9, 6)]  # shorter and longer than the window
    canvas = torch.randint(3, 30, (1, network.canvas_length))
    with torch.no_grad():
        caches, hidden = encode_prompts(network, prompts, "cpu")
        assert hidden.shape[:2] == (3, 1)
        for i, prompt in enumerate(prompts):
            solo = network.new_cache(1, "cpu")
            ids = torch.tensor([prompt])
            solo_hidden = network.encode(ids, solo, torch.ones_like(ids, dtype=torch.bool))[:, -1:]
            row = caches[i]
            assert (row.length, row.offsets, row.batch_size, bool(row.valid.all())) == (len(prompt), None, 1, True)
            for layer in range(len(row.windows)):
                torch.testing.assert_close(row.keys[layer], solo.keys[layer], atol=1e-5, rtol=0)
                torch.testing.assert_close(row.values[layer], solo.values[layer], atol=1e-5, rtol=0)
            torch.testing.assert_close(hidden[i:i + 1], solo_hidden, atol=1e-5, rtol=0)
            torch.testing.assert_close(network.decode(canvas, row, None), network.decode(canvas, solo, None),
                                       atol=1e-4, rtol=0)


def test_prefill_groups_batch_prompts_of_like_length_and_never_pad_a_short_one_to_a_long_one():
    from canvaslm.models.cache import PREFILL_POSITIONS, prefill_groups

    assert prefill_groups([40, 42, 45, 41]) == [[0, 3, 1, 2]]  # a burst of chat prompts: one pass, shortest first
    assert prefill_groups([5]) == [[0]]
    assert prefill_groups([30, 2000, 35]) == [[0, 2], [1]]  # the long prompt is not padded into the short ones
    many = prefill_groups([512] * 20)
    assert [len(g) for g in many] == [PREFILL_POSITIONS // 512, PREFILL_POSITIONS // 512, 4]
    assert sorted(i for g in many for i in g) == list(range(20))
