"""Llama-family decoder (Llama, Qwen2, Mistral) as an autoregressive model or as a block-diffusion model.

One set of weights serves both modes. `forward` is the plain causal LM. In diffusion mode (`canvas_length` set)
`encode` is the same causal pass writing the KV cache and `decode` denoises a canvas bidirectionally on top of
the cache, its input embeddings nudged by a self-conditioning block fed with the previous step's logits. That
block's output projection starts at zero, so `to_diffusion` turns an AR model into a diffusion model that
initially computes exactly what the AR model computes.

Module names mirror transformers' LlamaForCausalLM without the `model.` prefix, so tensors load by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from canvaslm.errors import CheckpointError, GenerationError
from canvaslm.models import embedding
from canvaslm.models.cache import KVCache, attend, decoder_mask, encoder_mask, pass_mask
from canvaslm.models.lora import LoRALinear, adapters_of, set_canvas_pass
from canvaslm.models.masks import (
    block_diffusion_mask,
    causal_mask,
    check_training_inputs,
)
from canvaslm.models.quant import (
    BOUND_LAYERS,
    PackedWeight,
    dense_linears,
    fused_outputs,
    head_logits,
    packed_weight,
)

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
ARCHITECTURE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
DIFFUSION_ARCHITECTURE = "LlamaForBlockDiffusion"
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# transformers' defaults for keys a config.json may omit, per model_type
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2, "sliding_window": None},
    "qwen2": {"max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None, "sliding_window": 4096},
    "mistral": {"max_position_embeddings": 131072, "bos_token_id": 1, "eos_token_id": 2, "sliding_window": 4096},
}


@dataclass
class Config:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str                   # "default" or "llama3"
    rope_scaling: dict[str, float]   # llama3 only: LLAMA3_ROPE_KEYS
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool             # q/k/v projections
    attention_out_bias: bool         # o_proj (Llama's attention_bias covers it, Qwen2's q/k/v bias does not)
    mlp_bias: bool
    hidden_act: str
    sliding_window: int | None
    layer_types: list[str]           # per layer: "full_attention" or "sliding_attention"
    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None
    canvas_length: int | None = None  # None: plain AR model; set: block-diffusion mode
    canvas_shift: bool = False        # trained with the shift trick: canvas token i read from output i - 1
    mask_token_id: int | None = None  # absorbing-state (masked) diffusion: noise is this token, not uniform
    canvas_adapters: bool = False     # LoRA adapters act in the canvas pass only: the causal pass is the AR parent
    canvas_grid: list[int] | None = None  # [rows, cols, box_rows, box_cols]: the canvas is a grid (see GridEmbedding)
    canvas_grid_attention: bool = False   # ... and each attention head has a learned bias per relation of two cells

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], path: object) -> Config:
        """Read an HF config.json dict (model_type llama, qwen2 or mistral); unknown keys are ignored."""
        get = _reader(d, path)
        model_type = get("model_type", str, "llama")
        if model_type not in ARCHITECTURE:
            raise CheckpointError(path, "unsupported model type", field="model_type",
                                  expected=" or ".join(ARCHITECTURE), found=model_type)
        defaults = DEFAULTS[model_type]
        sizes = {key: get(key, int) for key in ("vocab_size", "hidden_size", "intermediate_size",
                                                 "num_hidden_layers", "num_attention_heads")}
        for key, value in sizes.items():
            if value < 1:
                raise CheckpointError(path, "bad model size", field=key, expected="an integer > 0", found=value)
        layers, heads = sizes["num_hidden_layers"], sizes["num_attention_heads"]
        hidden_act = get("hidden_act", str, "silu")
        if hidden_act not in ACTIVATIONS:
            raise CheckpointError(path, "unsupported activation", field="hidden_act",
                                  expected=" or ".join(ACTIVATIONS), found=hidden_act)
        sliding_window = get("sliding_window", int, defaults["sliding_window"])
        if model_type == "llama" or (model_type == "qwen2" and not get("use_sliding_window", bool, False)):
            sliding_window = None
        layer_types = ["sliding_attention" if sliding_window else "full_attention"] * layers
        if sliding_window and model_type == "qwen2":  # Qwen2 slides from layer max_window_layers on, or as listed
            first = get("max_window_layers", int, 28)
            layer_types = get("layer_types", list, None) or [layer_types[0] if i >= first else "full_attention"
                                                              for i in range(layers)]
            if len(layer_types) != layers or not set(layer_types) <= {"full_attention", "sliding_attention"}:
                raise CheckpointError(path, "bad layer types", field="layer_types", found=layer_types,
                                      expected=f"{layers} of full_attention / sliding_attention")
        eos = get("eos_token_id", (int, list), defaults["eos_token_id"])
        llama_bias = model_type == "llama" and get("attention_bias", bool, False)  # Mistral has no biases at all
        canvas_length = get("canvas_length", int, None)
        if canvas_length is not None and canvas_length < 1:
            raise CheckpointError(path, "bad canvas length", field="canvas_length", expected="> 0", found=canvas_length)
        rope_theta, rope_type, rope_scaling = _rope_settings(get, d, path)
        canvas_grid = get("canvas_grid", list, None)
        if canvas_grid is not None:
            _check_grid(canvas_grid, canvas_length, path)
        return cls(
            model_type=model_type,
            **sizes,
            num_key_value_heads=get("num_key_value_heads", int, None) or heads,
            head_dim=get("head_dim", int, None) or sizes["hidden_size"] // heads,
            rms_norm_eps=get("rms_norm_eps", float, 1e-6),
            rope_theta=rope_theta,
            rope_type=rope_type,
            rope_scaling=rope_scaling,
            max_position_embeddings=get("max_position_embeddings", int, defaults["max_position_embeddings"]),
            tie_word_embeddings=get("tie_word_embeddings", bool, False),
            attention_bias=model_type == "qwen2" or llama_bias,
            attention_out_bias=llama_bias,
            mlp_bias=model_type == "llama" and get("mlp_bias", bool, False),
            hidden_act=hidden_act,
            sliding_window=sliding_window,
            layer_types=layer_types,
            bos_token_id=get("bos_token_id", int, defaults["bos_token_id"]),
            eos_token_ids=[] if eos is None else [eos] if isinstance(eos, int) else eos,
            pad_token_id=get("pad_token_id", int, None),
            canvas_length=canvas_length,
            canvas_shift=get("canvas_shift", bool, False),
            mask_token_id=get("mask_token_id", int, None),
            canvas_adapters=get("canvas_adapters", bool, False),
            canvas_grid=canvas_grid,
            canvas_grid_attention=canvas_grid is not None and get("canvas_grid_attention", bool, False),
        )

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict this config was read from (transformers 5 layout)."""
        d: dict[str, Any] = {
            "architectures": [DIFFUSION_ARCHITECTURE if self.canvas_length else ARCHITECTURE[self.model_type]],
            "model_type": self.model_type,
        }
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                     "tie_word_embeddings", "hidden_act", "bos_token_id", "pad_token_id"):
            d[name] = getattr(self, name)
        d["rope_theta"] = self.rope_theta
        d["rope_parameters"] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **self.rope_scaling}
        d["eos_token_id"] = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
        if self.model_type == "llama":
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        else:
            d.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                     layer_types=list(self.layer_types))
        if self.canvas_length:
            d["canvas_length"] = self.canvas_length
            d.update({"canvas_shift": True} if self.canvas_shift else {})
            d.update({} if self.mask_token_id is None else {"mask_token_id": self.mask_token_id})
            d.update({"canvas_adapters": True} if self.canvas_adapters else {})
            d.update({} if self.canvas_grid is None else {"canvas_grid": list(self.canvas_grid)})
            d.update({"canvas_grid_attention": True} if self.canvas_grid_attention else {})
        return d

    def windows(self) -> list[int | None]:
        """Attention window of each layer (None: full attention)."""
        return [self.sliding_window if t == "sliding_attention" else None for t in self.layer_types]


