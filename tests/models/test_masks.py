"""Who may attend to whom in block-diffusion training, and that the training forward reproduces inference."""

from __future__ import annotations

import pytest
import torch

from canvaslm.errors import TrainingError
from canvaslm.models import diffusion_gemma as dg
from canvaslm.models import llama
from canvaslm.models.masks import block_diffusion_mask, causal_mask
from canvaslm.train.batch import collate
from tests.reference import tiny_diffusion_gemma


def picture(mask: torch.Tensor, seq: int) -> list[str]:
    """One row of a [R, S + R] mask per query: 'x' = may attend, '.' = may not, '|' between clean and canvas."""
    return ["".join("x" if v else "." for v in row[:seq].tolist()) + "|"
            + "".join("x" if v else "." for v in row[seq:].tolist()) for row in mask]


def test_canvas_sees_prompt_and_strictly_earlier_canvases():
    valid = torch.ones(1, 6, dtype=torch.bool)  # prompt 2, two canvases of 2
    mask = block_diffusion_mask(valid, prompt_length=2, canvas_length=2, window=None)
    assert mask.shape == (1, 1, 4, 10) and mask.dtype == torch.bool
    assert picture(mask[0, 0], 6) == [
        "xx....|xx..",   # canvas 0: the prompt, and all of canvas 0 (not its clean tokens: that is the answer)
        "xx....|xx..",
        "xxxx..|..xx",   # canvas 1: the prompt and clean canvas 0, never its own clean tokens
        "xxxx..|..xx",
    ]


def test_no_canvas_sees_its_own_or_later_clean_tokens():
    prompt, canvas, seq = 3, 4, 3 + 4 * 4
    mask = block_diffusion_mask(torch.ones(2, seq, dtype=torch.bool), prompt, canvas, window=None)[:, 0]
    for q in range(seq - prompt):
        own_block_start = prompt + q // canvas * canvas
        assert not mask[:, q, own_block_start:seq].any()      # `>=` instead of `>` would leak here
        assert mask[:, q, :own_block_start].all()


def test_sliding_window_is_anchored_at_the_canvas_start_and_spares_the_canvas():
    valid = torch.ones(1, 8, dtype=torch.bool)  # prompt 2, three canvases of 2
    windowed = block_diffusion_mask(valid, prompt_length=2, canvas_length=2, window=3)
    assert picture(windowed[0, 0], 8) == [
        "xx......|xx....",   # the cache keeps window - 1 = 2 keys: positions [start - 2, start)
        "xx......|xx....",
        "..xx....|..xx..",
        "..xx....|..xx..",
        "....xx..|....xx",
        "....xx..|....xx",
    ]
    full = block_diffusion_mask(valid, prompt_length=2, canvas_length=2, window=None)
    assert picture(full[0, 0], 8)[4] == "xxxxxx..|....xx"


def test_padding_is_never_attended_and_pad_rows_keep_their_diagonal():
    valid = torch.tensor([[False, True, True, True, True, True],     # left-padded prompt
                          [True, True, True, True, False, False]])   # second canvas is padding
    mask = block_diffusion_mask(valid, prompt_length=2, canvas_length=2, window=None)
    assert picture(mask[0, 0], 6) == [".x....|xx..", ".x....|xx..", ".xxx..|..xx", ".xxx..|..xx"]
    assert picture(mask[1, 0], 6) == ["xx....|xx..", "xx....|xx..", "xxxx..|..x.", "xxxx..|...x"]
    assert mask.any(dim=-1).all()


def test_causal_mask_is_causal_windowed_and_skips_padding():
    mask = causal_mask(torch.tensor([[False, True, True, True]]), window=2)
    rows = ["".join("x" if v else "." for v in row.tolist()) for row in mask[0, 0]]
    assert rows == ["x...",   # a pad query sees only itself
                    ".x..", ".xx.", "..xx"]


def test_a_sequence_that_does_not_end_in_whole_canvases_is_refused():
    with pytest.raises(TrainingError, match="whole canvases"):
        block_diffusion_mask(torch.ones(1, 7, dtype=torch.bool), prompt_length=2, canvas_length=2, window=None)
    with pytest.raises(TrainingError, match="whole canvases"):
        block_diffusion_mask(torch.ones(1, 4, dtype=torch.bool), prompt_length=6, canvas_length=2, window=None)


# -- the training forward against inference's encode + decode, canvas by canvas ----------------------------------

CANVAS = 4
EXAMPLES = [([5, 6, 7, 8, 9, 10], list(range(11, 21))),   # 3 canvases (10 tokens + 2 EOS)
            ([4, 4], [7, 8, 9]),                          # 1 canvas, then 2 pad canvases; left-padded prompt
            ([3, 3, 3, 3], list(range(30, 42)))]          # cut to 3 canvases, no EOS


