"""Tiny random DiffusionGemma checkpoints built with the transformers reference, shared by the tests."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=2, head_dim=8, patch_size=4,
                   position_embedding_size=64)


def tiny_diffusion_gemma(layer_types: list[str], canvas_length: int = 8, sliding_window: int = 8,
                         vocab_size: int = 128, logit_gain: float = 1.0, seed: int = 0):
    """A reference `DiffusionGemmaForBlockDiffusion` with every parameter and buffer randomised.

    `logit_gain` scales the tied embedding so that the decoder is confident (peaked logits), which makes the
    entropy-bound sampler accept many tokens per step and the stop test fire, as a trained model does."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=len(layer_types),
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
                num_global_key_value_heads=1, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
                sliding_window=sliding_window, layer_types=list(layer_types), max_position_embeddings=512,
                pad_token_id=0, eos_token_id=1, bos_token_id=2)
    config = DiffusionGemmaConfig(text_config=text, vision_config=TINY_VISION, canvas_length=canvas_length)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision" in name:
                continue
            if name.endswith("norm.weight") or name.endswith("scale"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand_like(b))
        model.model.decoder.embed_tokens.weight.mul_(logit_gain)
    return model


def save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                 "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def tiny_tokenizer(vocab_size: int):
    """A small BPE tokenizer (pad 0, eos 1, bos 2) with a chat template, trained on a few sentences."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from canvaslm.checkpoints.tokenizer import Tokenizer

    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
              "a canvas of tokens is denoised in parallel", "user model system 0123456789"] * 4
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    return Tokenizer(backend, source="tiny", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                     unk_token="<unk>", chat_template=CHAT_TEMPLATE, add_bos_token=True)


def tiny_checkpoint(path: Path, layer_types=("sliding_attention", "full_attention"), canvas_length: int = 8,
                    logit_gain: float = 4.0):
    """Write a tiny reference DiffusionGemma plus a matching tokenizer to `path`; returns the reference model."""
    model = tiny_diffusion_gemma(list(layer_types), canvas_length=canvas_length, sliding_window=6,
                                 logit_gain=logit_gain)
    model.save_pretrained(path)
    tokenizer = tiny_tokenizer(model.config.text_config.vocab_size)
    assert tokenizer.vocab_size <= model.config.text_config.vocab_size
    tokenizer.to_dir(path)
    return model


def tiny_smol_diffusion(canvas_length: int, layers: int = 2, max_positions: int = 1024):
    """A tiny random Llama in block-diffusion mode with SmolLM2's real tokenizer (49,152 ids), as a `canvaslm.LM`:
    for features that need a real vocabulary (JSON punctuation, whitespace tokens) but not a trained model."""
    import canvaslm
    from canvaslm.models import llama

    torch.manual_seed(0)
    config = llama.Config.from_hf({"model_type": "llama", "vocab_size": 49152, "hidden_size": 32,
                                   "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
                                   "num_key_value_heads": 2, "max_position_embeddings": max_positions,
                                   "pad_token_id": 2, "eos_token_id": 2, "bos_token_id": 1,
                                   "tie_word_embeddings": True}, "test")
    network = llama.Model(config).to_diffusion(canvas_length)
    return canvaslm.LM(network, canvaslm.load("smol-ar").tokenizer, "tiny random diffusion model")