def _check_grid(grid: list[Any], canvas_length: int | None, path: object) -> None:
    """canvas_grid = [rows, cols, box_rows, box_cols]: a canvas of rows x cols cells cut into boxes."""
    ok = len(grid) == 4 and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in grid)
    if not ok or grid[0] % grid[2] or grid[1] % grid[3]:
        raise CheckpointError(path, "bad canvas grid", field="canvas_grid", found=grid,
                              expected="[rows, cols, box_rows, box_cols]: positive integers, boxes tiling the grid")
    if canvas_length != grid[0] * grid[1]:
        raise CheckpointError(path, "the canvas grid does not match the canvas", field="canvas_grid", found=grid,
                              expected=f"rows x cols = canvas_length ({canvas_length})")


_REQUIRED = object()


def _reader(d: Mapping[str, Any], path: object) -> Callable[..., Any]:
    """`get(key, type, default)`: a typed config.json lookup whose failures name the field; no default = required."""

    def get(key: str, kind: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
        value = d.get(key)
        if value is None:
            if default is _REQUIRED:
                raise CheckpointError(path, "missing config key", field=key, expected=_name(kind), found="nothing")
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)  # JSON writes 10000.0 as 10000
        if isinstance(value, list) and int in kinds and not all(type(v) is int for v in value):
            ok = False  # a list of token ids
        if not ok:
            raise CheckpointError(path, "config value has the wrong type", field=key, expected=_name(kind),
                                  found=f"{type(value).__name__} {value!r}")
        return value

    return get


def _name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))


