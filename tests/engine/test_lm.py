"""The public API (`canvaslm.load`, `LM`) on a tiny DiffusionGemma checkpoint written by transformers.

The end-to-end test runs *our* network inside *our* loop and compares with the reference
`DiffusionGemmaForBlockDiffusion.generate` for the same seed: the same tokens must come out."""

from __future__ import annotations

import pytest
import torch

import canvaslm
from canvaslm.diffusion.step import Constraint
from canvaslm.errors import CanvasError, GenerationError, UnsupportedError
from tests.diffusion.test_generate_loop import reference_generate
from tests.reference import tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-dg")
    ref = tiny_checkpoint(path)
    return path, ref


@pytest.fixture(scope="module")
def lm(checkpoint):
    return canvaslm.load(checkpoint[0], device="cpu")


def test_load_describes_the_model(lm):
    assert lm.kind == "diffusion"
    assert lm.tokenizer is not None and lm.network.canvas_length == 8
    assert lm.eos_token_ids[0] == 1 and lm.pad_token_id == 0


@pytest.mark.parametrize("settings", [{}, {"entropy_bound": 2.0, "stability_threshold": 0, "confidence_threshold": 1.0}])
def test_every_denoising_step_of_a_reference_generate_matches(lm, checkpoint, settings):
    """Record each decoder call of a whole reference `generate` (batched, left-padded, several canvases) and
    replay it through our network: same logits within 1e-4 at every step. Together with the loop test (same
    tokens for the same draws) this is the whole generate call, step by step."""
    _, ref = checkpoint
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [8, 9, 10, 11, 12, 13]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    calls = []
    forward = ref.forward

    def recording_forward(**kwargs):
        out = forward(**kwargs)
        sc = kwargs["self_conditioning_logits"]
        calls.append((int(kwargs["decoder_position_ids"][0, 0]), kwargs["decoder_input_ids"].clone(),
                      None if sc is None else sc.clone(), out.logits.clone()))
        return out

    ref.forward = recording_forward
    try:
        with torch.no_grad():
            sequences = reference_generate(ref, ids, mask, 24, 5, [1], **dict(settings)).sequences
    finally:
        del ref.forward
    assert len({start for start, *_ in calls}) == 3  # three canvases were denoised
    net, worst = lm.network, 0.0
    with torch.inference_mode():
        for start, canvas, sc, expected in calls:
            cache = net.new_cache(2)
            prefix_valid = torch.cat([mask.bool(), torch.ones(2, start - ids.shape[1], dtype=torch.bool)], dim=1)
            net.encode(sequences[:, :start], cache, prefix_valid)
            worst = max(worst, (net.decode(canvas, cache, sc) - expected).abs().max().item())
    assert worst < 1e-4


def test_denoise_equals_reference_logits(lm, checkpoint):
    _, ref = checkpoint
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    canvas = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(input_ids=prompt, decoder_input_ids=canvas).logits
    got = lm.denoise(prompt, canvas)
    assert got.dtype == torch.float32 and got.shape == (1, 8, 128)
    assert (got - expected).abs().max() < 1e-4


def test_seeded_generation_is_reproducible_and_seeds_differ(lm):
    a = lm.generate([5, 6, 7], max_new_tokens=16, seed=1).sequences
    b = lm.generate([5, 6, 7], max_new_tokens=16, seed=1).sequences
    c = lm.generate([5, 6, 7], max_new_tokens=16, seed=2).sequences
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_chat_and_complete_return_text_and_speed(lm):
    r = lm.chat([{"role": "user", "content": "hello world"}], max_new_tokens=16, seed=0)
    assert isinstance(r.text, str) and len(r.token_ids) <= 16
    assert r.forward_passes >= 1 and r.tokens_per_forward > 0 and r.seconds > 0
    assert r.finish_reason in ("stop", "length")
    c = lm.complete("the quick brown", max_new_tokens=8, seed=0)
    assert len(c.token_ids) <= 8


@pytest.mark.parametrize("middle", [3, 13])  # the suffix in the first canvas, or across the second
def test_infill_pins_the_suffix_after_the_middle(lm, middle):
    suffix_ids = lm.tokenizer.encode(" brown fox", add_special_tokens=False)
    seen = []
    prompt = lm.tokenizer.encode("the quick", add_special_tokens=True)
    fixed = torch.tensor([[-1] * middle + suffix_ids])
    for event in lm.generate_steps([prompt], middle + len(suffix_ids), seed=0, constraint=Constraint(fixed)):
        if hasattr(event, "draft"):
            seen.append(event)
    # every step's draft holds the suffix where it falls in that canvas
    for step in seen:
        start = step.canvas * lm.network.canvas_length
        for offset, token in enumerate(suffix_ids, middle):
            if start <= offset < start + lm.network.canvas_length:
                assert int(step.draft[0, offset - start]) == token
    r = lm.infill("the quick", " brown fox", max_new_tokens=middle, seed=0)
    assert len(r.token_ids) <= middle and r.finish_reason in ("stop", "length") and r.forward_passes >= 1
    assert r.tokens_per_forward == len(r.token_ids) / r.forward_passes
    # a default canvas smaller than the trained one does not reach an infill (the middle would not see the suffix)
    import dataclasses

    defaults = lm.diffusion_defaults
    try:
        lm.diffusion_defaults = dataclasses.replace(defaults, canvas_size=2)
        small = lm.infill("the quick", " brown fox", max_new_tokens=middle, seed=0)
        assert (small.token_ids, small.forward_passes) == (r.token_ids, r.forward_passes)
    finally:
        lm.diffusion_defaults = defaults


