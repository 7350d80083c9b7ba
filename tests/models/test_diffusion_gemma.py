"""canvaslm's DiffusionGemma network against transformers' `DiffusionGemmaForBlockDiffusion` (float32 parity)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from canvaslm.errors import CanvasError, CheckpointError, UnsupportedError
from canvaslm.models import diffusion_gemma as dg
from tests.reference import tiny_diffusion_gemma

S, FULL = "sliding_attention", "full_attention"
VOCAB = 128



def ours_from(ref) -> dg.Model:
    """Our model with the reference's weights (its state dict holds tied copies, lm_head and vision tensors)."""
    config = dg.Config.from_hf(ref.config.to_dict(), "reference")
    with torch.device("meta"):
        model = dg.Model(config)
    model.load_hf_tensors(ref.state_dict(), "reference")
    return model.eval()


class Reference:
    """Drives the reference the way its `generate` does: one DynamicCache, 2-D masks grown with every encoder
    call, shared position ids, mask mappings built by the model's own helpers."""

    def __init__(self, ref, batch_size: int) -> None:
        from transformers import DynamicCache
        self.ref = ref
        self.cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
        self.mask = torch.zeros(batch_size, 0, dtype=torch.bool)

    def encode(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        start = self.mask.shape[1]
        self.mask = torch.cat([self.mask, valid], dim=1)
        positions = torch.arange(start, start + ids.shape[1])[None]
        masks = self.ref.model.encoder.create_masks_for_generate(
            config=self.ref.config, inputs_embeds=torch.empty(*ids.shape, 0), attention_mask=self.mask,
            past_key_values=self.cache, position_ids=positions)
        return self.ref.model.encoder(input_ids=ids, attention_mask=masks, past_key_values=self.cache,
                                      position_ids=positions).last_hidden_state

    def decode(self, canvas: torch.Tensor, sc_logits: torch.Tensor | None) -> torch.Tensor:
        start, length = self.mask.shape[1], canvas.shape[1]
        return self.ref(decoder_input_ids=canvas, past_key_values=self.cache, self_conditioning_logits=sc_logits,
                        decoder_attention_mask=F.pad(self.mask, (0, length), value=True),
                        decoder_position_ids=torch.arange(start, start + length)[None]).logits


def left_padded(lengths: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), n), generator=generator)
    valid = torch.arange(n)[None, :] >= torch.tensor([n - k for k in lengths])[:, None]
    return ids.masked_fill(~valid, 0), valid


def snapshot(cache) -> tuple:
    return (cache.length, cache.valid.clone(), [None if k is None else k.clone() for k in cache.keys],
            [None if v is None else v.clone() for v in cache.values])


def same_snapshot(a: tuple, b: tuple) -> bool:
    def same(x, y) -> bool:
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
    return a[0] == b[0] and torch.equal(a[1], b[1]) and all(map(same, a[2] + a[3], b[2] + b[3]))


@pytest.mark.parametrize("layer_types, canvas, window", [
    ([S, FULL], 8, 4),
    ([S, S, FULL, S, FULL], 4, 3),
    ([FULL, FULL], 16, 4),
])
def test_parity_with_reference(layer_types, canvas, window):
    ref = tiny_diffusion_gemma(layer_types, canvas_length=canvas, sliding_window=window, vocab_size=VOCAB, seed=3)
    model = ours_from(ref)
    g = torch.Generator().manual_seed(0)
    ids, valid = left_padded([9, 5], g)  # both prompts longer than the window: cache truncation matters
    reference = Reference(ref, batch_size=2)
    cache = model.new_cache(2)
    with torch.no_grad():
        hidden_ref, hidden = reference.encode(ids, valid), model.encode(ids, cache, valid)
        torch.testing.assert_close(hidden[valid], hidden_ref[valid], atol=1e-4, rtol=0)
        assert model.logits(hidden).dtype == torch.float32

        first = torch.randint(0, VOCAB, (2, canvas), generator=g)
        sc = 4 * torch.randn(2, canvas, VOCAB, generator=g)
        before = snapshot(cache)
        for sc_logits in (None, sc):
            expected, got = reference.decode(first, sc_logits), model.decode(first, cache, sc_logits)
            assert got.dtype == torch.float32 and got.shape == (2, canvas, VOCAB)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert same_snapshot(before, snapshot(cache)), "decode wrote the cache"

        # the finished canvas is encoded into the cache, then the next canvas is decoded after it
        done = torch.ones(2, canvas, dtype=torch.bool)
        reference.encode(first, done)
        model.encode(first, cache, done)
        assert cache.length == ids.shape[1] + canvas
        second = torch.randint(0, VOCAB, (2, canvas), generator=g)
        torch.testing.assert_close(model.decode(second, cache, sc), reference.decode(second, sc), atol=1e-4, rtol=0)


