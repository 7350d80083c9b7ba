"""Our decode loop against transformers' `DiffusionGemmaForBlockDiffusion.generate`.

The loop is driven through a thin adapter around the *reference* network, so these tests check the loop alone
(random draws in the same order, acceptance, renoising, stopping, EOS padding, tokens per forward): with the same
seed the sequences must be identical, token for token."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from canvaslm.diffusion.generate import CanvasCommitted, DenoisingStep, generate, generate_steps
from canvaslm.diffusion.sampling import DiffusionSampling
from tests.reference import tiny_diffusion_gemma


class ReferenceNetwork:
    """Presents the reference network through canvaslm's encode/decode protocol, calling it the way the
    reference `generate` does (2-D masks turned into its mask mappings, shared position ids)."""

    def __init__(self, ref) -> None:
        self.ref, self.canvas_length, self.vocab_size = ref, ref.config.canvas_length, ref.config.text_config.vocab_size

    def new_cache(self, batch_size, device=None):
        from transformers import DynamicCache
        return {"kv": DynamicCache(config=self.ref.config.get_text_config(decoder=True)),
                "mask": torch.zeros(batch_size, 0, dtype=torch.bool)}

    def encode(self, input_ids, cache, valid):
        length = cache["mask"].shape[1]
        cache["mask"] = torch.cat([cache["mask"], valid.bool()], dim=1)
        positions = torch.arange(length, length + input_ids.shape[1]).unsqueeze(0)
        masks = self.ref.model.encoder.create_masks_for_generate(
            config=self.ref.config, inputs_embeds=torch.empty(*input_ids.shape, 0), attention_mask=cache["mask"],
            past_key_values=cache["kv"], position_ids=positions)
        return self.ref.model.encoder(input_ids=input_ids, attention_mask=masks, past_key_values=cache["kv"],
                                      position_ids=positions).last_hidden_state

    def decode(self, canvas, cache, self_conditioning_logits):
        length = cache["mask"].shape[1]
        masks = self.ref.model.decoder.create_diffusion_decoder_attention_mask(
            config=self.ref.config, inputs_embeds=canvas.unsqueeze(-1), past_key_values=cache["kv"],
            decoder_attention_mask=F.pad(cache["mask"], (0, canvas.shape[1]), value=True))
        positions = torch.arange(length, length + canvas.shape[1]).unsqueeze(0)
        return self.ref(decoder_input_ids=canvas, self_conditioning_logits=self_conditioning_logits,
                        decoder_attention_mask=masks, past_key_values=cache["kv"],
                        decoder_position_ids=positions).logits


def reference_generate(ref, input_ids, mask, max_new_tokens, seed, eos, **settings):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    if "entropy_bound" in settings:  # the reference nests it in a sampler config
        settings["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=settings.pop("entropy_bound"))
    torch.manual_seed(seed)
    return ref.generate(input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=eos,
                        pad_token_id=0, **settings)


def ours(ref, input_ids, mask, max_new_tokens, seed, eos, **settings):
    return generate(ReferenceNetwork(ref), input_ids, mask.bool(), max_new_tokens,
                    DiffusionSampling().replace(**settings), eos, 0, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def confident_ref():
    return tiny_diffusion_gemma(["sliding_attention", "full_attention"], canvas_length=8, sliding_window=6,
                                logit_gain=4.0)


def batch():
    ids = torch.tensor([[0, 0, 0, 11, 12, 13, 14], [21, 22, 23, 24, 25, 26, 27]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    return ids, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_tokens_and_tokens_per_forward_as_the_reference(confident_ref, seed):
    ids, mask = batch()
    with torch.no_grad():
        expected = reference_generate(confident_ref, ids, mask, 24, seed, [1])
        got = ours(confident_ref, ids, mask, 24, seed, [1])
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.allclose(got.tokens_per_forward, expected.tokens_per_forward.float())


def test_early_stop_per_row_matches_the_reference(confident_ref):
    # a loose bound and no stability window: rows stop after a few passes, each at its own step
    ids, mask = batch()
    settings = dict(entropy_bound=2.0, stability_threshold=0, confidence_threshold=1.0)
    with torch.no_grad():
        expected = reference_generate(confident_ref, ids, mask, 24, 0, [1], **settings)
        got = ours(confident_ref, ids, mask, 24, 0, [1], **settings)
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.allclose(got.tokens_per_forward, expected.tokens_per_forward.float())
    assert (got.tokens_per_forward > 1).all()
    assert got.forward_passes[0] != got.forward_passes[1]


def test_eos_pads_the_rest_and_stops_like_the_reference(confident_ref):
    ids, mask = batch()
    with torch.no_grad():
        first = ours(confident_ref, ids, mask, 24, 3, [1]).sequences
        # a token row 0 writes mid-canvas becomes the EOS of the second run
        eos = next(t for t in first[0, ids.shape[1] + 2:].tolist() if t not in (0, 1))
        expected = reference_generate(confident_ref, ids, mask, 24, 3, [eos])
        got = ours(confident_ref, ids, mask, 24, 3, [eos])
    assert torch.equal(got.sequences, expected.sequences)
    row = got.sequences[0, ids.shape[1]:].tolist()
    cut = row.index(eos)
    assert all(t == 0 for t in row[cut + 1:])


def test_other_settings_match_too(confident_ref):
    ids, mask = batch()
    settings = dict(max_denoising_steps=5, entropy_bound=0.5, t_min=0.2, t_max=1.0, stability_threshold=2,
                    confidence_threshold=0.05)
    with torch.no_grad():
        expected = reference_generate(confident_ref, ids, mask, 16, 7, [1], **settings)
        got = ours(confident_ref, ids, mask, 16, 7, [1], **settings)
    assert torch.equal(got.sequences, expected.sequences)


def test_events_describe_each_step(confident_ref):
    ids, mask = batch()
    events = list(generate_steps(ReferenceNetwork(confident_ref), ids, mask.bool(), 16, DiffusionSampling(),
                                 [1], 0, torch.Generator().manual_seed(0)))
    steps = [e for e in events if isinstance(e, DenoisingStep)]
    commits = [e for e in events if isinstance(e, CanvasCommitted)]
    assert [c.canvas for c in commits] == [0, 1]
    assert steps[0].step == 1 and steps[0].draft.shape == (2, 8)
    result = events[-1]
    assert int(result.forward_passes.max()) <= len(steps)