def test_generation_config_json_sets_defaults(checkpoint, tmp_path):
    import json
    import shutil

    shutil.copytree(checkpoint[0], tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps(
        {"max_denoising_steps": 7, "sampler_config": {"entropy_bound": 0.3, "_cls_name": "EntropyBoundSamplerConfig"},
         "t_min": None}))
    lm = canvaslm.load(tmp_path / "m")
    assert lm.diffusion_defaults.max_denoising_steps == 7 and lm.diffusion_defaults.entropy_bound == 0.3
    assert lm.diffusion_defaults.t_min == 0.4  # null in the file keeps the default
    out = lm.generate([5, 6], max_new_tokens=8, seed=0)
    assert int(out.forward_passes.max()) <= 7

    # a default canvas the model never saw is refused when the model loads, naming the field and the limit
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"canvas_size": 64}))
    with pytest.raises(GenerationError, match="canvas_size must be at most this model's trained canvas of"):
        canvaslm.load(tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"canvas_size": 2}))
    from canvaslm.diffusion.generate import CanvasCommitted

    events = canvaslm.load(tmp_path / "m").generate_steps([5, 6], max_new_tokens=8, seed=0)
    assert {e.tokens.shape[1] for e in events if isinstance(e, CanvasCommitted)} == {2}  # the default applies


def test_bad_calls_raise_clear_errors(lm):
    with pytest.raises(GenerationError, match="temperature"):
        lm.generate([5, 6], max_new_tokens=8, temperature=0.5)
    with pytest.raises(GenerationError, match="entropy_bund"):
        lm.generate([5, 6], max_new_tokens=8, entropy_bund=0.5)
    with pytest.raises(GenerationError, match=r"\[0, 128\)"):
        lm.generate([5, 999], max_new_tokens=8)
    with pytest.raises(GenerationError, match="maximum context length is 512 tokens"):
        lm.generate([5] * 500, max_new_tokens=64)
    with pytest.raises(GenerationError, match="autoregressive"):
        lm.logits([[5, 6]])
    with pytest.raises(UnsupportedError, match="not supported yet"):
        lm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_text_api_without_tokenizer_is_a_clear_error(checkpoint, tmp_path):
    import shutil

    shutil.copytree(checkpoint[0], tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").unlink()
    lm = canvaslm.load(tmp_path / "m")
    assert lm.tokenizer is None
    assert lm.generate([5, 6], max_new_tokens=8, seed=0).sequences.shape == (1, 10)
    with pytest.raises(CanvasError, match="no tokenizer"):
        lm.chat([{"role": "user", "content": "hi"}])


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(CanvasError, match="registered names"):
        canvaslm.load(tmp_path / "nope")


def test_llama_converted_to_diffusion_saves_and_loads(tmp_path):
    """An AR Llama checkpoint, switched to block-diffusion mode, round-trips through save/load and generates."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "ar")
    ar = canvaslm.load(tmp_path / "ar")
    assert ar.kind == "autoregressive"
    ar.network.to_diffusion(canvas_length=8)
    with torch.no_grad():
        ar.network.self_conditioning.down_proj.weight.normal_()  # as if trained: the block now matters
    converted = canvaslm.LM(ar.network, None, "converted")
    converted.save(tmp_path / "diffusion")
    loaded = canvaslm.load(tmp_path / "diffusion")
    assert loaded.kind == "diffusion" and loaded.network.canvas_length == 8
    prompt, canvas = torch.tensor([[5, 6, 7]]), torch.tensor([[9] * 8])
    sc = torch.randn(1, 8, 128)
    assert torch.equal(loaded.denoise(prompt, canvas, sc), converted.denoise(prompt, canvas, sc))
    a = loaded.generate([5, 6, 7], max_new_tokens=16, seed=3)
    b = loaded.generate([5, 6, 7], max_new_tokens=16, seed=3)
    assert torch.equal(a.sequences, b.sequences) and a.sequences.shape == (1, 19)


def test_a_model_loaded_under_inference_mode_denoises_as_one_loaded_plainly(tmp_path):
    """Weights made under torch.inference_mode carry no version counter; the canvas pass's check of an all-zero
    self-conditioning block (kept per weight version) must still work, and answer as for plain weights."""
    from tests.reference import tiny_smol_diffusion

    tiny_smol_diffusion(8).save(tmp_path)
    prompt = [[1, 500, 600, 700]]
    plain = canvaslm.load(tmp_path, device="cpu").generate(prompt, 16, seed=0, max_denoising_steps=4)
    with torch.inference_mode():
        lm = canvaslm.load(tmp_path, device="cpu")
        assert lm.network.self_conditioning.down_proj.weight.is_inference()
        result = lm.generate(prompt, 16, seed=0, max_denoising_steps=4)
    assert torch.equal(result.sequences, plain.sequences)