def _rope_settings(get: Callable[..., Any], d: Mapping[str, Any], path: object) -> tuple[float, str, dict[str, float]]:
    """(theta, type, llama3 parameters) from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    params = get("rope_parameters", dict, None) or get("rope_scaling", dict, None) or {}
    rope_theta = params.get("rope_theta") or get("rope_theta", float, 10000.0)
    if not isinstance(rope_theta, (int, float)) or isinstance(rope_theta, bool):
        raise CheckpointError(path, "config value has the wrong type", field="rope_parameters.rope_theta",
                              expected="float", found=repr(rope_theta))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(rope_theta), rope_type, {}
    if rope_type != "llama3":
        raise CheckpointError(path, "unsupported RoPE scaling", field="rope_type", expected="default or llama3",
                              found=rope_type)
    scaling = dict(params)
    if d.get("original_max_position_embeddings") is not None:  # transformers lets the top-level key win
        scaling["original_max_position_embeddings"] = d["original_max_position_embeddings"]
    scaling.setdefault("original_max_position_embeddings", get("max_position_embeddings", int, 2048))
    missing = [k for k in LLAMA3_ROPE_KEYS if not isinstance(scaling.get(k), (int, float))]
    if missing:
        raise CheckpointError(path, "llama3 RoPE scaling is incomplete", field=f"rope_parameters.{missing[0]}",
                              expected="a number", found=scaling.get(missing[0]))
    return float(rope_theta), rope_type, {k: scaling[k] for k in LLAMA3_ROPE_KEYS}


def rope_inv_freq(config: Config) -> Tensor:
    """Inverse frequencies [head_dim / 2], float32 on CPU, computed as transformers does (incl. llama3 scaling)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    if config.rope_type != "llama3":
        return inv_freq
    s = config.rope_scaling
    factor, old_len = s["factor"], s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / s["low_freq_factor"], old_len / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)  # long waves: divide by factor
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled  # medium waves: interpolate
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, h, n, D] by cos/sin [n, D] (the rotate-half layout of HF checkpoints)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of x [..., H] scaled by weight [H]. transformers' x.float() * rsqrt(mean(x^2) + eps), rounded to x's
    dtype, is torch's fused op, which works in float32 inside: bit-equal on the CPU (bfloat16 and float32), one op
    instead of seven."""
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    FUSED = ("gate_up",)  # `canvaslm.models.quant.quantize` packs gate and up as one weight

    def __init__(self, config: Config, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        gate, up = fused_outputs(self, "gate_up", x) or (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.act(gate) * up)


class SelfConditioning(MLP):
    """Adds down(act(gate(n)) * up(n)), n = pre_norm(soft embeddings of the previous step), to the canvas embeddings.

    No post norm (unlike DiffusionGemma's): with down_proj at zero the block is an exact identity."""

    def __init__(self, config: Config) -> None:
        super().__init__(config, bias=False)
        self.pre_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._zero: tuple[tuple[tuple[int, int], ...], bool] | None = None  # see `adds_nothing`
        self.reset()

    def reset(self) -> None:
        """Untrained, the block must add nothing: a model trained without self-conditioning still receives the
        previous step's logits when it samples, and a random block would add noise it never saw."""
        nn.init.zeros_(self.down_proj.weight)

    def adds_nothing(self) -> bool:
        """Whether a pass without gradients may skip the block, and the softmax and embedding product that feed it:
        its down_proj is still zero (a model trained without self-conditioning, such as `smol`), so it adds
        exactly 0. That work is ~12% of a 16-token canvas pass of SmolLM2 on a CPU. With gradients it runs: its
        down_proj learns from that zero. The answer is kept per weight version, so a training step or a load
        that changes the weight is seen, and an accelerator is not synced on every pass."""
        down = self.down_proj
        if torch.is_grad_enabled() or not isinstance(down, (nn.Linear, LoRALinear)):
            return False
        # an adapter adds B @ A, zero while B is (canvas adapters trained without self-conditioning: smol's)
        parts = (down.base.weight, down.lora_B) if isinstance(down, LoRALinear) else (down.weight,)
        if any(p.is_inference() for p in parts):
            # weights loaded under torch.inference_mode carry no version counter: look at them on every pass
            return not any(bool(p.any()) for p in parts)
        key = tuple((p.data_ptr(), p._version) for p in parts)
        if self._zero is None or self._zero[0] != key:
            self._zero = key, not any(bool(p.any()) for p in parts)
        return self._zero[1]

    def forward(self, embeds: Tensor, soft_embeds: Tensor) -> Tensor:  # [B, C, H] both
        return embeds + super().forward(self.pre_norm(soft_embeds))


class GridEmbedding(nn.Module):
    """Where a cell sits in a grid-shaped canvas (a Sudoku), told to the model two ways.

    * Learned row, column and box embeddings added to the canvas's input embeddings.
    * With `canvas_grid_attention`, a learned attention bias per layer and head for each relation of two cells
      (same row? same column? same box? — 8 combinations) added to the canvas-to-canvas attention scores: a head
      can attend to a cell's row, column or box peers from the first step of training, which query-key matching
      of embeddings must learn. The biases start at zero; layers x heads x 8 parameters."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        assert config.canvas_grid is not None
        rows, cols, box_rows, box_cols = config.canvas_grid
        self.row = embedding(rows, config.hidden_size)
        self.col = embedding(cols, config.hidden_size)
        self.box = embedding(rows // box_rows * (cols // box_cols), config.hidden_size)
        self.relation_bias = (nn.Parameter(torch.zeros(config.num_hidden_layers, config.num_attention_heads, 8))
                              if config.canvas_grid_attention else None)
        self.shape = (rows, cols, box_rows, box_cols)

    def _cells(self) -> tuple[Tensor, Tensor, Tensor]:
        rows, cols, box_rows, box_cols = self.shape
        cell = torch.arange(rows * cols, device=self.row.weight.device)
        row, col = cell // cols, cell % cols
        return row, col, row // box_rows * (cols // box_cols) + col // box_cols

    def forward(self) -> Tensor:  # [C, H]
        row, col, box = self._cells()
        return self.row(row) + self.col(col) + self.box(box)

    def attention_bias(self, layer: int, mask: Tensor | None, queries: int, keys: int, dtype: torch.dtype
                       ) -> Tensor | None:
        """The decoder mask of `layer` [B, 1, R, keys] bool (None: all allowed; R = `queries`, a multiple of the
        canvas; the canvas's own keys are the last R) as an additive float mask [B or 1, heads, R, keys] with
        each head's relation bias on the canvas-to-canvas scores (cells compared within their canvas); the mask
        as it is without `canvas_grid_attention`."""
        if self.relation_bias is None:
            return mask
        row, col, box = self._cells()
        relation = ((row[:, None] == row) * 4 + (col[:, None] == col) * 2 + (box[:, None] == box)).long()  # [C, C]
        cells = len(row)
        tiled = relation.repeat(queries // cells, queries // cells)                                  # [R, R]
        bias = F.pad(self.relation_bias[layer][:, tiled], (keys - queries, 0))                      # [h, R, keys]
        if mask is None:
            return bias[None].to(dtype)
        return bias.to(dtype).masked_fill(~mask, float("-inf"))


class Attention(nn.Module):
    FUSED = ("qkv",)  # `canvaslm.models.quant.quantize` packs q, k and v as one weight

    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = (
            layer, config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        hidden, q_out, kv_out = config.hidden_size, self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_out, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, kv_out, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, kv_out, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_out, hidden, bias=config.attention_out_bias)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache, mask: Tensor | None,
                write: bool) -> Tensor:
        """x [B, n, H] -> [B, n, H]. `write`: append k/v to the cache (encoder); else only read it (decoder)."""
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        # q and k rotate as one tensor (the fused weight writes them side by side): half the rotation's small ops
        qk, v = fused_outputs(self, "qkv", x, [(heads + kv_heads) * dim, kv_heads * dim]) or (
            torch.cat([self.q_proj(x), self.k_proj(x)], dim=-1), self.v_proj(x))
        return self.o_proj(attention(qk, v, rope, cache, self.layer, mask, write, heads, kv_heads, dim))


def attention(qk: Tensor, v: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache, layer: int, mask: Tensor | None,
              write: bool, heads: int, kv_heads: int, dim: int) -> Tensor:
    """One layer's attention from its projections, qk [B, n, (h + hkv) * D] (q then k) and v [B, n, hkv * D]:
    q and k rotated, k/v appended to the cache (`write`, the encoder) or read after it (the decoder), then
    grouped-query attention -> [B, n, h * D], o_proj's input."""
    b, n, _ = qk.shape
    qk = apply_rope(qk.reshape(b, n, heads + kv_heads, dim).transpose(1, 2), *rope)  # [B, h + hkv, n, D]
    q, k = qk.split([heads, kv_heads], dim=1)
    v = v.reshape(b, n, kv_heads, dim).transpose(1, 2)                                # [B, hkv, n, D]
    if write:
        k, v = cache.extend(layer, k, v)
    else:
        cached_k, cached_v, _ = cache.read(layer)
        if cached_k is not None:
            k, v = torch.cat([cached_k, k], dim=2), torch.cat([cached_v, v], dim=2)
    return attend(q, k, v, mask, scale=dim ** -0.5)


class DecoderLayer(nn.Module):
    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, bias=config.mlp_bias)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache, mask: Tensor | None,
                write: bool) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, mask, write)
        return x + self.mlp(self.post_attention_layernorm(x))