def tiny_llama() -> llama.Model:
    """Diffusion-mode Qwen2: layer 0 full attention, layer 1 sliding (window 5 < the 18-token sequence)."""
    config = llama.Config.from_hf(dict(
        model_type="qwen2", vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=5,
        max_window_layers=1, canvas_length=CANVAS), "tiny")
    torch.manual_seed(0)
    model = llama.Model(config).eval()
    torch.nn.init.normal_(model.self_conditioning.down_proj.weight, std=0.2)  # to_diffusion would start it at 0
    return model


def tiny_gemma() -> dg.Model:
    ref = tiny_diffusion_gemma(["sliding_attention", "full_attention"], canvas_length=CANVAS, sliding_window=5)
    with torch.device("meta"):
        model = dg.Model(dg.Config.from_hf(ref.config.to_dict(), "reference"))
    model.load_hf_tensors(ref.state_dict(), "reference")
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "diffusion_gemma"])
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return tiny_llama() if request.param == "llama" else tiny_gemma()


@torch.no_grad()
def test_training_forward_equals_inference_canvas_by_canvas(model):
    batch = collate(EXAMPLES, CANVAS, eos_token_id=1, pad_token_id=0, max_canvases=3)
    ids, valid, prompt = batch.input_ids, batch.valid, batch.prompt_length
    rows, response = ids.shape[0], batch.response_length
    g = torch.Generator().manual_seed(0)
    noised = torch.randint(0, model.vocab_size, (rows, response), generator=g)
    sc_logits = 3 * torch.randn(rows, response, model.vocab_size, generator=g)
    sc_rows = torch.tensor([True, False, True])
    encoder_logits, canvas_logits = model.forward_block_diffusion(ids, valid, prompt, noised, sc_logits, sc_rows)
    _, plain_logits = model.forward_block_diffusion(ids, valid, prompt, noised, None)
    assert encoder_logits.dtype == canvas_logits.dtype == torch.float32
    assert encoder_logits.shape == (rows, ids.shape[1], model.vocab_size)
    assert canvas_logits.shape == (rows, response, model.vocab_size)

    one_pass = model.logits(model.encode(ids, model.new_cache(rows), valid))
    torch.testing.assert_close(encoder_logits[valid], one_pass[valid], atol=1e-5, rtol=0)
    for b in range(response // CANVAS):
        cache = model.new_cache(rows)  # inference: the prompt, then each earlier canvas, into the cache
        for start, end in [(0, prompt)] + [(prompt + j * CANVAS, prompt + (j + 1) * CANVAS) for j in range(b)]:
            model.encode(ids[:, start:end], cache, valid[:, start:end])
        block = slice(b * CANVAS, (b + 1) * CANVAS)
        conditioned = model.decode(noised[:, block], cache, sc_logits[:, block])
        unconditioned = model.decode(noised[:, block], cache, None)
        expected = torch.where(sc_rows[:, None, None], conditioned, unconditioned)
        real = batch.supervised[:, block]  # padded canvases differ by design (inference never has them)
        torch.testing.assert_close(canvas_logits[:, block][real], expected[real], atol=1e-5, rtol=0)
        torch.testing.assert_close(plain_logits[:, block][real], unconditioned[real], atol=1e-5, rtol=0)
    assert not torch.allclose(canvas_logits[0], plain_logits[0], atol=1e-3), "self-conditioning had no effect"


def test_training_forward_refuses_mismatched_canvases(model):
    batch = collate(EXAMPLES, CANVAS, eos_token_id=1, pad_token_id=0)
    noised = torch.zeros(3, batch.response_length - 1, dtype=torch.long)
    with pytest.raises(TrainingError, match="noised canvases"):
        model.forward_block_diffusion(batch.input_ids, batch.valid, batch.prompt_length, noised, None)


@torch.no_grad()
def test_corrupted_copies_share_one_encoder_pass(model):
    """noised [2B, R] (complementary masks) reads one encoder pass: the same as two separate forwards."""
    batch = collate(EXAMPLES, CANVAS, eos_token_id=1, pad_token_id=0, max_canvases=3)
    ids, valid, prompt = batch.input_ids, batch.valid, batch.prompt_length
    g = torch.Generator().manual_seed(3)
    first, second = (torch.randint(0, model.vocab_size, (ids.shape[0], batch.response_length), generator=g)
                     for _ in range(2))
    encoder, both = model.forward_block_diffusion(ids, valid, prompt, torch.cat([first, second]), None)
    assert encoder.shape[0] == ids.shape[0] and both.shape[0] == 2 * ids.shape[0]
    alone = torch.cat([model.forward_block_diffusion(ids, valid, prompt, n, None)[1] for n in (first, second)])
    real = batch.supervised.repeat(2, 1)
    torch.testing.assert_close(both[real], alone[real], atol=1e-5, rtol=0)
