"""Load a llama.cpp GGUF file as an HF-style Llama checkpoint: config dict, float32 tensors, tokenizer.

The file is memory-mapped with gguf-py's reader, and each tensor is dequantized with `gguf.quants`. Names,
shapes and the Q/K row order are turned back into what transformers' `LlamaForCausalLM` expects.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from canvaslm.checkpoints.tokenizer import Tokenizer
from canvaslm.errors import CheckpointError

GGMLType = gguf.GGMLQuantizationType
SUPPORTED_TYPES = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0,
                             GGMLType.Q4_1, GGMLType.Q4_K, GGMLType.Q6_K})

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


@dataclass
class GGUFCheckpoint:
    """What `load_gguf` returns: everything needed to build and run the model, nothing file-specific."""

    path: Path
    config: dict[str, Any]  # HF config.json-style, for LlamaForCausalLM
    tensors: dict[str, torch.Tensor]  # float32, HF LlamaForCausalLM names
    tokenizer: Tokenizer | None  # None when the file carries no tokenizer
    metadata: dict[str, str]  # the general.* strings: name, organization, license, ...


def load_gguf(path: str | os.PathLike[str]) -> GGUFCheckpoint:
    """Read a Llama-architecture GGUF file; every problem with the file is a CheckpointError naming it."""
    path = Path(path)
    reader = _open(path)
    fields = _decode_fields(path, reader)

    architecture = fields.get("general.architecture")
    if architecture != "llama":
        raise CheckpointError(path, "unsupported model architecture", field="general.architecture",
                              expected='"llama"', found=repr(architecture))

    tensor_names = {tensor.name for tensor in reader.tensors}
    config = _llama_config(path, fields, tensor_names)
    tensors = _load_tensors(path, reader, config)
    tokenizer = Tokenizer.from_gguf_fields(path, fields) if "tokenizer.ggml.model" in fields else None
    metadata = {key: value for key, value in fields.items()
                if key.startswith("general.") and isinstance(value, str)}
    return GGUFCheckpoint(path=path, config=config, tensors=tensors, tokenizer=tokenizer, metadata=metadata)


def load_gguf_tokenizer(path: str | os.PathLike[str]) -> Tokenizer | None:
    """Only the tokenizer of a GGUF file (no tensors are read); None when the file carries none."""
    path = Path(path)
    fields = _decode_fields(path, _open(path))
    return Tokenizer.from_gguf_fields(path, fields) if "tokenizer.ggml.model" in fields else None


class _Reader(gguf.GGUFReader):
    """GGUFReader on a plain ndarray view of its memory map.

    Parsing does hundreds of thousands of tiny slices; on an `np.memmap` each one pays for the subclass'
    bookkeeping (4 s for a 49k-token vocabulary), on a plain view of the same mapped memory it does not.
    """

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._data = value.view(np.ndarray)

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None) -> np.ndarray:
        """gguf-py's `_get` (count values of dtype at offset), without its per-call dtype probe and its byte-order
        view where the file is in this machine's order: called ~250k times for a 49k-token vocabulary, it took
        0.65 of the 2.0 s SmolLM2's GGUF took to open (2-core AMD EPYC)."""
        dtype = np.dtype(dtype)
        count = int(count)
        values = self.data[offset:offset + dtype.itemsize * count].view(dtype)[:count]
        order = self.byte_order if override_order is None else override_order
        return values if order == "I" else values.view(values.dtype.newbyteorder(order))