Linear = Callable[[Tensor], Tensor]  # x [..., K] -> [..., N]: a `PackedWeight` or `DenseLinears`


@dataclass(frozen=True)
class BoundLayer:
    """A decoder layer's pass as plain calls (`Model.bound_layers`): its linears bound once, each the packed weight
    or the dense weights its module would run the pass on, with its norms' weights (the parameters themselves,
    which `model.to(dtype)` converts in place) and its sizes. The modules' way to the same products (the module
    calls, and at every linear the choice between packed, reordered and dense weights, adapters and biases) cost
    ~2 of the 17-19 ms of a SmolLM2 AR step on a 2-core Xeon; the math is `DecoderLayer`'s, bit for bit
    (`tests/models/test_bound_layers.py`)."""
    index: int
    input_norm: Tensor
    post_norm: Tensor
    eps: float
    sizes: tuple[int, int, int]  # query heads, key/value heads, head dim
    act: Callable[[Tensor], Tensor]
    qkv: Linear  # [q k | v] in one output
    o: Linear
    gate_up: Linear  # [gate | up]
    down: Linear
    program: Any = None  # `canvaslm.models.aot.ProgramLayer` (aot reads this module): the layer compiled

    @classmethod
    def bind(cls, layer: DecoderLayer, qkv: Linear, o: Linear, gate_up: Linear, down: Linear) -> BoundLayer:
        attn = layer.self_attn
        return cls(attn.layer, layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                   layer.input_layernorm.eps, (attn.heads, attn.kv_heads, attn.head_dim), layer.mlp.act,
                   qkv, o, gate_up, down)

    def __call__(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache, mask: Tensor | None,
                 write: bool) -> Tensor:
        if self.program is not None and (out := self.program(x, rope, cache, mask, write)) is not None:
            return out
        heads, kv_heads, dim = self.sizes
        qk, v = self.qkv(rms_norm(x, self.input_norm, self.eps)).split([(heads + kv_heads) * dim, kv_heads * dim],
                                                                       dim=-1)
        x = x + self.o(attention(qk, v, rope, cache, self.index, mask, write, heads, kv_heads, dim))
        gate, up = self.gate_up(rms_norm(x, self.post_norm, self.eps)).chunk(2, dim=-1)
        return x + self.down(self.act(gate) * up)


