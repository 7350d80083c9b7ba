"""Weight-only int4 / int8 linears for CPU decoding, on torch's own kernels.

Why: at batch 1 a decoding pass reads every weight once and does little arithmetic with it, so its cost is memory
traffic. Measured on a 2-core AMD EPYC (Zen 4, avx512_bf16), 30 SmolLM2 layers' linears streamed from memory, 2
threads: one row takes 38.7 ms in float32, 22.6 in bfloat16 and 6.4 with int4 weights
(`torch._weight_int4pack_mm_for_cpu`); 16 rows 74.6 / 37.1 / 32.6. The kernels are fast only with bfloat16
activations (float32 activations ran 16-50x slower there), so a packed weight casts its input to bfloat16 and its
output back. Above `max_rows` rows (a long prompt's prefill; on AMX CPUs already a 16-token canvas) a pass becomes
arithmetic-bound and the dense weight, which is kept, is faster: `canvaslm.hardware.packed_max_rows` says where.

* int4: groups of 32 inputs share a scale and a zero point (asymmetric, like GGUF's Q4_1: w = (q - 8) * s + z).
  A Q4_1 checkpoint's weights already lie on such a grid, so packing them again loses only the rounding of s and z
  to bfloat16.
* int4_vnni: int4's weights and grid on our own kernel (`canvaslm.models.cpu_kernels`), which splits the activations
  into two int8 planes a group of 32 and multiplies in integers with AVX-512 VNNI, to float32's precision: where it
  builds and runs, `quantize(model, "int4")` packs for it (`int4_mode`).
* int8: one symmetric scale per output channel (`torch._weight_int8pack_mm`).
* q8_0_vnni: the same grid on our own kernel (`canvaslm.models.cpu_kernels`), where it runs and the CPU has no AMX.
* q8_0: int8 in groups of 32 with one symmetric scale each (GGUF's Q8_0 grid), for the output head, whose GGUF
  weights are Q8_0 and would lose more at 4 bits. It runs on the int4 kernel as two planes of 4 bits in one call (q =
  16 h + l: the high nibbles' products and the low ones', added in float32), which on CPUs without AMX reads the
  head faster than the int8 kernel and keeps the GGUF's grid (`canvaslm.hardware.head_mode` says where).

`quantize(model, mode)` packs every nn.Linear of the decoder layers (adapters' frozen bases included; the merged
canvas weights of canvas-only adapters only for passes of up to `SMALL_PASS_ROWS`, verified decoding's drafts and
canvases of 4) and the output head, in place; the linears that read the same input (q/k/v, gate/up) as one weight
(`FusedLinears`); the weights themselves and the state dict are unchanged, so a quantized model still
saves and reloads exactly as before.

The passes a packed kernel does not take run on the dense weight. On CPUs where torch's default float32 GEMM is
slow for few rows (`canvaslm.hardware.onednn_float32_pays`: MKL's sgemm on AMD), a float32 model's packed weights
also keep their dense weight reordered once for oneDNN (`ReorderedWeight`); those passes take it, and the packed
kernels then stop sooner (`packed_max_rows(mode, reordered=True)`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from canvaslm.errors import CheckpointError
from canvaslm.hardware import head_mode, onednn_float32_pays, packed_max_rows
from canvaslm.models import cpu_kernels

QUANTIZE_CHOICES = ("none", "int8", "int4")
PACKED_MODES = ("int4", "int4_vnni", "int8", "q8_0", "q8_0_vnni")
GROUP_SIZE = 32
# torch's int4 CPU kernel runs up to 4 rows at about the cost of one: a causal pass of SmolLM2 (bfloat16 + int4, 2
# threads, 2-core AMD EPYC) took 20.4 / 20.0 / 21.1 / 22.3 ms at 1-4 rows, then 28.7 at 5. Verified decoding drafts
# in passes of this size on a packed model (`verified.draft_size`), and the merged canvas weights are packed for them.
SMALL_PASS_ROWS = 4


def quantize_int4(weight: Tensor, group_size: int = GROUP_SIZE) -> tuple[Tensor, Tensor, Tensor]:
    """weight [N, K] -> (q [N, K] int32 in 0..15, scales [N, K / g], zeros [N, K / g]) in float32, with
    w ≈ (q - 8) * scale + zero: per group, the minimum maps to q = 0 and the maximum to q = 15."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = ((groups - low[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.int32)
    return q.reshape(n, k), scales, low + 8 * scales


