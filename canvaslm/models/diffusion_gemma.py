"""DiffusionGemma, text only: the network of transformers' `DiffusionGemmaForBlockDiffusion` in plain PyTorch.

One stack of Gemma-4 MoE layers serves two passes with the same weights:
- `encode`: causal pass over committed tokens (prompt, then each finished canvas); writes the KV cache.
- `decode`: bidirectional pass over the canvas being denoised; reads the cache and never writes it.
Only the residual scale (`layer_scalar`) differs: the checkpoint stores one per pass.

Images and video are not supported yet: `encode` refuses prompts holding the image token, and the vision tower
tensors of a checkpoint are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from canvaslm.errors import CheckpointError, GenerationError, UnsupportedError
from canvaslm.models import embedding, normal
from canvaslm.models.cache import KVCache, attend, decoder_mask, encoder_mask
from canvaslm.models.masks import block_diffusion_mask, causal_mask, check_training_inputs
from canvaslm.models.quant import PackedWeight, head_logits

SLIDING, FULL = "sliding_attention", "full_attention"
_DECODER = "model.decoder."                  # where transformers stores the shared weights
_ENCODER = "model.encoder.language_model."   # tied copies of them, and the encoder's own layer_scalar
_IGNORED = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")  # vision: not supported yet
_DEFAULT_ROPE = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                 FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}}
_REQUIRED = object()


@dataclass
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: list[str]        # one per layer; the last one is always full attention
    head_dims: list[int]          # per layer (full layers default to global_head_dim)
    kv_heads: list[int]           # per layer (full layers default to num_global_key_value_heads)
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    rope_parameters: dict[str, dict[str, Any]]  # per layer type
    sliding_window: int = 512
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float = 30.0
    attention_bias: bool = False
    attention_k_eq_v: bool = True  # full layers have no v_proj: values are the k_proj output (always, upstream)
    max_position_embeddings: int = 131_072
    canvas_length: int = 256
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_ids: list[int] = field(default_factory=lambda: [1])
    image_token_id: int | None = 258_880
    use_bidirectional_attention: str | None = None  # None or "vision": text attends causally in the encoder
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level keys (vision_config, ...), kept for to_hf

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_types)

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], path: object) -> Config:
        """Read a transformers `DiffusionGemmaConfig` config.json dict, deriving what its __post_init__ derives."""
        if d.get("model_type", "diffusion_gemma") != "diffusion_gemma":
            raise CheckpointError(path, "not a DiffusionGemma config", field="model_type",
                                  expected="'diffusion_gemma'", found=repr(d.get("model_type")))
        if not _get(d, "tie_word_embeddings", bool, path, default=True):
            raise UnsupportedError(f"{path}: tie_word_embeddings=false (separate encoder and decoder weights) "
                                   "is not supported")
        t = _get(d, "text_config", dict, path)
        get = lambda key, typ, default=_REQUIRED: _get(t, key, typ, path, "text_config.", default)  # noqa: E731
        n_layers = get("num_hidden_layers", int)
        layer_types = list(get("layer_types", list, None) or [
            SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)])  # upstream default: 5 sliding : 1 full
        if len(layer_types) != n_layers or any(x not in (SLIDING, FULL) for x in layer_types):
            raise CheckpointError(path, "bad layer_types", field="text_config.layer_types",
                                  expected=f"{n_layers} of {SLIDING!r}/{FULL!r}", found=layer_types)
        layer_types[-1] = FULL  # upstream forces the last layer to full attention
        bidirectional = get("use_bidirectional_attention", str, None)
        if bidirectional == "all":
            raise UnsupportedError(f"{path}: use_bidirectional_attention='all' (bidirectional encoder) is not "
                                   "supported; only causal text encoders (None or 'vision') are")
        if bidirectional not in (None, "vision"):
            raise CheckpointError(path, "bad value", field="text_config.use_bidirectional_attention",
                                  expected="null, 'vision' or 'all'", found=repr(bidirectional))
        if get("hidden_activation", str, "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise UnsupportedError(f"{path}: hidden_activation {t['hidden_activation']!r} is not supported "
                                   "(only gelu_pytorch_tanh)")
        head_dim, kv = get("head_dim", int), get("num_key_value_heads", int)
        head_dims, kv_heads = _layer_dims(t, layer_types, head_dim, kv, path)
        heads = get("num_attention_heads", int)
        if any(h <= 0 or heads % h for h in kv_heads):
            raise CheckpointError(path, "attention heads not divisible by key/value heads",
                                  field="text_config.num_key_value_heads", expected=f"divisors of {heads}",
                                  found=kv_heads)
        rope = get("rope_parameters", dict, None) or _DEFAULT_ROPE
        for kind in set(layer_types):
            params = rope.get(kind)
            if not isinstance(params, dict) or not isinstance(params.get("rope_theta"), (int, float)):
                raise CheckpointError(path, "missing RoPE parameters", field=f"text_config.rope_parameters.{kind}",
                                      expected="a dict with rope_type and rope_theta", found=params)
            if params.get("rope_type") not in ("default", "proportional"):
                raise UnsupportedError(f"{path}: rope_type {params.get('rope_type')!r} is not supported "
                                       "(only 'default' and 'proportional')")
        num_experts, top_k = get("num_experts", int), get("top_k_experts", int)
        if not 0 < top_k <= num_experts:
            raise CheckpointError(path, "bad expert count", field="text_config.top_k_experts",
                                  expected=f"1..{num_experts}", found=top_k)
        eos = d["eos_token_id"] if d.get("eos_token_id") is not None else t.get("eos_token_id", 1)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else eos
        if not isinstance(eos, list) or not all(isinstance(x, int) for x in eos):
            raise CheckpointError(path, "bad value", field="eos_token_id", expected="int or list of ints",
                                  found=repr(eos))
        handled = {"model_type", "text_config", "canvas_length", "eos_token_id", "pad_token_id", "bos_token_id",
                   "image_token_id", "tie_word_embeddings", "architectures"}
        return cls(
            vocab_size=get("vocab_size", int), hidden_size=get("hidden_size", int),
            intermediate_size=get("intermediate_size", int), num_attention_heads=heads, num_key_value_heads=kv,
            head_dim=head_dim, layer_types=layer_types, head_dims=head_dims, kv_heads=kv_heads,
            num_experts=num_experts, top_k_experts=top_k, moe_intermediate_size=get("moe_intermediate_size", int),
            rope_parameters={k: dict(rope[k]) for k in set(layer_types)},
            sliding_window=get("sliding_window", int, 512), rms_norm_eps=get("rms_norm_eps", float, 1e-6),
            final_logit_softcapping=get("final_logit_softcapping", float, 30.0),
            attention_bias=get("attention_bias", bool, False),
            max_position_embeddings=get("max_position_embeddings", int, 131_072),
            canvas_length=_get(d, "canvas_length", int, path, default=256),
            pad_token_id=_token_id(d, t, "pad_token_id", 0, path),
            bos_token_id=_token_id(d, t, "bos_token_id", 2, path),
            eos_token_ids=eos, image_token_id=_get(d, "image_token_id", int, path, default=258_880),
            use_bidirectional_attention=bidirectional,
            extra={k: v for k, v in d.items() if k not in handled})

    def to_hf(self) -> dict[str, Any]:
        """config.json for transformers' `DiffusionGemmaConfig` (per-layer dims written out explicitly)."""
        if not self.attention_k_eq_v:
            raise UnsupportedError("transformers' DiffusionGemma always shares keys and values on full-attention "
                                   "layers; a model with attention_k_eq_v=False cannot be written as one")
        per_layer = {}
        for i, (hd, kv) in enumerate(zip(self.head_dims, self.kv_heads)):
            overrides = {k: v for k, v, g in (("head_dim", hd, self.head_dim),
                                              ("num_key_value_heads", kv, self.num_key_value_heads)) if v != g}
            if overrides:
                per_layer[str(i)] = overrides
        text = dict(
            model_type="diffusion_gemma_text", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, per_layer_config=per_layer, layer_types=list(self.layer_types),
            num_experts=self.num_experts, top_k_experts=self.top_k_experts,
            moe_intermediate_size=self.moe_intermediate_size, rope_parameters=self.rope_parameters,
            sliding_window=self.sliding_window, rms_norm_eps=self.rms_norm_eps,
            final_logit_softcapping=self.final_logit_softcapping, attention_bias=self.attention_bias,
            hidden_activation="gelu_pytorch_tanh", max_position_embeddings=self.max_position_embeddings,
            use_bidirectional_attention=self.use_bidirectional_attention, pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_ids, tie_word_embeddings=True)
        return {**self.extra, "model_type": "diffusion_gemma", "architectures": ["DiffusionGemmaForBlockDiffusion"],
                "text_config": text, "canvas_length": self.canvas_length, "tie_word_embeddings": True,
                "image_token_id": self.image_token_id, "pad_token_id": self.pad_token_id,
                "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_ids}


def _get(d: Mapping[str, Any], key: str, typ: type, path: object, prefix: str = "", default: Any = _REQUIRED) -> Any:
    """d[key] checked against `typ` (ints pass as floats, bools never as ints); `default` when absent or null."""
    value = d.get(key)
    if value is None:
        if default is _REQUIRED:
            raise CheckpointError(path, "missing config key", field=prefix + key, expected=typ.__name__,
                                  found="nothing")
        return default
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise CheckpointError(path, "config key has the wrong type", field=prefix + key, expected=typ.__name__,
                              found=f"{type(value).__name__} {value!r}")
    return value


def _layer_dims(t: Mapping[str, Any], layer_types: list[str], head_dim: int, kv: int,
                path: object) -> tuple[list[int], list[int]]:
    """Per-layer head dim and key/value heads: the serialised `per_layer_config` when present, else upstream's
    derivation (global_head_dim, default 512, and num_global_key_value_heads on full layers). Upstream reads
    `attention_k_eq_v` before setting it, so the global kv-head override always applies: the key is ignored."""
    n = len(layer_types)
    head_dims, kv_heads = [head_dim] * n, [kv] * n
    per_layer = _get(t, "per_layer_config", dict, path, "text_config.", None)
    if per_layer is None:
        global_kv = _get(t, "num_global_key_value_heads", int, path, "text_config.", kv)
        for i, kind in enumerate(layer_types):
            if kind == FULL:
                head_dims[i] = _get(t, "global_head_dim", int, path, "text_config.", 512)
                kv_heads[i] = global_kv
        return head_dims, kv_heads
    for key, overrides in per_layer.items():
        prefix = f"text_config.per_layer_config.{key}."
        i = int(key) if str(key).isdigit() else -1
        if not 0 <= i < n or not isinstance(overrides, dict):
            raise CheckpointError(path, "bad per-layer override", field=prefix.rstrip("."),
                                  expected=f"a layer index below {n} -> dict", found=overrides)
        unsupported = set(overrides) - {"head_dim", "num_key_value_heads"}
        if unsupported:
            raise UnsupportedError(f"{path}: per-layer overrides of {sorted(unsupported)} are not supported")
        head_dims[i] = _get(overrides, "head_dim", int, path, prefix, head_dim)
        kv_heads[i] = _get(overrides, "num_key_value_heads", int, path, prefix, kv)
    return head_dims, kv_heads


def _token_id(d: Mapping[str, Any], text: Mapping[str, Any], key: str, default: int, path: object) -> int | None:
    """A special token id: top level first, then text_config; upstream's default only when neither has the key."""
    for source, prefix in ((d, ""), (text, "text_config.")):
        if source.get(key) is not None:
            return _get(source, key, int, path, prefix)
    return text.get(key, default)


def rope_tables(params: Mapping[str, Any], head_dim: int, positions: Tensor,
                dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [n, head_dim] for `positions` [n] ([B, 1, n, head_dim] for per-row positions [B, n]), as the
    reference computes them (float32, then cast).

    'proportional' RoPE (full layers) rotates only the first partial_rotary_factor of the frequency pairs and keeps
    head_dim in the exponent's denominator; the other pairs get frequency 0, i.e. are left unrotated."""
    base, partial = params["rope_theta"], params.get("partial_rotary_factor", 1.0)
    if params["rope_type"] == "default":
        dim = int(head_dim * partial)
        inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float, device=positions.device) / dim)
    else:
        rotated = int(partial * head_dim // 2)
        inv_freq = 1.0 / base ** (torch.arange(0, 2 * rotated, 2, device=positions.device).float() / head_dim)
        inv_freq = F.pad(inv_freq, (0, head_dim // 2 - rotated)) / params.get("factor", 1.0)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    return (cos, sin) if positions.ndim == 1 else (cos[:, None], sin[:, None])


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, heads, n, D] rotated by cos/sin [n, D] (rotate-half convention)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def rms_norm(x: Tensor, eps: float, weight: Tensor | None = None) -> Tensor:
    """Gemma-4 RMSNorm: computed in float32, weight used as is (not 1 + weight), result in x's dtype."""
    y = x.float()
    y = y * torch.pow(y.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.float()
    return y.type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.eps, self.weight)


class MLP(nn.Module):
    """Gated GELU(tanh) feed-forward."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class SelfConditioning(MLP):
    """Adds an MLP of the previous step's soft embeddings to the canvas embeddings, then normalises."""

    def __init__(self, config: Config) -> None:
        super().__init__(config.hidden_size, config.intermediate_size)
        self.pre_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)

    def forward(self, embeds: Tensor, soft: Tensor | None) -> Tensor:
        # Without a signal the reference feeds zeros, and the bias-free MLP of zeros is exactly zero.
        return self.post_norm(embeds if soft is None else embeds + super().forward(self.pre_norm(soft)))


class Attention(nn.Module):
    def __init__(self, config: Config, i: int) -> None:
        super().__init__()
        hidden, bias, eps = config.hidden_size, config.attention_bias, config.rms_norm_eps
        self.head_dim = d = config.head_dims[i]
        kv_heads = config.kv_heads[i]
        self.q_proj = nn.Linear(hidden, config.num_attention_heads * d, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * d, bias=bias)
        k_eq_v = config.attention_k_eq_v and config.layer_types[i] == FULL
        self.v_proj = None if k_eq_v else nn.Linear(hidden, kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * d, hidden, bias=bias)
        self.q_norm, self.k_norm = RMSNorm(d, eps), RMSNorm(d, eps)
        self.v_norm = RMSNorm(d, eps, with_scale=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
                mask: Tensor | None) -> Tensor:
        """x [B, n, hidden]; `kv` turns this chunk's keys/values [B, Hkv, n, D] into all visible ones."""
        shape = (*x.shape[:2], -1, self.head_dim)
        q = self.q_proj(x).view(shape)
        k = self.k_proj(x).view(shape)
        v = k if self.v_proj is None else self.v_proj(x).view(shape)  # k_eq_v: raw k, no k_norm, no RoPE
        q = apply_rope(self.q_norm(q).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_norm(k).transpose(1, 2), cos, sin)
        k, v = kv(k, self.v_norm(v).transpose(1, 2))
        return self.o_proj(attend(q, k, v, mask, scale=1.0))  # Gemma 4: q/k norms replace 1/sqrt(D)


class Router(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.top_k, self.eps, self.root = config.top_k_experts, config.rms_norm_eps, config.hidden_size ** -0.5
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, hidden] -> float32 weights [T, K] and expert ids [T, K]."""
        h = rms_norm(x, self.eps) * self.scale * self.root
        probs = self.proj(h).softmax(dim=-1, dtype=torch.float32)
        weights, index = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[index], index


class Experts(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(normal(e, 2 * i, h, std=0.02))
        self.down_proj = nn.Parameter(normal(e, h, i, std=0.02))

    def forward(self, x: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        """x [T, hidden], index/weights [T, K] -> weighted sum of each token's experts [T, hidden].

        Assignments are grouped by expert with one sort, then each hit expert runs once on its tokens; experts are
        accumulated in increasing id order like the reference loop."""
        out = torch.zeros_like(x)
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tokens, w = order // index.shape[1], weights.reshape(-1)[order]
        start = 0
        for e, count in enumerate(torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()):
            if count == 0:
                continue
            rows = tokens[start:start + count]
            gate, up = F.linear(x[rows], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.gelu(gate, approximate="tanh") * up, self.down_proj[e]) * w[start:start + count, None]
            out.index_add_(0, rows, y.to(out.dtype))
            start += count
        return out


class Layer(nn.Module):
    def __init__(self, config: Config, i: int) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, i)
        self.mlp = MLP(hidden, config.intermediate_size)
        self.router, self.experts = Router(config), Experts(config)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_1",
                     "post_feedforward_layernorm_2"):
            setattr(self, name, RMSNorm(hidden, eps))
        # The checkpoint keeps a separate residual scale for the encoder pass and for the decoder pass.
        self.register_buffer("encoder_scalar", torch.ones(1))
        self.register_buffer("decoder_scalar", torch.ones(1))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
                mask: Tensor | None, scalar: Tensor) -> Tensor:
        """x [B, n, hidden] -> [B, n, hidden]."""
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, kv, mask))
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))
        flat = x.reshape(-1, x.shape[-1])
        weights, index = self.router(flat)  # routed on the residual itself, not on a normed copy
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), index, weights).view(x.shape)
        x = x + self.post_feedforward_layernorm(dense + self.post_feedforward_layernorm_2(moe))
        return (x * scalar).to(x.dtype)  # the reference scales in place: the stream keeps its dtype


class Model(nn.Module):
    kind = "diffusion"
    # what `canvaslm.load(compile=True)` compiles: the causal pass (its decoder pass's layers take a closure that
    # reads the cache, and the mixture of experts breaks the graph at every expert)
    compiled_passes = ("encode",)

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config)
        self.packed_head: PackedWeight | None = None  # set by canvaslm.models.quant.quantize
        self.small_pass_rows: int | None = None  # set by quantize: rows its packed kernels run at ~1 row's cost

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def canvas_length(self) -> int:
        return self.config.canvas_length

    def new_cache(self, batch_size: int, device: torch.device | str | None = None) -> KVCache:
        windows = [self.config.sliding_window if t == SLIDING else None for t in self.config.layer_types]
        return KVCache(windows, batch_size, device or self.embed_tokens.weight.device)

    def _embed_scale(self) -> Tensor:
        # float32 sqrt(hidden) cast to the weight dtype, as the reference (bf16: sqrt(3072) becomes 55.5)
        return torch.tensor(self.config.hidden_size ** 0.5).to(self.embed_tokens.weight.dtype)

    def encode(self, input_ids: Tensor, cache: KVCache, valid: Tensor | None = None) -> Tensor:
        """Causal pass over input_ids [B, n] (left-padded; `valid` [B, n] marks real tokens), appended to the
        cache at positions cache.length + arange(n). Returns final-normed hidden states [B, n, hidden]."""
        image = self.config.image_token_id
        if image is not None and bool((input_ids == image).any()):
            raise UnsupportedError(f"images/video are not supported yet: the prompt holds the image token {image}")
        if input_ids.shape[0] != cache.batch_size:
            raise GenerationError(f"batch of {input_ids.shape[0]} prompts for a cache of {cache.batch_size} rows")
        valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid.bool()
        x = F.embedding(input_ids, self.embed_tokens.weight) * self._embed_scale()
        masks = {w: encoder_mask(cache, cache.windows.index(w), valid) for w in set(cache.windows)}
        x = self._stack(x, cache, lambda i, k, v: cache.extend(i, k, v), masks, encoder=True)
        cache.commit(valid)
        return x

    def decode(self, canvas_ids: Tensor, cache: KVCache, self_conditioning_logits: Tensor | None = None,
               self_conditioning_rows: Tensor | None = None, hidden_states: bool = False) -> Tensor:
        """Bidirectional pass over canvas_ids [B, C] after the cached prefix (read only). Returns float32
        softcapped logits [B, C, V] (`hidden_states`: the final-normed hidden states [B, C, H], for `logits` of the
        positions a step reads). `self_conditioning_logits` [B, C, V]: the previous step's logits, if any, used
        only in the rows where self_conditioning_rows [B] is True when that is given."""
        if canvas_ids.shape[0] != cache.batch_size:
            raise GenerationError(f"batch of {canvas_ids.shape[0]} canvases for a cache of {cache.batch_size} rows")
        weight, scale = self.embed_tokens.weight, self._embed_scale()
        x = F.embedding(canvas_ids, weight) * scale
        soft = None
        if self_conditioning_logits is not None:  # expected embedding under the previous step's distribution
            soft = (self_conditioning_logits.softmax(dim=-1, dtype=torch.float32).to(weight.dtype) @ weight) * scale
            if self_conditioning_rows is not None:  # a zero signal is exactly "no self-conditioning"
                soft = soft * self_conditioning_rows[:, None, None].to(soft.dtype)
        x = self.self_conditioning(x, soft)

        def read(i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            old_k, old_v, _ = cache.read(i)
            return (k, v) if old_k is None else (torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2))

        masks = {w: decoder_mask(cache, cache.windows.index(w), canvas_ids.shape[1]) for w in set(cache.windows)}
        hidden = self._stack(x, cache, read, masks, encoder=False)
        return hidden if hidden_states else self.logits(hidden)

    def forward_block_diffusion(self, input_ids: Tensor, valid: Tensor, prompt_length: int, noised: Tensor,
                                self_conditioning_logits: Tensor | None,
                                self_conditioning_rows: Tensor | None = None,
                                hidden_states: bool = False) -> tuple[Tensor, Tensor]:
        """Training forward: one causal pass over the clean sequence, then one decoder pass over all its canvases.

        `hidden_states` returns the final-normed hidden states (to `logits` later) instead of logits.
        input_ids, valid [B, S]: left-padded prompt (P = prompt_length) then R = K * canvas_length response
        positions; noised [B, R]: the corrupted response (or [k * B, R]: k corrupted copies, one encoder pass).
        self_conditioning_logits [B, R, V] (None: no signal) is used as in `decode`, only in the rows where
        self_conditioning_rows [B] is True when that is given.
        Returns float32 softcapped (encoder logits [B, S, V], canvas logits [B, R, V]). Canvas b's logits equal
        `decode` of its noised tokens after `encode` of input_ids[:, :P + b * C]; canvaslm.models.masks says why."""
        image = self.config.image_token_id
        if image is not None and bool((input_ids == image).any()):
            raise UnsupportedError(f"images/video are not supported yet: the batch holds the image token {image}")
        batch, seq = check_training_inputs(input_ids, noised, prompt_length)
        valid, weight, scale = valid.bool(), self.embed_tokens.weight, self._embed_scale()
        windows = self.new_cache(batch).windows
        # 1. encoder (encoder scalars) at positions 0 .. S-1, keeping every layer's keys and values
        encoder_kv: list[tuple[Tensor, Tensor]] = []

        def keep(i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            encoder_kv.append((k, v))  # _stack visits the layers in order
            return k, v

        masks = {w: causal_mask(valid, w) for w in set(windows)}
        hidden = self._stack(F.embedding(input_ids, weight) * scale, self.new_cache(batch), keep, masks, encoder=True)
        copies = noised.shape[0] // batch
        if copies > 1:  # several corrupted copies of each row read the one encoder pass
            encoder_kv = [(k.repeat(copies, 1, 1, 1), v.repeat(copies, 1, 1, 1)) for k, v in encoder_kv]
            valid, batch = valid.repeat(copies, 1), batch * copies
        # 2. decoder (decoder scalars): every canvas at once, reading [clean keys ; canvas keys]
        x = F.embedding(noised, weight) * scale
        soft = None
        if self_conditioning_logits is not None:
            soft = (self_conditioning_logits.softmax(dim=-1, dtype=torch.float32).to(weight.dtype) @ weight) * scale
            if self_conditioning_rows is not None:  # a zero signal is exactly "no self-conditioning"
                soft = soft * self_conditioning_rows[:, None, None].to(soft.dtype)
        x = self.self_conditioning(x, soft)

        def read(i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            clean_k, clean_v = encoder_kv[i]
            return torch.cat([clean_k, k], dim=2), torch.cat([clean_v, v], dim=2)

        # _stack numbers positions from a cache's length: a key-less cache of the prompt puts canvases at P + j
        after_prompt = self.new_cache(batch)
        after_prompt.commit(valid[:, :prompt_length])
        masks = {w: block_diffusion_mask(valid, prompt_length, self.canvas_length, w) for w in set(windows)}
        canvas = self._stack(x, after_prompt, read, masks, encoder=False)
        return (hidden, canvas) if hidden_states else (self.logits(hidden), self.logits(canvas))

    def _stack(self, x: Tensor, cache: KVCache, kv: Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]],
               masks: dict[int | None, Tensor | None], encoder: bool) -> Tensor:
        """All layers over x [B, n, hidden] at positions cache.length + arange(n), then the final norm."""
        positions = cache.positions(x.shape[1])
        tables: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}
        for i, layer in enumerate(self.layers):
            key = (self.config.layer_types[i], layer.self_attn.head_dim)
            if key not in tables:
                tables[key] = rope_tables(self.config.rope_parameters[key[0]], key[1], positions, x.dtype)
            scalar = layer.encoder_scalar if encoder else layer.decoder_scalar
            x = layer(x, *tables[key], lambda k, v, i=i: kv(i, k, v), masks[cache.windows[i]], scalar)
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [..., hidden] -> float32 logits [..., V] through the tied head, softcapped like the reference."""
        cap = self.config.final_logit_softcapping
        return torch.tanh(head_logits(hidden, self.embed_tokens.weight, self.packed_head) / cap) * cap

    def _hf_names(self, name: str) -> list[str]:
        """transformers names for one of our tensors: the canonical one first, then tied copies."""
        for ours, prefix in (("encoder_scalar", _ENCODER), ("decoder_scalar", _DECODER)):
            if name.endswith(ours):
                return [prefix + name.removesuffix(ours) + "layer_scalar"]
        names = [_DECODER + name]
        if not name.startswith("self_conditioning."):  # the encoder has no self-conditioning block
            names.append(_ENCODER + name)
        if name == "embed_tokens.weight":
            names.append("lm_head.weight")
        return names

    def load_hf_tensors(self, tensors: Mapping[str, Tensor], path: object) -> None:
        """Take weights named as transformers saves them (tied copies accepted when equal; vision tensors
        ignored). Assigns the given tensors (device and dtype as given), so the model may be built on 'meta'."""
        state: dict[str, Tensor] = {}
        used: set[str] = set()
        for name, ref in self.state_dict(keep_vars=True).items():
            names = self._hf_names(name)
            found = [(n, tensors[n]) for n in names if n in tensors]
            if not found:
                raise CheckpointError(path, "missing tensor", field=names[0], expected=f"shape {tuple(ref.shape)}",
                                      found="nothing")
            for n, t in found:
                if t.shape != ref.shape:
                    raise CheckpointError(path, "tensor has the wrong shape", field=n,
                                          expected=tuple(ref.shape), found=tuple(t.shape))
            first_name, first = found[0]
            for n, t in found[1:]:
                if t.dtype != first.dtype or not torch.equal(t, first):
                    raise CheckpointError(path, f"tied copy differs from {first_name}", field=n)
            state[name] = first
            used.update(n for n, _ in found)
        unknown = sorted(n for n in tensors if n not in used and not n.startswith(_IGNORED))
        if unknown:
            raise CheckpointError(path, f"{len(unknown)} unknown tensor(s)", field=unknown[0],
                                  expected="DiffusionGemma text weights", found=unknown[:5])
        self.load_state_dict(state, strict=True, assign=True)

    def hf_tensors(self) -> dict[str, Tensor]:
        """Our weights under the names transformers' DiffusionGemmaForBlockDiffusion loads (tied copies omitted)."""
        return {self._hf_names(name)[0]: t for name, t in self.state_dict().items()}
