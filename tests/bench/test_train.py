"""`canvaslm bench train`: both paths train the same tiny model on the same batches and report comparable tokens/s.
(The speed itself is measured by the command, never by a test; docs/training.md has the numbers.)"""

from __future__ import annotations

import json

import torch

import canvaslm
from canvaslm.bench.train import bench_train
from canvaslm.hardware import bf16_is_fast
from canvaslm.models import llama


def tiny_ar_model(directory) -> str:
    """A tiny random AR Llama with SmolLM2's tokenizer, saved where `canvaslm.load` reads it."""
    torch.manual_seed(0)
    config = llama.Config.from_hf({"model_type": "llama", "vocab_size": 49152, "hidden_size": 32,
                                   "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "num_key_value_heads": 2, "max_position_embeddings": 256, "pad_token_id": 2,
                                   "eos_token_id": 2, "bos_token_id": 1, "tie_word_embeddings": True}, "test")
    canvaslm.LM(llama.Model(config), canvaslm.load("smol-ar").tokenizer, "tiny").save(directory)
    return str(directory)


def test_bench_train_runs_both_paths_on_one_config(tmp_path):
    report = bench_train(tiny_ar_model(tmp_path / "tiny"), steps=2, warmup=1, batch_size=2, canvas=8,
                         prompt_tokens=16, response_tokens=16, lora_rank=2, progress=False)
    json.dumps(report)  # plain JSON
    fp32, fast = report["paths"]["fp32"], report["paths"]["fast"]
    assert fp32["lora_scope"] == "all" and fast["lora_scope"] == "canvas"
    assert not fp32["bf16"] and fast["bf16"] == bf16_is_fast("cpu")
    assert fp32["tokens_per_step"] == fast["tokens_per_step"] > 0  # the same batches
    assert fp32["tokens_per_s"] > 0 and fast["tokens_per_s"] > 0
    assert report["speedup"] == round(fast["tokens_per_s"] / fp32["tokens_per_s"], 2)
    assert report["machine"]["cpu"] and report["objective"]["kind"] == "masked"


def test_bench_train_refuses_bad_step_counts():
    import pytest

    from canvaslm.errors import CanvasError

    with pytest.raises(CanvasError, match="steps >= 1"):
        bench_train("smol-ar", steps=0, progress=False)