@dataclass(frozen=True)
class Binding:
    """A model's layers bound for passes of some rows (`Model.bound_layers`): on packed weights, for passes every
    one of `guards` takes (at most its `max_rows`); on dense weights, for passes none of them takes."""
    layers: list[BoundLayer]
    guards: list[PackedWeight]
    packed: bool

    def takes(self, rows: int) -> bool:
        # each weight's rows read now: `canvaslm bench passes` moves them
        if self.packed:
            return all(rows <= w.max_rows for w in self.guards)
        return all(rows > w.max_rows for w in self.guards)


def hook_tables(modules: list[nn.Module]) -> list[dict]:
    """The forward-hook tables of `modules`: registering a hook adds it to its module's table in place, so these
    read every hook whenever it came (`hooked`)."""
    return [table for m in modules for table in (m._forward_pre_hooks, m._forward_hooks)]


def hooked(tables: list[dict]) -> bool:
    """Whether a forward hook sits in any of `tables` (`hook_tables`) or on every module: a bound layer's plain
    calls would skip it (FSDP2, for one, gathers a layer's sharded weights in its hooks). `any` over the tables
    runs in C: a generator over a SmolLM2's ~800 modules cost ~0.9 ms a pass."""
    return bool(torch_module._global_forward_pre_hooks or torch_module._global_forward_hooks) or any(tables)