def quantize_q8_0(weight: Tensor, group_size: int = GROUP_SIZE) -> tuple[Tensor, Tensor]:
    """weight [N, K] -> (q [N, K] in -127..127, scales [N, K / g]) in float32 with w ≈ q * scale: per group, the
    largest magnitude maps to ±127. A Q8_0 checkpoint's weights (held in bfloat16) get their own grid back."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // group_size, group_size)
    scales = (groups.abs().amax(-1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return (groups / scales[..., None]).round().clamp(-127, 127).reshape(n, k), scales


def dequantize_int4(q: Tensor, scales: Tensor, zeros: Tensor, group_size: int = GROUP_SIZE) -> Tensor:
    """The float32 weight [N, K] that `quantize_int4`'s output stands for."""
    n, k = q.shape
    groups = (q.reshape(n, k // group_size, group_size).float() - 8) * scales[..., None] + zeros[..., None]
    return groups.reshape(n, k)


class ReorderedWeight:
    """A frozen float32 weight [N, K] reordered once into oneDNN's blocked layout, for the float32 passes a packed
    kernel does not take on CPUs where torch's default GEMM is slow for few rows (`onednn_float32_pays`). The same
    product as F.linear up to the order of the sums."""

    def __init__(self, weight: Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to("cpu", torch.float32), None)

    def takes(self, x: Tensor) -> bool:
        """float32 rows on the CPU, without autograd (the op has no backward) and outside torch.compile's trace
        (which takes the plain weight and orders it itself)."""
        return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling())

    def __call__(self, x: Tensor) -> Tensor:
        """x [..., K] -> x @ W.T [..., N]."""
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight, None, "none", [None], "")
        return y.reshape(*x.shape[:-1], self.out_features)