def test_bfloat16_matches_reference_in_bfloat16(tmp_path):
    """In bf16 we stay as close to the float32 result as transformers' own bf16 model (loaded with
    from_pretrained(dtype=bf16); `.to(bf16)` would also round its RoPE frequencies, which we do not)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    ref = tiny_diffusion_gemma([S, FULL], canvas_length=8, sliding_window=4, vocab_size=VOCAB, seed=4)
    ref.save_pretrained(tmp_path)
    ref16 = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model = ours_from(ref).to(torch.bfloat16)
    ids, valid = left_padded([6, 4], torch.Generator().manual_seed(1))
    canvas = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    expected = []
    cache = model.new_cache(2)
    with torch.no_grad():
        for r in (ref, ref16):
            reference = Reference(r, 2)
            reference.encode(ids, valid)
            expected.append(reference.decode(canvas, None))
        model.encode(ids, cache, valid)
        got = model.decode(canvas, cache)
    exact, bf16 = expected
    assert got.dtype == torch.float32 and cache.keys[0].dtype == torch.bfloat16
    assert (got - exact).abs().mean() <= 1.5 * (bf16 - exact).abs().mean()
    assert (got - bf16).abs().max() < 0.2


def test_full_layers_share_keys_and_values():
    ref = tiny_diffusion_gemma([S, FULL], sliding_window=4, vocab_size=VOCAB)
    model = ours_from(ref)
    sliding, full = model.layers
    assert sliding.self_attn.v_proj is not None and full.self_attn.v_proj is None
    assert not any(".1.self_attn.v_proj" in name for name in model.hf_tensors())
    seen = {}
    full.self_attn.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    cache = model.new_cache(1)
    with torch.no_grad():
        model.encode(torch.randint(3, VOCAB, (1, 5)), cache)
        attn = full.self_attn
        raw_k = attn.k_proj(seen["x"]).view(1, 5, -1, attn.head_dim)  # values: raw k, normed without weight
        torch.testing.assert_close(cache.values[1], dg.rms_norm(raw_k, 1e-6).transpose(1, 2))
    assert attn.head_dim == 16 and cache.values[1].shape[1] == 1  # global head dim and kv heads on full layers

    config = copy.deepcopy(model.config)
    config.attention_k_eq_v = False
    assert dg.Model(config).layers[1].self_attn.v_proj is not None
    with pytest.raises(UnsupportedError):
        config.to_hf()


def test_config_round_trips_through_transformers(tmp_path):
    from transformers import DiffusionGemmaConfig

    ref = tiny_diffusion_gemma([S, S, FULL, S, FULL], canvas_length=4, sliding_window=3, vocab_size=VOCAB)
    config = dg.Config.from_hf(ref.config.to_dict(), "reference")
    assert config.head_dims == [8, 8, 16, 8, 16] and config.kv_heads == [2, 2, 1, 2, 1]
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
    back = DiffusionGemmaConfig.from_pretrained(tmp_path)
    text = back.text_config
    assert text.layer_types == config.layer_types and back.canvas_length == 4 and text.sliding_window == 3
    assert [text.per_layer_config[i].head_dim for i in range(5)] == config.head_dims
    assert [text.per_layer_config[i].num_key_value_heads for i in range(5)] == config.kv_heads
    again = dg.Config.from_hf(back.to_dict(), "again")
    assert {**vars(again), "extra": None} == {**vars(config), "extra": None}


def test_config_derivations_match_transformers():
    """A config.json in the released style (global_head_dim, num_global_key_value_heads, defaults left out)."""
    from transformers import DiffusionGemmaConfig

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=7, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, num_global_key_value_heads=1, num_experts=4, top_k_experts=2,
                moe_intermediate_size=16, use_bidirectional_attention="vision")
    raw = {"model_type": "diffusion_gemma", "text_config": text}
    ours = dg.Config.from_hf(raw, "raw")
    hf = DiffusionGemmaConfig(text_config=dict(text)).text_config
    assert ours.layer_types == hf.layer_types == [S] * 5 + [FULL] * 2  # 5:1 default, last forced to full
    assert ours.head_dims == [hf.per_layer_config[i].head_dim for i in range(7)] == [8] * 5 + [512] * 2
    assert ours.kv_heads == [hf.per_layer_config[i].num_key_value_heads for i in range(7)]
    assert ours.rope_parameters == hf.rope_parameters
    assert (ours.sliding_window, ours.final_logit_softcapping, ours.canvas_length) == (512, 30.0, 256)
    assert (ours.pad_token_id, ours.eos_token_ids, ours.bos_token_id) == (0, [1], 2)


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["text_config"].pop("hidden_size"), "text_config.hidden_size"),
    (lambda d: d["text_config"].update(num_experts="4"), "text_config.num_experts"),
    (lambda d: d["text_config"].update(layer_types=["sideways"]), "text_config.layer_types"),
    (lambda d: d.pop("text_config"), "text_config"),
])
def test_bad_config_names_the_field(edit, field):
    d = tiny_diffusion_gemma([S, FULL], vocab_size=VOCAB).config.to_dict()
    edit(d)
    with pytest.raises(CheckpointError) as e:
        dg.Config.from_hf(d, "/ckpt/config.json")
    assert e.value.field == field and "/ckpt/config.json" in str(e.value) and field in str(e.value)


def test_unsupported_inputs_say_so():
    ref = tiny_diffusion_gemma([S, FULL], vocab_size=VOCAB)
    d = ref.config.to_dict()
    d["text_config"]["use_bidirectional_attention"] = "all"
    with pytest.raises(UnsupportedError, match="bidirectional"):
        dg.Config.from_hf(d, "cfg")
    model = ours_from(ref)
    model.config.image_token_id = 5
    with pytest.raises(UnsupportedError, match="images/video are not supported"):
        model.encode(torch.tensor([[3, 5, 4]]), model.new_cache(1))


def test_tensor_problems_name_the_tensor():
    ref = tiny_diffusion_gemma([S, FULL], vocab_size=VOCAB)
    good = ref.state_dict()
    cases = {
        "missing": ({k: v for k, v in good.items() if "decoder.norm" not in k and "language_model.norm" not in k},
                    "model.decoder.norm.weight"),
        "shape": ({**good, "model.decoder.layers.1.self_attn.q_proj.weight": torch.zeros(3, 32)},
                  "model.decoder.layers.1.self_attn.q_proj.weight"),
        "unknown": ({**good, "model.decoder.layers.9.mlp.up_proj.weight": torch.zeros(1)},
                    "model.decoder.layers.9.mlp.up_proj.weight"),
        "tied copy": ({**good, "lm_head.weight": torch.zeros(VOCAB, 32)}, "lm_head.weight"),
    }
    for problem, (tensors, name) in cases.items():
        with torch.device("meta"):
            model = dg.Model(dg.Config.from_hf(ref.config.to_dict(), "cfg"))
        with pytest.raises(CanvasError) as e:
            model.load_hf_tensors(tensors, "/ckpt/model.safetensors")
        assert name in str(e.value) and "/ckpt/model.safetensors" in str(e.value), problem
