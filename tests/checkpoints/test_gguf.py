"""load_gguf: the real SmolLM2 file against transformers' GGUF loader, synthetic files per tensor type, bad files."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from canvaslm.checkpoints.gguf import GGUFCheckpoint, load_gguf, load_gguf_tokenizer
from canvaslm.errors import CanvasError, CheckpointError
from canvaslm.loading.registry import smollm2_gguf

Q = gguf.GGMLQuantizationType


# ---------------------------------------------------------------- the real SmolLM2 file


@pytest.fixture(scope="module")
def real_path() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="module")
def checkpoint(real_path: Path) -> GGUFCheckpoint:
    return load_gguf(real_path)


@pytest.fixture(scope="module")
def reference(real_path: Path) -> tuple[object, dict[str, torch.Tensor]]:
    """transformers' config and tensors for the file.

    `LlamaForCausalLM.from_pretrained(dir, gguf_file=...)` needs `accelerate` only to place the weights; for a
    llama GGUF it gets them from `load_gguf_checkpoint` (dequantization + q/k un-permutation), called here.
    """
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with pytest.MonkeyPatch.context() as patch:
        # Speed only: gguf-py's tensor-name table built once instead of once per submodule.
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        config = transformers.AutoConfig.from_pretrained(real_path.parent, gguf_file=real_path.name)
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config)
        tensors = load_gguf_checkpoint(str(real_path), return_tensors=True, model_to_load=model)["tensors"]
    return config, tensors


def test_real_tensors_match_transformers(checkpoint: GGUFCheckpoint, reference) -> None:
    _, expected = reference
    assert set(checkpoint.tensors) == set(expected)
    assert "lm_head.weight" not in checkpoint.tensors  # tied: the file has no output.weight
    for name, tensor in checkpoint.tensors.items():
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == expected[name].shape, name
        assert (tensor - expected[name].float()).abs().max().item() <= 1e-6, name


def test_real_config_matches_transformers(checkpoint: GGUFCheckpoint, reference) -> None:
    config, _ = reference
    ours = checkpoint.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "model_type"):
        assert ours[key] == getattr(config, key), key
    assert ours["rms_norm_eps"] == pytest.approx(config.rms_norm_eps)
    assert ours["rope_parameters"] == config.rope_parameters
    assert ours["rope_theta"] == config.rope_parameters["rope_theta"] == 100000.0
    assert checkpoint.metadata["general.architecture"] == "llama"
    assert checkpoint.metadata["general.name"] == config._model_name_or_path


def test_real_config_builds_the_model(checkpoint: GGUFCheckpoint) -> None:
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**checkpoint.config))
    assert set(model.state_dict()) - {"lm_head.weight"} == set(checkpoint.tensors)


def test_real_tokenizer_is_loaded(checkpoint: GGUFCheckpoint) -> None:
    assert checkpoint.tokenizer is not None
    assert checkpoint.tokenizer.eos_token_ids == [2, 0]
    assert checkpoint.tokenizer.chat_template is not None


# ---------------------------------------------------------------- synthetic files, one per tensor type

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 256, 256, 4, 2, 64  # 256: one K-quant super-block per row
HEAD_DIM = HIDDEN // HEADS

# max |loaded - original| allowed, as a fraction of the tensor's max |value| (Q4_0: a block's extreme value of
# the sign opposite to its scale is clipped by up to one step, max/8)
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 1e-2, Q.Q4_0: 0.13, Q.Q4_1: 0.08, Q.Q4_K: 0.1,
             Q.Q6_K: 0.04}


def _tiny_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """GGUF name -> float32 weights in torch order, for a one-layer llama."""
    rng = np.random.default_rng(seed)
    shapes = {
        "token_embd.weight": (VOCAB, HIDDEN), "output.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,),
        "blk.0.attn_norm.weight": (HIDDEN,), "blk.0.ffn_norm.weight": (HIDDEN,),
        "blk.0.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN), "blk.0.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN), "blk.0.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
        "blk.0.ffn_gate.weight": (INTER, HIDDEN), "blk.0.ffn_up.weight": (INTER, HIDDEN),
        "blk.0.ffn_down.weight": (HIDDEN, INTER),
    }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _llama_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of Q/K rows."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def _quantize(values: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.Q4_K:
        return _quantize_q4_k(values)
    if qtype == Q.Q6_K:
        return _quantize_q6_k(values)
    return gguf.quants.quantize(values, qtype)


def _quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """Valid Q4_K blocks (gguf-py cannot write them): per 32 values x ~= d*sc*q - dmin*m, q 4 bits, sc/m 6 bits."""
    rows = values.reshape(-1, 8, 32)  # super-blocks of 8 sub-blocks
    low = np.minimum(rows.min(axis=-1), 0.0)
    scale = (rows.max(axis=-1) - low) / 15
    d = scale.max(axis=-1, keepdims=True) / 63
    dmin = (-low).max(axis=-1, keepdims=True) / 63
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    sc = np.clip(np.round(scale / np.where(d16 == 0, 1, d16.astype(np.float32))), 0, 63).astype(np.uint8)
    m = np.clip(np.round(-low / np.where(dmin16 == 0, 1, dmin16.astype(np.float32))), 0, 63).astype(np.uint8)
    step = (d16.astype(np.float32) * sc)[..., None]
    offset = (dmin16.astype(np.float32) * m)[..., None]
    q = np.clip(np.round((rows + offset) / np.where(step == 0, 1, step)), 0, 15).astype(np.uint8)
    # 12 scale bytes: low 6 bits of sc[0:4] / m[0:4], then sc[4:8] and m[4:8] split into nibbles + 2 high bits
    scales = np.concatenate([
        sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
        m[:, :4] | ((m[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4),
    ], axis=-1)
    # 128 bytes: each 32-byte chunk holds sub-block 2c in the low nibbles and 2c+1 in the high ones
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d16.view(np.uint8), dmin16.view(np.uint8), scales, qs], axis=-1)
    return blocks.reshape(values.shape[0], -1)


def _quantize_q6_k(values: np.ndarray) -> np.ndarray:
    """Valid Q6_K blocks (gguf-py cannot write them): per 16 values x ~= d*sc*(q-32), q 6 bits, sc int8."""
    rows = values.reshape(-1, 16, 16)
    scale = np.abs(rows).max(axis=-1) / 31
    d16 = (scale.max(axis=-1, keepdims=True) / 127).astype(np.float16)
    sc = np.clip(np.round(scale / np.where(d16 == 0, 1, d16.astype(np.float32))), -128, 127).astype(np.int8)
    step = (d16.astype(np.float32) * sc)[..., None]
    q = (np.clip(np.round(rows / np.where(step == 0, 1, step)), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)
    # per 128-value half: ql has values 0..63 in low nibbles and 64..127 in high ones;
    # qh has the 2 high bits of values 32k..32k+31 at bit 2k
    ql = (q[..., :64] & 0x0F) | ((q[..., 64:] & 0x0F) << 4)
    high = (q >> 4).reshape(-1, 2, 4, 32)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    blocks = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d16.view(np.uint8)],
                            axis=-1)
    return blocks.reshape(values.shape[0], -1)


def _write_tiny(path: Path, weights: dict[str, np.ndarray], qtype: Q = Q.F32, *, arch: str = "llama",
                skip_keys: tuple[str, ...] = (), tokenizer_model: str | None = None,
                merges: tuple[str, ...] = ("a b",), kv_heads: int | list[int] = KV_HEADS) -> Path:
    """A one-layer llama GGUF: 2-D weights stored as `qtype` (Q/K permuted like llama.cpp does), norms F32."""
    writer = gguf.GGUFWriter(path, arch=arch)
    keys = {
        "block_count": lambda: writer.add_block_count(1),
        "context_length": lambda: writer.add_context_length(128),
        "embedding_length": lambda: writer.add_embedding_length(HIDDEN),
        "feed_forward_length": lambda: writer.add_feed_forward_length(INTER),
        "head_count": lambda: writer.add_head_count(HEADS),
        "head_count_kv": lambda: writer.add_head_count_kv(kv_heads),
        "rms_eps": lambda: writer.add_layer_norm_rms_eps(1e-5),
        "rope_freq_base": lambda: writer.add_rope_freq_base(50000.0),
        "vocab_size": lambda: writer.add_vocab_size(VOCAB),
    }
    for key, add in keys.items():
        if key not in skip_keys:
            add()
    writer.add_name("tiny")
    if tokenizer_model is not None:
        tokens = [chr(c) for c in range(ord("a"), ord("a") + VOCAB - 3)] + ["ab", "<s>", "</s>"]
        writer.add_tokenizer_model(tokenizer_model)
        writer.add_token_list(tokens)
        writer.add_token_merges(merges)
        writer.add_token_types([1] * (VOCAB - 2) + [3, 3])
        writer.add_bos_token_id(VOCAB - 2)
        writer.add_eos_token_id(VOCAB - 1)
    for name, values in weights.items():
        if name.endswith("attn_q.weight"):
            values = _llama_permute(values, HEADS)
        elif name.endswith("attn_k.weight"):
            values = _llama_permute(values, KV_HEADS)
        if values.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(name, values)
        else:
            writer.add_tensor(name, _quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight", "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
    "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
    "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
    "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
    "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
    "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
    "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
    "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
    "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
}


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_synthetic_tensor_types(tmp_path: Path, qtype: Q) -> None:
    weights = _tiny_weights()
    loaded = load_gguf(_write_tiny(tmp_path / f"tiny-{qtype.name}.gguf", weights, qtype))
    assert set(loaded.tensors) == set(HF_NAMES.values())
    for gguf_name, original in weights.items():
        tensor = loaded.tensors[HF_NAMES[gguf_name]]
        assert tensor.dtype == torch.float32 and tuple(tensor.shape) == original.shape, gguf_name
        error = np.abs(tensor.numpy() - original)
        tolerance = 0.0 if original.ndim == 1 else TOLERANCE[qtype]
        assert error.max() <= tolerance * np.abs(original).max(), (gguf_name, error.max())
        if tolerance:  # errors spread like rounding noise, not like a wrong layout
            assert error.mean() <= tolerance * np.abs(original).max() / 3, (gguf_name, error.mean())


def test_synthetic_config_and_tokenizer(tmp_path: Path) -> None:
    loaded = load_gguf(_write_tiny(tmp_path / "tiny.gguf", _tiny_weights(), tokenizer_model="gpt2"))
    config = loaded.config
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (256, 4, 2)
    assert config["head_dim"] == 64 and config["rope_theta"] == 50000.0 and config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"]) == (VOCAB - 2, VOCAB - 1)
    assert "pad_token_id" not in config
    assert loaded.metadata["general.name"] == "tiny"
    tokenizer = loaded.tokenizer
    assert tokenizer is not None and tokenizer.encode("abc</s>") == [VOCAB - 3, 2, VOCAB - 1]
    assert tokenizer.decode([VOCAB - 3, 2, VOCAB - 1]) == "abc"
    assert tokenizer.eos_token_ids == [VOCAB - 1] and tokenizer.chat_template is None


def test_synthetic_without_tokenizer(tmp_path: Path) -> None:
    path = _write_tiny(tmp_path / "tiny.gguf", _tiny_weights())
    assert load_gguf(path).tokenizer is None
    assert load_gguf_tokenizer(path) is None


# ---------------------------------------------------------------- bad input


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="not a GGUF file") as info:
        load_gguf(path)
    assert str(path) in str(info.value) and "magic" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_gguf(tmp_path / "absent.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.02], ids=["tensor-data", "header"])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    whole = _write_tiny(tmp_path / "whole.gguf", _tiny_weights(), Q.Q8_0, tokenizer_model="gpt2").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(whole[: int(len(whole) * keep)])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_gguf(path)
    assert str(path) in str(info.value)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = _write_tiny(tmp_path / "qwen.gguf", _tiny_weights(), arch="qwen2")
    with pytest.raises(CheckpointError, match="general.architecture") as info:
        load_gguf(path)
    message = str(info.value)
    assert str(path) in message and '"llama"' in message and "qwen2" in message


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    path = _write_tiny(tmp_path / "q5.gguf", _tiny_weights(), Q.Q5_0)
    with pytest.raises(CheckpointError, match="unsupported tensor type") as info:
        load_gguf(path)
    message = str(info.value)
    assert str(path) in message and "token_embd.weight" in message and "Q5_0" in message


def test_missing_required_metadata(tmp_path: Path) -> None:
    path = _write_tiny(tmp_path / "nolayers.gguf", _tiny_weights(), skip_keys=("block_count",))
    with pytest.raises(CheckpointError, match="llama.block_count") as info:
        load_gguf(path)
    assert str(path) in str(info.value)


def test_metadata_of_the_wrong_type(tmp_path: Path) -> None:
    path = _write_tiny(tmp_path / "perlayer.gguf", _tiny_weights(), kv_heads=[KV_HEADS])  # a per-layer list
    with pytest.raises(CheckpointError, match="llama.attention.head_count_kv") as info:
        load_gguf(path)
    assert str(path) in str(info.value)


def test_missing_tensor(tmp_path: Path) -> None:
    weights = _tiny_weights()
    del weights["blk.0.ffn_up.weight"]
    with pytest.raises(CheckpointError, match="up_proj"):
        load_gguf(_write_tiny(tmp_path / "noup.gguf", weights))


def test_unsupported_tokenizer_model(tmp_path: Path) -> None:
    path = _write_tiny(tmp_path / "spm.gguf", _tiny_weights(), tokenizer_model="llama")
    with pytest.raises(CanvasError, match="tokenizer.ggml.model") as info:
        load_gguf(path)
    assert str(path) in str(info.value)


def test_tokenizer_merges_outside_vocabulary(tmp_path: Path) -> None:
    path = _write_tiny(tmp_path / "badmerge.gguf", _tiny_weights(), tokenizer_model="gpt2", merges=("b c",))
    with pytest.raises(CheckpointError, match="tokenizer.ggml.merges") as info:
        load_gguf(path)
    assert str(path) in str(info.value)


def test_real_file_truncated(real_path: Path, tmp_path: Path) -> None:
    path = tmp_path / os.path.basename(real_path)
    with open(real_path, "rb") as src:
        path.write_bytes(src.read(os.path.getsize(real_path) // 2))
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_gguf(path)
    assert str(path) in str(info.value)