class PackedWeight:
    """A frozen weight [N, K] packed for one of torch's weight-only CPU kernels. Not an nn.Module: it never
    enters a state dict, and `model.to(dtype)` leaves it alone (its scales are bfloat16, the kernels' dtype).
    `reordered`: also keep the dense weight reordered for oneDNN (`ReorderedWeight`), which `apply` uses for the
    passes too large for the packed kernel (which then stops at `packed_max_rows(mode, reordered=True)` rows)."""

    def __init__(self, weight: Tensor, mode: str, max_rows: int | None = None, reordered: bool = False) -> None:
        if mode not in PACKED_MODES:
            raise ValueError(f"mode must be one of {PACKED_MODES}, got {mode!r}")
        if not self.fits(weight, mode):
            raise ValueError(f"torch's {mode} kernel does not take a weight of shape {tuple(weight.shape)}")
        self.mode, self.out_features, self.in_features = mode, *weight.shape
        # where packed beats dense
        self.max_rows = packed_max_rows(mode, reordered) if max_rows is None else max_rows
        self.reordered = ReorderedWeight(weight) if reordered else None
        weight = weight.detach().to("cpu", torch.float32)
        if mode == "int4_vnni":
            q, scales, zeros = quantize_int4(weight)
            self.packed = cpu_kernels.pack(q, scales, zeros)
            self.scales = torch.empty(0, dtype=torch.bfloat16)  # inside `packed`
        elif mode == "int4":
            q, scales, zeros = quantize_int4(weight)
            self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
            # [K / g, N, 2]: the kernel's layout of (scale, zero) pairs
            self.scales = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        elif mode == "q8_0_vnni":
            q, scales = quantize_q8_0(weight)
            self.packed = cpu_kernels.pack_q8_0(q, scales)
            self.scales = torch.empty(0, dtype=torch.bfloat16)  # inside `packed`
        elif mode == "q8_0":
            q, scales = quantize_q8_0(weight)
            high = torch.floor(q / 16)  # -8..7, and the low nibble 0..15: q = 16 high + low
            planes = torch.cat([high + 8, q - 16 * high]).to(torch.int32)
            self.packed = torch._convert_weight_to_int4pack_for_cpu(planes, 1)
            # the int4 kernel's w = (p - 8) s + z: the high plane with s = 16 scale, z = 0; the low with s = scale,
            # z = 8 scale
            steps = torch.cat([16 * scales, scales])
            zeros = torch.cat([torch.zeros_like(scales), 8 * scales])
            self.scales = torch.stack([steps, zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        else:
            scales = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
            self.packed = (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
            self.scales = scales.to(torch.bfloat16)

    @staticmethod
    def fits(weight: Tensor, mode: str) -> bool:
        """Whether torch's kernel takes this shape: int4 (and q8_0, on it), inputs in whole groups and outputs in
        multiples of 16; int8, inputs in multiples of 16 (torch 2.13's kernel crashes on other widths instead of
        raising)."""
        out_features, in_features = weight.shape
        if mode in ("int4", "int4_vnni", "q8_0", "q8_0_vnni"):
            return in_features % GROUP_SIZE == 0 and out_features % 16 == 0
        return in_features % 16 == 0

    def takes(self, x: Tensor) -> bool:
        """Whether x [..., K] is small enough (and on the CPU) for the packed kernel to beat the dense weight."""
        return x.device.type == "cpu" and x.numel() // self.in_features <= self.max_rows

    def apply(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor | None:
        """x @ W.T by the packed kernel where it takes x, else by the reordered dense weight where it takes x;
        None: the caller's dense weight. `dtype`: the packed kernel's output's (default x's)."""
        if self.takes(x):
            return self(x, dtype)
        if self.reordered is not None and self.reordered.takes(x):
            return self.reordered(x)
        return None

    def __call__(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """x [..., K] -> x @ W.T [..., N] in `dtype` (default x's)."""
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != torch.bfloat16:  # a cast only where one is needed: ~1 us a call saved, 5 calls a layer
            rows = rows.to(torch.bfloat16)
        if not rows.is_contiguous():  # the int4 kernel refuses strided rows (a pass's last positions, [B, H])
            rows = rows.contiguous()
        y = packed_product(rows, self.packed, self.scales, self.mode)
        dtype = dtype or x.dtype
        if y.dtype != dtype:
            y = y.to(dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def packed_product(rows: Tensor, packed: Tensor, scales: Tensor, mode: str) -> Tensor:
    """rows [M, K] (bfloat16) @ W.T by torch's kernel for a weight packed in `mode` (`PACKED_MODES`): what a
    `PackedWeight` runs, and what the compiled layer (`canvaslm.models.aot`) traces with the weights as arguments.
    bfloat16, except q8_0's and q8_0_vnni's float32 (logits: q8_0's two planes' sum, rounded once)."""
    if mode == "int4":
        return torch._weight_int4pack_mm_for_cpu(rows, packed, GROUP_SIZE, scales)
    if mode == "int4_vnni":
        return cpu_kernels.int4_vnni_mm(rows, packed)
    if mode == "q8_0_vnni":
        return cpu_kernels.q8_0_vnni_mm(rows, packed)
    if mode == "q8_0":
        high, low = torch._weight_int4pack_mm_for_cpu(rows, packed, GROUP_SIZE, scales).float().chunk(2, dim=-1)
        return high + low
    return torch._weight_int8pack_mm(rows, packed, scales)


class QuantizedLinear(nn.Linear):
    """nn.Linear whose small passes run on a packed copy of its weight; the dense weight stays (same parameter,
    same state-dict name) for large passes and for anything that reads `.weight`."""

    packed: PackedWeight

    @classmethod
    def wrap(cls, linear: nn.Linear, mode: str, reordered: bool = False) -> QuantizedLinear:
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        out.weight, out.bias = linear.weight, linear.bias
        out.packed = PackedWeight(linear.weight, mode, reordered=reordered)
        return out

    def forward(self, x: Tensor) -> Tensor:
        y = self.packed.apply(x)
        if y is None:
            return super().forward(x)
        return y if self.bias is None else y + self.bias


# Linears of one module that read the same input, packed as one weight by `quantize` where the module's class lists
# the group in `FUSED` (its forward then calls `fused_outputs(module, group, x)`). torch's int4 kernel has a fixed
# cost per call (the casts to bfloat16 and back, the dispatch): at one row, SmolLM2's q/k/v and gate/up packed as
# two weights instead of five took 947 against 1,106 us a layer (one thread, 2-core AVX2 EPYC).
FUSED_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


class FusedLinears:
    """The packed concatenation of several linears' weights (rows in order), for the causal pass and, where the
    linears carry canvas-only adapters (`canvaslm.models.lora`), for the canvas pass (their merged canvas weights,
    for passes of up to `SMALL_PASS_ROWS` rows, as `quantize` packs them one by one). Each output row is packed
    exactly as the linear's own packed weight would be (int4 groups and int8 scales are per output row)."""

    def __init__(self, linears: list[nn.Module], mode: str, reordered: bool = False) -> None:
        self.sizes = [linear.weight.shape[0] for linear in linears]
        self.causal = PackedWeight(torch.cat([linear.weight for linear in linears]), mode, reordered=reordered)
        biases = [getattr(linear, "base", linear).bias for linear in linears]  # an adapter's is its base's
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(n, dtype=linears[0].weight.dtype) if b is None else b.detach()
             for b, n in zip(biases, self.sizes, strict=True)])
        self.adapters = [linear for linear in linears if hasattr(linear, "canvas_pass")]
        canvas = [getattr(linear, "canvas_weight", None) for linear in self.adapters]
        self.canvas_weights = canvas  # the merged weights packed below: new ones (new adapters) are not
        self.canvas = None
        if self.adapters and all(w is not None for w in canvas):
            weights = [linear.canvas_weight if hasattr(linear, "canvas_pass") else linear.weight
                       for linear in linears]
            self.canvas = PackedWeight(torch.cat(weights), mode, max_rows=SMALL_PASS_ROWS, reordered=reordered)

    def __call__(self, x: Tensor, sizes: list[int] | None = None) -> list[Tensor] | None:
        """The linears' outputs for x [..., K] through one packed (or reordered) weight, or None where the linears
        must run themselves: a pass too large for the packed kernel without a reordered weight, autograd, or
        adapters whose merged weights changed. `sizes`: split the outputs so instead (neighbours joined)."""
        if torch.is_grad_enabled():
            return None
        packed = self.in_pass()
        y = None if packed is None else packed.apply(x)
        if y is None:
            return None
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return list(y.split(sizes or self.sizes, dim=-1))

    def in_pass(self) -> PackedWeight | None:
        """The packed weight for the pass the adapters are set for: the causal one, or in the canvas pass the merged
        canvas weights' while they are current (None: the linears run themselves)."""
        if not (self.adapters and self.adapters[0].canvas_pass):
            return self.causal
        current = all(linear.canvas_weight is w for linear, w in zip(self.adapters, self.canvas_weights, strict=True))
        return self.canvas if current else None


def fused_outputs(module: nn.Module, group: str, x: Tensor, sizes: list[int] | None = None) -> list[Tensor] | None:
    """`module`'s `FUSED_GROUPS[group]` linears applied to x by their fused packed weight, or None: call them one
    by one (not quantized, or a pass the packed weight does not take). `sizes`: the outputs split so instead
    (neighbouring linears' outputs as one tensor)."""
    fused = module.__dict__.get("fused_" + group)
    return None if fused is None else fused(x, sizes)


BOUND_LAYERS = "_bound_layers"
"""Where a model keeps the weights its layers' passes were bound to (`Model.bound_layers`); `quantize`,
`canvaslm.models.lora.cache_canvas_weights` and adapters coming or going forget them (`forget_bound_layers`)."""


def forget_bound_layers(model: nn.Module) -> None:
    """Drop `model`'s bound layers: the weights they bound changed."""
    model.__dict__.pop(BOUND_LAYERS, None)


def packed_weight(module: nn.Module, group: str | None = None) -> PackedWeight | None:
    """The packed weight that alone runs a linear (`group`: the module's fused group, `fused_outputs`) in the pass
    its adapters are set for, as the module itself would run it at up to the weight's `max_rows` rows without
    autograd: no bias added, and for an adapter in the canvas pass its merged canvas weight, packed and current.
    None: the pass runs it otherwise (dense, an adapter's unmerged update, a bias)."""
    packed, bias = _packed_in_pass(module, group)
    return packed if bias is None else None


def _packed_in_pass(module: nn.Module, group: str | None) -> tuple[PackedWeight | None, Tensor | None]:
    """The packed weight the module tries first for a linear or fused group in its adapters' current pass (None:
    none), and the bias it adds."""
    if group is not None:
        fused = module.__dict__.get("fused_" + group)
        return (None, None) if fused is None else (fused.in_pass(), fused.bias)
    if hasattr(module, "canvas_pass"):  # an adapter (canvaslm.models.lora.LoRALinear)
        if module.canvas_pass:
            return (module.canvas_packed if module.canvas_weight is not None else None), module.base.bias
        module = module.base
    return (module.packed if isinstance(module, QuantizedLinear) else None), getattr(module, "bias", None)


class DenseLinears:
    """Linears run on their dense weights, bound for a pass (`dense_linears`): each one's weight and bias as its
    module runs it where no packed kernel takes the pass (or none was packed), their outputs joined."""

    def __init__(self, parts: list[tuple[Tensor, Tensor | None]]) -> None:
        self.parts = parts

    def __call__(self, x: Tensor) -> Tensor:
        if len(self.parts) == 1:
            return F.linear(x, *self.parts[0])
        return torch.cat([F.linear(x, weight, bias) for weight, bias in self.parts], dim=-1)


def dense_linears(module: nn.Module, group: str | None = None) -> tuple[DenseLinears, list[PackedWeight]] | None:
    """A linear (`group`: a module's group of linears, `FUSED_GROUPS`, in order, whether `quantize` packed them as
    one or not) as its module runs it in the pass its adapters are set for when no packed weight takes the pass,
    with the packed weights that would take a small enough one (a pass may be bound to the dense weights only above
    all their `max_rows`). None: it runs otherwise (an adapter's unmerged update, or a float32 weight reordered for
    oneDNN, which such a pass takes)."""
    names = FUSED_GROUPS[group] if group is not None else None
    linears = [getattr(module, name) for name in names] if names else [module]
    first, _ = _packed_in_pass(module, group) if group is not None else (None, None)
    guards = [first] if first is not None else []
    parts = []
    for linear in linears:
        packed, bias = _packed_in_pass(linear, None)
        if packed is not None:
            guards.append(packed)
        if hasattr(linear, "canvas_pass") and linear.canvas_pass:
            if linear.canvas_weight is None:
                return None
            parts.append((linear.canvas_weight, bias))
        else:
            base = getattr(linear, "base", linear)
            if type(base) not in (nn.Linear, QuantizedLinear):
                return None
            parts.append((base.weight, bias))
    if any(packed.reordered is not None for packed in guards):
        return None
    return DenseLinears(parts), guards


def causal_packed_weights(model: nn.Module) -> list[PackedWeight]:
    """Every packed weight `quantize` gave `model`'s causal pass: its packed linears', its fused groups' and its
    head's (not the canvas-only adapters' copies, which keep `SMALL_PASS_ROWS`)."""
    weights = []
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            weights.append(module.packed)
        weights += [module.__dict__["fused_" + g].causal for g in FUSED_GROUPS if "fused_" + g in module.__dict__]
    if getattr(model, "packed_head", None) is not None:
        weights.append(model.packed_head)
    return weights


def head_logits(hidden: Tensor, weight: Tensor, packed: PackedWeight | None) -> Tensor:
    """hidden [..., H] @ weight.T through the packed head (or its reordered weight) when it takes this pass
    (float32 logits [..., V])."""
    logits = None if packed is None else packed.apply(hidden, torch.float32)
    if logits is not None:
        return logits.float()
    # as rows: a bfloat16 [B, 1, H] slice of a longer pass (the last position's hidden state) keeps its parent's
    # strides, and F.linear then copies the whole [V, H] head per call (torch 2.13 on the CPU: ~80 ms, not ~2)
    rows = hidden.reshape(-1, hidden.shape[-1])
    return F.linear(rows, weight).float().view(*hidden.shape[:-1], weight.shape[0])


def int4_mode() -> str:
    """How int4 weights are packed: "int4_vnni" where our kernel runs (`cpu_kernels.load`: AVX-512 VNNI, built here),
    else "int4" (torch's kernel)."""
    return "int4_vnni" if cpu_kernels.load() else "int4"


def quantize(model: nn.Module, mode: str, fuse: bool = True, reorder: bool | None = None) -> list[str]:
    """Pack the decoder layers' linears (int4 or int8) and the output head (`head_mode()`) of `model` in place, for CPU
    inference; "none" does nothing. Returns the names of the packed linears. Linears whose shape torch's kernel
    does not take stay dense. `fuse`: the groups a layer's classes list in `FUSED` as one weight each (the same
    products bit for bit, in fewer kernel calls); False packs every linear alone (`canvaslm bench passes`'s
    `unfused` variants). `reorder`: every packed weight also keeps its dense weight reordered for oneDNN
    (`ReorderedWeight`) for the larger passes; None: where `onednn_float32_pays` and the model is float32."""
    if mode not in QUANTIZE_CHOICES:
        raise CheckpointError("quantize", "unknown quantization", expected=" | ".join(QUANTIZE_CHOICES), found=mode)
    if mode == "none":
        return []
    forget_bound_layers(model)
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise CheckpointError("quantize", f"weight-only {mode} runs on torch's CPU kernels; the model is on {device}",
                              expected="--quantize none off the CPU")
    if reorder is None:
        reorder = onednn_float32_pays(device) and next(model.parameters()).dtype == torch.float32
    kernel = int4_mode() if mode == "int4" else mode  # how the weights are packed
    packed, fused = [], set()
    for name, module in list(model.named_modules()):
        if not name.startswith("layers."):
            continue
        for group in getattr(type(module), "FUSED", ()) if fuse else ():
            names = FUSED_GROUPS[group]
            linears = [getattr(module, leaf) for leaf in names]
            if PackedWeight.fits(torch.cat([linear.weight for linear in linears]), mode):
                module.__dict__["fused_" + group] = FusedLinears(linears, kernel, reorder)  # not a submodule: no state
                fused.update(f"{name}.{leaf}" for leaf in names)
                packed += [f"{name}.{leaf}" for leaf in names]
    for name, module in list(model.named_modules()):
        if any(name == f or name.startswith(f + ".") for f in fused):  # packed as part of their group
            continue
        if type(module) is nn.Linear and name.startswith("layers.") and PackedWeight.fits(module.weight, mode):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, QuantizedLinear.wrap(module, kernel, reorder))
            packed.append(name)
    for name, module in model.named_modules():
        # canvas-only adapters' merged canvas weights, for verified drafts only: a canvas of 16 rows cost the same
        # packed or dense (45 / 47 ms), so the canvas sampler keeps the dense weights (packing adds the rounding of
        # weights off the GGUF's grid) while a 4-row draft runs in 21 ms instead of 36
        if getattr(module, "canvas_weight", None) is not None and PackedWeight.fits(module.canvas_weight, mode) \
                and name not in fused:
            module.canvas_packed = PackedWeight(module.canvas_weight, kernel, max_rows=SMALL_PASS_ROWS,
                                                reordered=reorder)
            packed.append(f"{name}.canvas_weight")
    model.small_pass_rows = SMALL_PASS_ROWS if mode == "int4" else None  # the int4 kernel's small-pass path
    head = model.embed_tokens.weight if getattr(model, "lm_head", None) is None else model.lm_head.weight
    mode = next((m for m in (head_mode(cpu_kernels.load()), "int8") if PackedWeight.fits(head, m)), None)
    model.packed_head = None if mode is None else PackedWeight(head, mode, reordered=reorder)
    return packed