def _open(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from exc
    if magic != b"GGUF":
        raise CheckpointError(path, "not a GGUF file", field="magic", expected="b'GGUF'", found=repr(magic))
    try:
        return _Reader(path)
    except Exception as exc:  # gguf-py and numpy raise ValueError/IndexError/... for truncated or corrupt files
        raise CheckpointError(path, f"truncated or corrupt GGUF file ({type(exc).__name__}: {exc})") from exc


def _decode_fields(path: Path, reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every metadata key -> its Python value (str, int, float, bool or list)."""
    fields = {}
    for key, field in reader.fields.items():
        try:
            fields[key] = field.contents()
        except (ValueError, UnicodeDecodeError, IndexError) as exc:
            raise CheckpointError(path, f"unreadable metadata value ({exc})", field=key) from exc
    return fields


def _llama_config(path: Path, fields: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    def number(key: str, kind: type[int] | type[float], default: float | None = None) -> Any:
        value = fields.get(key, default)
        if value is None:
            raise CheckpointError(path, "missing required metadata", field=key)
        # bool is an int to Python, and per-layer lists exist for some architectures; neither is usable here
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise CheckpointError(path, "metadata value has the wrong type", field=key, expected=kind.__name__,
                                  found=repr(value))
        return kind(value)

    hidden = number("llama.embedding_length", int)
    heads = number("llama.attention.head_count", int)
    kv_heads = number("llama.attention.head_count_kv", int, heads)
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise CheckpointError(path, "bad attention head counts", field="llama.attention.head_count_kv",
                              expected=f"a positive divisor of head_count {heads}", found=kv_heads)
    rope_theta = number("llama.rope.freq_base", float, 10000.0)  # llama.cpp's default when the file states none
    if "llama.vocab_size" in fields:
        vocab_size = number("llama.vocab_size", int)
    elif "tokenizer.ggml.tokens" in fields:
        vocab_size = len(fields["tokenizer.ggml.tokens"])
    else:
        raise CheckpointError(path, "missing required metadata", field="llama.vocab_size")

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": number("llama.feed_forward_length", int),
        "num_hidden_layers": number("llama.block_count", int),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": number("llama.rope.dimension_count", int, hidden // heads),
        "hidden_act": "silu",
        "rms_norm_eps": number("llama.attention.layer_norm_rms_epsilon", float),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "max_position_embeddings": number("llama.context_length", int),
        "attention_bias": False,
        "mlp_bias": False,
        # llama.cpp writes output.weight only when the head is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{name}" in fields:
            config[key] = number(f"tokenizer.ggml.{name}", int)
    return config


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF name -> torch shape for every tensor a Llama checkpoint must have."""
    hidden, inter, head_dim = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q_rows, kv_rows = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    per_layer = {
        "input_layernorm": (hidden,), "post_attention_layernorm": (hidden,),
        "self_attn.q_proj": (q_rows, hidden), "self_attn.k_proj": (kv_rows, hidden),
        "self_attn.v_proj": (kv_rows, hidden), "self_attn.o_proj": (hidden, q_rows),
        "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter),
    }
    for layer in range(config["num_hidden_layers"]):
        for name, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{name}.weight"] = shape
    return shapes


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"
    return None


def _load_tensors(path: Path, reader: gguf.GGUFReader, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    expected = _expected_shapes(config)
    size = path.stat().st_size
    jobs = []
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None or name not in expected:
            raise CheckpointError(path, "unexpected tensor for a llama model", field=tensor.name)
        if tensor.tensor_type not in SUPPORTED_TYPES:
            raise CheckpointError(path, "unsupported tensor type", field=tensor.name,
                                  expected="one of " + ", ".join(t.name for t in sorted(SUPPORTED_TYPES)),
                                  found=tensor.tensor_type.name)
        if tensor.data_offset + tensor.n_bytes > size:
            raise CheckpointError(path, "file is truncated: tensor data runs past its end", field=tensor.name,
                                  expected=f"{tensor.data_offset + tensor.n_bytes} bytes", found=f"{size} bytes")
        # GGUF lists dimensions fastest-first (ggml's ne); torch wants them slowest-first.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if shape != expected[name]:
            raise CheckpointError(path, "tensor has the wrong shape", field=tensor.name,
                                  expected=expected[name], found=shape)
        jobs.append((name, tensor))

    missing = sorted(set(expected) - {name for name, _ in jobs})
    if missing:
        raise CheckpointError(path, f"{len(missing)} tensors missing", expected=", ".join(missing[:5]))

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    def convert(job: tuple[str, Any]) -> tuple[str, torch.Tensor]:
        name, tensor = job
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except Exception as exc:  # malformed blocks surface as numpy reshape/view errors
            raise CheckpointError(path, f"cannot dequantize ({exc})", field=tensor.name) from exc
        values = values.reshape(expected[name])
        if name.endswith("q_proj.weight"):
            values = _unpermute_rows(values, heads)
        elif name.endswith("k_proj.weight"):
            values = _unpermute_rows(values, kv_heads)
        values = np.asarray(values, dtype=np.float32)
        if not values.flags.writeable:  # F32 tensors come back as read-only views of the mapped file
            values = values.copy()
        return name, torch.from_numpy(values)

    return dict(convert(job) for job in jobs)


def _unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.py `permute`), as transformers does.

    llama.cpp rotates adjacent pairs (x0, x1), HF rotates halves (x0, x_{d/2}); the converter interleaved each
    head's two halves to match, so here the rows of each head go back from (dim/2, 2) to (2, dim/2) order.
    """
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