class Model(nn.Module):
    """Llama-family LM. Build with `torch.device("meta")` then `load_hf_tensors` to skip random init."""

    compiled_passes = ("encode", "canvas_layers")  # what `canvaslm.load(compile=True)` compiles

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        self.self_conditioning = SelfConditioning(config) if config.canvas_length else None
        self.canvas_grid = GridEmbedding(config) if config.canvas_grid else None
        # a plain attribute, not a buffer: model.to(bfloat16) must not round it, and it stays real under meta
        self.inv_freq = rope_inv_freq(config)  # [D / 2] float32
        self.packed_head: PackedWeight | None = None  # set by canvaslm.models.quant.quantize
        self.small_pass_rows: int | None = None  # set by quantize: rows its packed kernels run at ~1 row's cost
        self.layer_program: Any = None  # set by `aot.compile_layers`: the packed layers' compiled program
        self.dense_layer_program: Any = None  # and the dense layers' (`compile_layers(..., dense=True)`)

    @property
    def _groups(self) -> int:
        """Query heads per key/value head."""
        return self.config.num_attention_heads // self.config.num_key_value_heads

    @property
    def kind(self) -> str:
        return "diffusion" if self.config.canvas_length else "autoregressive"

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def canvas_length(self) -> int | None:
        return self.config.canvas_length

    @property
    def canvas_shift(self) -> bool:
        return self.config.canvas_shift

    @property
    def mask_token_id(self) -> int | None:
        return self.config.mask_token_id

    @property
    def eos_token_ids(self) -> list[int]:
        return self.config.eos_token_ids

    def new_cache(self, batch_size: int, device: torch.device | str | None = None) -> KVCache:
        return KVCache(self.config.windows(), batch_size, device or self.embed_tokens.weight.device)

    def _rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin for `positions`: [n, D] for positions [n] shared by all rows, [B, 1, n, D] for [B, n]."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        return (cos, sin) if positions.ndim == 1 else (cos[:, None], sin[:, None])

    def encode(self, input_ids: Tensor, cache: KVCache, valid: Tensor) -> Tensor:
        """Causal pass over input_ids [B, n] (left-padded; valid [B, n] marks real tokens) that appends them to
        the cache. Returns the final-normed hidden states [B, n, H]."""
        self._pass(canvas=False)
        x = self.embed_tokens(input_ids)
        rope = self._rope(cache.positions(input_ids.shape[1]), x.dtype)
        masks: dict[int | None, Tensor] = {}  # the mask depends only on the layer's window
        layers = self.bound_layers(input_ids.numel()) or self.layers
        for i, layer in enumerate(layers):
            window = cache.windows[i]
            if window not in masks:
                masks[window] = pass_mask(encoder_mask(cache, i, valid), self._groups)
            x = layer(x, rope, cache, masks[window], write=True)
        cache.commit(valid)
        return self.norm(x)

    def forward(self, input_ids: Tensor, cache: KVCache, valid: Tensor) -> Tensor:
        """Causal LM: float32 logits [B, n, V] for input_ids [B, n], appended to the cache."""
        return self.logits(self.encode(input_ids, cache, valid))

    def decode(self, canvas_ids: Tensor, cache: KVCache, self_conditioning_logits: Tensor | None,
               self_conditioning_rows: Tensor | None = None, hidden_states: bool = False) -> Tensor:
        """Bidirectional pass over a canvas [B, C] placed after the cached prefix, which it reads but never writes.

        self_conditioning_logits [B, C, V] are the previous step's logits (None on the first step), used only in
        the rows where self_conditioning_rows [B] is True when that is given. Returns float32 logits [B, C, V]
        (`hidden_states`: the final-normed hidden states [B, C, H], for `logits` of the positions a step reads)."""
        if self.self_conditioning is None:
            raise GenerationError("decode needs a diffusion model; call to_diffusion(canvas_length) first")
        self._pass(canvas=True)
        x = self._canvas_embeddings(canvas_ids)
        if self_conditioning_logits is not None and not self.self_conditioning.adds_nothing():
            # None means an all-zero signal; skipping it is exact (RMSNorm(0) = 0 and the block has no biases)
            probs = self_conditioning_logits.float().softmax(dim=-1).to(x.dtype)
            soft = probs @ self.embed_tokens.weight
            if self_conditioning_rows is not None:
                soft = soft * self_conditioning_rows[:, None, None].to(soft.dtype)
            x = self.self_conditioning(x, soft)
        rope = self._rope(cache.positions(canvas_ids.shape[1]), x.dtype)
        # one mask per window, made here: whether one is needed at all is read from the cache, a data-dependent
        # branch that keeps torch.compile out of whatever runs it, so the layers go on in `canvas_layers`
        masks = {w: decoder_mask(cache, cache.windows.index(w), canvas_ids.shape[1]) for w in set(cache.windows)}
        if self.canvas_grid is None:  # a grid's relation bias reads the canvas's own rows
            masks = {w: pass_mask(mask, self._groups) for w, mask in masks.items()}
        x = self.canvas_layers(x, rope, cache, masks)
        return x if hidden_states else self.logits(x)

    def canvas_layers(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache,
                      masks: dict[int | None, Tensor | None]) -> Tensor:
        """The canvas pass's layers and final norm over its embeddings x [B, C, H], each layer masked by its
        window's mask (`decode`); what `canvaslm.load(compile=True)` compiles for the canvas pass."""
        layers = (self.bound_layers(x.shape[0] * x.shape[1]) if self.canvas_grid is None else None) or self.layers
        for i, layer in enumerate(layers):
            mask = masks[cache.windows[i]]
            if self.canvas_grid is not None:
                mask = self.canvas_grid.attention_bias(i, mask, x.shape[1], cache.kept(i) + x.shape[1], x.dtype)
            x = layer(x, rope, cache, mask, write=False)
        return self.norm(x)

    def bound_layers(self, rows: int) -> list[BoundLayer] | None:
        """The layers as `BoundLayer`s for a pass of `rows` rows (batch × positions) in the pass the adapters are set
        for (`_pass`), without autograd: on packed weights where every linear of every layer runs such a pass on its
        packed kernel alone (`packed_weight`), on dense weights where none does (`dense_linears`: past the packed
        kernels' rows, or a model not quantized); None: the modules run it. Bound once per setting of the adapters,
        and again after `quantize` or `cache_canvas_weights` changed the weights. A pass `torch.compile` traces,
        one under autocast, and one whose layers anything hooks (FSDP2 gathers a layer's shards in its hooks) run
        the modules."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or \
                torch.is_autocast_enabled(self.embed_tokens.weight.device.type):
            return None
        adapters = adapters_of(self)
        key = bool(adapters) and adapters[0].canvas_pass  # `set_canvas_pass` sets them all alike
        bound = self.__dict__.setdefault(BOUND_LAYERS, {})
        if key not in bound:
            alike = all(adapter.canvas_pass == key for adapter in adapters)
            bound[key] = (self._bind_packed(), self._bind_dense()) if alike else ()
            bound["hooks"] = hook_tables(list(self.layers.modules()))
        if hooked(bound["hooks"]):
            return None
        return next((binding.layers for binding in bound[key] if binding is not None and binding.takes(rows)), None)

    def _bind_packed(self) -> Binding | None:
        """The layers on their packed weights, for the adapters' current setting."""
        layers = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            weights = (packed_weight(attn, "qkv"), packed_weight(attn.o_proj), packed_weight(mlp, "gate_up"),
                       packed_weight(mlp.down_proj))
            if any(w is None for w in weights) or weights[2].out_features != 2 * weights[3].in_features:
                return None
            bound = BoundLayer.bind(layer, *weights)
            if self.layer_program is not None and self.layer_program.fits(bound):
                bound = dataclasses.replace(bound, program=self.layer_program.bind(bound))
            layers.append(bound)
        return Binding(layers, [w for layer in layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)], True)

    def _bind_dense(self) -> Binding | None:
        """The layers on their dense weights, for the adapters' current setting."""
        layers, guards = [], []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            bound = (dense_linears(attn, "qkv"), dense_linears(attn.o_proj), dense_linears(mlp, "gate_up"),
                     dense_linears(mlp.down_proj))
            if any(b is None for b in bound):
                return None
            bound_layer = BoundLayer.bind(layer, *(linears for linears, _ in bound))
            if self.dense_layer_program is not None and self.dense_layer_program.fits(bound_layer):
                bound_layer = dataclasses.replace(bound_layer, program=self.dense_layer_program.bind(bound_layer))
            layers.append(bound_layer)
            guards += [w for _, ws in bound for w in ws]
        return Binding(layers, guards, False)

    def forward_block_diffusion(self, input_ids: Tensor, valid: Tensor, prompt_length: int, noised: Tensor,
                                self_conditioning_logits: Tensor | None,
                                self_conditioning_rows: Tensor | None = None,
                                hidden_states: bool = False) -> tuple[Tensor, Tensor]:
        """Training forward: one causal pass over the clean sequence, then one decoder pass over all its canvases.

        input_ids, valid [B, S]: left-padded prompt (P = prompt_length) then R = K * canvas_length response
        positions; noised [B, R]: the corrupted response (or [k * B, R]: k corrupted copies, one encoder pass).
        self_conditioning_logits [B, R, V] (None: no signal) is used as in `decode`, only in the rows where
        self_conditioning_rows [B] is True when that is given.
        Returns float32 (encoder logits [B, S, V], canvas logits [B, R, V]). Canvas b's logits equal `decode`
        of its noised tokens after `encode` of input_ids[:, :P + b * C]; canvaslm.models.masks says why.
        `hidden_states` returns the final-normed hidden states [B, S, H], [B, R, H] instead of logits (a loss
        that scores a few positions computes their logits alone). With canvas-only adapters the causal pass is
        the frozen parent: it runs without autograd."""
        if self.self_conditioning is None:
            raise GenerationError("forward_block_diffusion needs a diffusion model; call to_diffusion first")
        batch, seq = check_training_inputs(input_ids, noised, prompt_length)
        valid, windows = valid.bool(), self.config.windows()
        # 1. encoder: a window-less cache keeps every key for the decoder; the masks do the windowing
        cache = KVCache([None] * len(windows), batch, input_ids.device)
        self._pass(canvas=False)
        with torch.no_grad() if self.config.canvas_adapters else contextlib.nullcontext():
            x = self.embed_tokens(input_ids)
            rope = self._rope(torch.arange(seq, device=x.device), x.dtype)
            masks = {w: causal_mask(valid, w) for w in set(windows)}
            for i, layer in enumerate(self.layers):
                x = layer(x, rope, cache, masks[windows[i]], write=True)
            cache.commit(valid)
        copies = noised.shape[0] // batch
        if copies > 1:  # several corrupted copies of each row read the one encoder pass
            cache.select(torch.arange(batch, device=valid.device).repeat(copies))
            valid = valid.repeat(copies, 1)
        self._pass(canvas=True)
        # 2. decoder: every canvas at once, at positions P + arange(R), reading [clean keys ; canvas keys]
        y = self._canvas_embeddings(noised)
        if self_conditioning_logits is not None:
            soft = self_conditioning_logits.float().softmax(dim=-1).to(y.dtype) @ self.embed_tokens.weight
            if self_conditioning_rows is not None:  # a zero signal is exactly "no self-conditioning"
                soft = soft * self_conditioning_rows[:, None, None].to(soft.dtype)
            y = self.self_conditioning(y, soft)
        canvas_positions = torch.arange(prompt_length, prompt_length + noised.shape[1], device=y.device)
        rope = self._rope(canvas_positions, y.dtype)
        masks = {w: block_diffusion_mask(valid, prompt_length, self.config.canvas_length, w) for w in set(windows)}
        for i, layer in enumerate(self.layers):
            mask = masks[windows[i]]
            if self.canvas_grid is not None:
                mask = self.canvas_grid.attention_bias(i, mask, y.shape[1], mask.shape[-1], y.dtype)
            y = layer(y, rope, cache, mask, write=False)
        if hidden_states:
            return self.norm(x), self.norm(y)
        return self.logits(self.norm(x)), self.logits(self.norm(y))

    def _canvas_embeddings(self, canvas_ids: Tensor) -> Tensor:
        """[B, R] canvas tokens (R a multiple of the canvas) -> [B, R, H], with each cell's grid position added."""
        x = self.embed_tokens(canvas_ids)
        if self.canvas_grid is None:
            return x
        grid = self.canvas_grid().to(x.dtype)
        return (x.unflatten(1, (-1, grid.shape[0])) + grid).flatten(1, 2)

    def _pass(self, canvas: bool) -> None:
        """With canvas-only adapters, switch them on for the canvas pass and off for the causal pass."""
        if self.config.canvas_adapters:
            set_canvas_pass(self, canvas)

    def logits(self, hidden: Tensor) -> Tensor:
        """Final-normed hidden [B, n, H] -> float32 logits [B, n, V]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return head_logits(hidden, weight, self.packed_head)

    def to_diffusion(self, canvas_length: int) -> Model:
        """Turn this AR model into a block-diffusion model in place; its output is unchanged until trained."""
        self.config = dataclasses.replace(self.config, canvas_length=canvas_length)
        if self.self_conditioning is None:
            weight = self.embed_tokens.weight
            self.self_conditioning = SelfConditioning(self.config).to(weight.device, weight.dtype)
        return self

    def deepened(self, num_layers: int) -> Model:
        """A deeper model that computes what this one does (depth up-scaling): with f = num_layers / this model's
        layers, layer i becomes layers f·i … f·i + f − 1. The copies keep the source layer's weights (q/k/v,
        gate/up, norms, grid relation biases: features already useful) except their output projections (attention
        o_proj, MLP down_proj), which start at zero, so each copy adds nothing until trained."""
        layers = self.config.num_hidden_layers
        if num_layers % layers or num_layers < layers:
            raise ValueError(f"a model of {layers} layers deepens to a multiple of {layers}, not {num_layers}")
        factor = num_layers // layers
        config = dataclasses.replace(self.config, num_hidden_layers=num_layers,
                                     layer_types=[t for t in self.config.layer_types for _ in range(factor)])
        with torch.device("meta"):
            deeper = Model(config)
        state = {}
        for name, tensor in self.state_dict().items():
            if not name.startswith("layers."):
                state[name] = tensor
                continue
            index, rest = name.split(".", 2)[1:]
            for copy in range(factor):
                silent = copy > 0 and rest in ("self_attn.o_proj.weight", "mlp.down_proj.weight")
                state[f"layers.{int(index) * factor + copy}.{rest}"] = torch.zeros_like(tensor) if silent else tensor
        bias = state.get("canvas_grid.relation_bias")
        if bias is not None:
            state["canvas_grid.relation_bias"] = bias.repeat_interleave(factor, dim=0)
        deeper.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)  # on this model's device
        deeper.inv_freq = self.inv_freq
        return deeper

    # -- checkpoint tensors, named as in transformers' LlamaForCausalLM ------------------------------------------

    def load_hf_tensors(self, tensors: Mapping[str, Tensor], path: object) -> Model:
        """Load HF-named tensors, strictly: a missing, unexpected or misshapen tensor raises CheckpointError."""
        expected = {_hf_name(k): v for k, v in self.state_dict().items()}
        tensors = dict(tensors)
        if self.lm_head is None and "lm_head.weight" in tensors:
            # tied checkpoints may still carry the head (transformers' state_dict does); accept only a true copy
            head = tensors.pop("lm_head.weight")
            embed = tensors.get("model.embed_tokens.weight")
            if embed is None or not torch.equal(head, embed):
                raise CheckpointError(path, "lm_head.weight differs from the tied embeddings",
                                      field="lm_head.weight", expected="no tensor or a copy of model.embed_tokens",
                                      found=f"tensor {tuple(head.shape)}")
        for name in sorted(expected.keys() | tensors.keys()):
            want, got = expected.get(name), tensors.get(name)
            if want is None or got is None or want.shape != got.shape:
                problem = ("unexpected tensor" if want is None else "missing tensor" if got is None
                           else "tensor has the wrong shape")
                raise CheckpointError(path, problem, field=name, expected=_shape(want), found=_shape(got))
        dtype = tensors["model.embed_tokens.weight"].dtype  # one dtype for the whole model
        ours = {k.removeprefix("model."): v.to(dtype) for k, v in tensors.items()}
        self.load_state_dict(ours, strict=True, assign=True)
        return self

    def hf_tensors(self) -> dict[str, Tensor]:
        """The weights under their HF names (the inverse of load_hf_tensors)."""
        return {_hf_name(k): v for k, v in self.state_dict().items()}


def _shape(tensor: Tensor | None) -> object:
    return "no tensor" if tensor is None else tuple(tensor.shape)


def _hf_name(ours: str) -> str:
    return ours if ours.startswith("lm_head.") else "model." + ours
