"""A decoder layer's pass on packed weights, compiled ahead of time (`canvaslm.load(compile="layers")`).

An eager pass runs ~40 small ops a layer around its products (norms, the rotation, the split of q/k/v, the gate,
the residuals); on a 2-core CPU they cost about as much as the int4 products of a SmolLM2 pass. AOTInductor
(torch.export + `torch._inductor.aoti_compile_and_package`) fuses them into a few C++ kernels around torch's own
packed kernels and SDPA, and writes a shared library that loads in milliseconds. The weights are the function's
arguments, so one program serves all layers, the causal pass and the canvas pass (whose merged weights are
another packed set), any rows and any cache length: one build of ~20-50 s per model shape, kept in
`$CANVASLM_HOME/compiled/` and reused by every later run. `torch.compile` of whole passes (`compile=True`) takes
minutes to start and traces again in every process.

The program is the math of `llama.BoundLayer` (which stays the reference and runs every pass the program does not
take: `LayerProgram.run`); it rounds differently (inductor fuses in float32), so its logits match the eager pass to
bfloat16's precision, not bit for bit (`tests/models/test_aot_layers.py`)."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from canvaslm.errors import CanvasError
from canvaslm.hardware import cpu_flags, one_query_sdpa_max_rows
from canvaslm.models.quant import forget_bound_layers, packed_product


def product(x: Tensor, packed: Tensor, scales: Tensor, mode: str) -> Tensor:
    """x [..., K] @ W.T by torch's packed kernel (`quant.packed_product`, bfloat16 rows)."""
    y = packed_product(x.reshape(-1, x.shape[-1]), packed, scales, mode)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def layer_pass(x: Tensor, cos: Tensor, sin: Tensor, cached_k: Tensor, cached_v: Tensor, mask: Tensor | None,
               input_norm: Tensor, qkv: Tensor, qkv_scales: Tensor, o: Tensor, o_scales: Tensor, post_norm: Tensor,
               gate_up: Tensor, gate_up_scales: Tensor, down: Tensor, down_scales: Tensor, *,
               sizes: tuple[int, int, int], eps: float, act: Callable[[Tensor], Tensor], modes: tuple[str, ...]
               ) -> tuple[Tensor, Tensor, Tensor]:
    """`BoundLayer.__call__` on packed weights for x [B, n, H] at positions cos/sin [B, 1, n, D] after cached keys and
    values [B, Hkv, T, D], mask None or [B, 1, G * n, T + n] (`cache.pass_mask`'s layout): the layer's output and
    the keys and values [B, Hkv, T + n, D] its attention read (what a causal pass stores)."""
    from canvaslm.models.llama import (  # the layer's own pieces (llama imports this module)
        apply_rope,
        rms_norm,
    )
    heads, kv_heads, dim = sizes
    b, n, _ = x.shape
    qk, v = product(rms_norm(x, input_norm, eps), qkv, qkv_scales, modes[0]).split(
        [(heads + kv_heads) * dim, kv_heads * dim], dim=-1)
    qk = apply_rope(qk.reshape(b, n, heads + kv_heads, dim).transpose(1, 2), cos, sin)
    q, k = qk.split([heads, kv_heads], dim=1)
    v = v.reshape(b, n, kv_heads, dim).transpose(1, 2)
    k, v = torch.cat([cached_k, k], dim=2), torch.cat([cached_v, v], dim=2)
    # `cache.attend`'s grouped layout: a kv head's query heads as one longer sequence
    out = F.scaled_dot_product_attention(q.reshape(b, kv_heads, heads // kv_heads * n, dim), k, v, attn_mask=mask,
                                         scale=dim ** -0.5)
    out = out.reshape(b, heads, n, dim).transpose(1, 2).reshape(b, n, heads * dim)
    x = x + product(out, o, o_scales, modes[1])
    gate, up = product(rms_norm(x, post_norm, eps), gate_up, gate_up_scales, modes[2]).chunk(2, dim=-1)
    return x + product(act(gate) * up, down, down_scales, modes[3]), k, v


class _Masked(torch.nn.Module):
    def __init__(self, static: dict[str, Any]) -> None:
        super().__init__()
        self.static = static

    def forward(self, x, cos, sin, cached_k, cached_v, mask, input_norm, qkv, qkv_scales, o, o_scales, post_norm,
                gate_up, gate_up_scales, down, down_scales):
        return layer_pass(x, cos, sin, cached_k, cached_v, mask, input_norm, qkv, qkv_scales, o, o_scales,
                          post_norm, gate_up, gate_up_scales, down, down_scales, **self.static)


class _Unmasked(torch.nn.Module):
    def __init__(self, static: dict[str, Any]) -> None:
        super().__init__()
        self.static = static

    def forward(self, x, cos, sin, cached_k, cached_v, input_norm, qkv, qkv_scales, o, o_scales, post_norm,
                gate_up, gate_up_scales, down, down_scales):
        return layer_pass(x, cos, sin, cached_k, cached_v, None, input_norm, qkv, qkv_scales, o, o_scales,
                          post_norm, gate_up, gate_up_scales, down, down_scales, **self.static)


def weights_of(layer: Any) -> tuple[Tensor, ...]:
    """A packed `BoundLayer`'s tensors in `layer_pass`'s order."""
    return (layer.input_norm, layer.qkv.packed, layer.qkv.scales, layer.o.packed, layer.o.scales, layer.post_norm,
            layer.gate_up.packed, layer.gate_up.scales, layer.down.packed, layer.down.scales)


class LayerProgram:
    """The compiled `layer_pass` of one model shape, masked and unmasked, loaded from a folder of built libraries
    or built there (`build`)."""

    def __init__(self, masked: Callable[[list[Tensor]], list[Tensor]],
                 unmasked: Callable[[list[Tensor]], list[Tensor]], dtype: torch.dtype,
                 groups: int, weights: tuple[tuple[str, tuple[int, ...]], ...]) -> None:
        self.masked, self.unmasked, self.dtype, self.groups = masked, unmasked, dtype, groups
        self.weights = weights  # each linear's packed mode and shape: the library was traced for them
        self.calls = 0  # passes' layers it ran (tests, `bench`)
        self._last: tuple | None = None  # the last pass's rope, mask and x's layout, and its inputs

    def fits(self, layer: Any) -> bool:
        """Whether packed `BoundLayer` `layer` has the packed modes and shapes the library was traced for (each
        layer is bound to the program only then: `Model._bind_packed`)."""
        return _packed_shapes(layer) == self.weights

    def bind(self, layer: Any) -> ProgramLayer:
        """The program for one layer that `fits`: what `BoundLayer.program` holds."""
        return ProgramLayer(self, layer.index, weights_of(layer))

    def run(self, layer: ProgramLayer, x: Tensor, rope: tuple[Tensor, Tensor], cache: Any, mask: Tensor | None,
            write: bool) -> Tensor | None:
        """The layer's output for this pass, None where the program does not take it (the layer then runs
        eagerly): another dtype or device, a sliding window or an empty cache, a mask other than None or the
        grouped boolean layout, or one query in more rows than the fused attention kernel serves (`cache.attend`'s
        matmuls)."""
        i = layer.index
        if cache.windows[i] is not None:
            return None
        inputs = self._pass_inputs(x, rope, mask)
        cached_k, cached_v = cache.keys[i], cache.values[i]
        if inputs is None or cached_k is None or cached_k.shape[2] != cache.length or cached_k.shape[0] != x.shape[0]:
            return None
        cos, sin, mask = inputs
        if mask is None:
            out, k, v = self.unmasked([x.contiguous(), cos, sin, cached_k.contiguous(), cached_v.contiguous(),
                                       *layer.weights])
        else:
            out, k, v = self.masked([x.contiguous(), cos, sin, cached_k.contiguous(), cached_v.contiguous(), mask,
                                     *layer.weights])
        if write:  # what `KVCache.extend` stores for a full layer: the keys the pass read
            cache.keys[i], cache.values[i] = k, v
        self.calls += 1
        return out

    def _pass_inputs(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None
                     ) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """cos, sin and the mask as the library reads them (contiguous, at its traced layout), or None where it
        does not take the pass. Every layer of a pass gets the same rope and mask: they are laid out once a pass
        (kept with the tensors they came from, so an identity check cannot match a freed one's successor)."""
        b, n, _ = x.shape
        last = self._last
        if last is not None and last[0] is rope[0] and last[1] is rope[1] and last[2] is mask and \
                last[3] == x.shape and last[4] == x.dtype and last[5] == x.device:
            return last[6]
        inputs, grouped = None, mask
        if x.dtype == self.dtype and x.device.type == "cpu" and not (n == 1 and b > one_query_sdpa_max_rows("cpu")):
            if mask is not None and n == 1 and mask.dtype == torch.bool and mask.shape[2] == 1:
                grouped = mask.expand(b, 1, self.groups, mask.shape[3])  # one query's row, for each head of a group
            if grouped is None or (grouped.dtype == torch.bool and grouped.shape[2] == self.groups * n):
                cos, sin = (r.expand(b, 1, n, r.shape[-1]).contiguous() for r in rope)  # [n, D] or [B, 1, n, D]
                inputs = (cos, sin, None if grouped is None else grouped.contiguous())
        self._last = (rope[0], rope[1], mask, x.shape, x.dtype, x.device, inputs)
        return inputs

    @classmethod
    def build(cls, layer: Any, dtype: torch.dtype, folder: Path, progress: bool = True,
              retry_failed: bool = True) -> LayerProgram:
        """The program for the shape of packed `BoundLayer` `layer` (its sizes, norm epsilon, activation and
        packed modes) in `dtype`: loaded if built before on this machine's kind of CPU and torch, at this number of
        threads (inductor writes it into its loops), else compiled (~20-50 s for SmolLM2 on a 2-core Xeon) and
        kept. A CanvasError says why where it cannot be built (no C++ compiler, a torch without AOTInductor, a
        folder it cannot write) and leaves a note beside the libraries: with retry_failed=False (the compiled layer
        by default, `canvaslm.load(compile="auto")`) a build that failed on this machine is not tried again."""
        heads, kv_heads, dim = layer.sizes
        modes = tuple(w.mode for w in (layer.qkv, layer.o, layer.gate_up, layer.down))
        static = {"sizes": tuple(layer.sizes), "eps": float(layer.eps), "act": layer.act, "modes": modes}
        act = getattr(layer.act, "__name__", repr(layer.act))
        flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))
        key = hashlib.sha256(json.dumps([_source(), torch.__version__, static["sizes"], static["eps"], act, modes,
                                         str(dtype), flags, layer.qkv.in_features, torch.get_num_threads()]).encode()
                             ).hexdigest()[:16]
        paths = {name: folder / f"layer-{key}-{name}.pt2" for name in ("masked", "unmasked")}
        failed = folder / f"layer-{key}.failed"
        if not retry_failed and failed.exists():
            raise CanvasError(f"the compiled layer failed to build here before ({_first_line(failed)}); "
                              f"delete {failed} or run with --compile-layers to try again")
        missing = [name for name, path in paths.items() if not path.exists()]
        if missing and progress:
            print(f"canvaslm: compiling the decoder layer for this CPU, once per model shape (~20-50 s; kept in "
                  f"{folder}; --no-compile-layers skips it)", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            for name in missing:
                _compile({"masked": _Masked, "unmasked": _Unmasked}[name](static),
                         _examples(layer, dtype, name == "masked"), paths[name], name == "masked")
            programs = [_load(paths[name]) for name in ("masked", "unmasked")]
        except CanvasError as error:
            with contextlib.suppress(OSError):
                failed.write_text(f"{error}\n")
            raise
        failed.unlink(missing_ok=True)
        if missing and progress:
            print(f"canvaslm: compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        return cls(programs[0], programs[1], dtype, heads // kv_heads, _packed_shapes(layer))


def _first_line(path: Path) -> str:
    try:
        return path.read_text().strip().splitlines()[0]
    except (OSError, IndexError):
        return "no reason kept"


def _load(path: Path) -> Callable[[list[Tensor]], list[Tensor]]:
    """A built library's entry point: its inputs in order as a list, its outputs as a list. torch's own loader
    (`torch._inductor.aoti_load_package`) imports inductor (~1 s) and rebuilds the call's tree spec on every call
    (~15 us, 30 times a pass); its runner is the same. A CanvasError names a file this torch cannot read."""
    try:
        return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1).boxed_run
    except Exception as error:  # noqa: BLE001 -- the loader raises many kinds; say which file
        raise CanvasError(f"{path}: cannot load the compiled layer ({type(error).__name__}: "
                          f"{_message(error)}); delete it to build it again") from error


def _message(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else ""


class ProgramLayer:
    """A `LayerProgram` bound to one layer: its index and its weights in `layer_pass`'s order, gathered once."""

    __slots__ = ("program", "index", "weights")

    def __init__(self, program: LayerProgram, index: int, weights: tuple[Tensor, ...]) -> None:
        self.program, self.index, self.weights = program, index, weights

    def __call__(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: Any, mask: Tensor | None,
                 write: bool) -> Tensor | None:
        return self.program.run(self, x, rope, cache, mask, write)


def _packed_shapes(layer: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((w.mode, tuple(w.packed.shape)) for w in (layer.qkv, layer.o, layer.gate_up, layer.down))


def _source() -> str:
    """The code a program is built from: a package built by other code is never loaded."""
    from canvaslm.models.llama import apply_rope, rms_norm
    return "".join(inspect.getsource(f) for f in (layer_pass, product, packed_product, apply_rope, rms_norm,
                                                  _examples))


def _examples(layer: Any, dtype: torch.dtype, masked: bool) -> tuple[Tensor, ...]:
    """Inputs for tracing: sizes that differ from each other and from 0 and 1, so that export keeps them
    symbolic and no two are taken for one."""
    heads, kv_heads, dim = layer.sizes
    batch, rows, keys = 2, 5, 7
    hidden = layer.input_norm.shape[0]
    x = torch.randn(batch, rows, hidden, dtype=dtype)
    cos, sin = torch.randn(batch, 1, rows, dim, dtype=dtype), torch.randn(batch, 1, rows, dim, dtype=dtype)
    cached = torch.randn(batch, kv_heads, keys, dim, dtype=dtype)
    mask = torch.ones(batch, 1, heads // kv_heads * rows, keys + rows, dtype=torch.bool)
    head = (x, cos, sin, cached, cached.clone()) + ((mask,) if masked else ())
    return head + tuple(w.detach() for w in weights_of(layer))


def _compile(module: torch.nn.Module, examples: tuple[Tensor, ...], path: Path, masked: bool) -> None:
    auto = torch.export.Dim.AUTO
    shapes: list[dict[int, Any]] = [{0: auto, 1: auto}, {0: auto, 2: auto}, {0: auto, 2: auto}, {0: auto, 2: auto},
                                    {0: auto, 2: auto}]
    if masked:
        shapes.append({0: auto, 2: auto, 3: auto})
    shapes += [{} for _ in range(10)]
    part = path.with_name(f"{path.stem}.{os.getpid()}.part.pt2")  # the packager wants a .pt2 name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations inside export, not the user's
            program = torch.export.export(module, examples, dynamic_shapes=tuple(shapes))
            torch._inductor.aoti_compile_and_package(program, package_path=str(part))
    except Exception as error:  # noqa: BLE001 -- inductor raises many kinds; say what failed, keep its message
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)
        raise CanvasError(f"compiling the decoder layer into {path} failed ({type(error).__name__}: "
                          f"{_message(error)}); run with --no-compile-layers") from error
    part.replace(path)  # whole or not at all: a run stopped mid-build leaves no package to load


def refusal(model: Any) -> str | None:
    """Why `model` cannot run the compiled layer (a sentence that says what to change), or None: it runs
    Llama-family models in bfloat16 on the CPU, quantized (`quant.quantize`)."""
    weight = model.embed_tokens.weight
    if not hasattr(model, "_bind_packed"):
        return (f"--compile-layers: {type(model).__name__} models have no compiled layer yet (Llama-family models "
                "do); use --compile")
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
        return (f"--compile-layers runs bfloat16 models on the CPU; this one is {weight.dtype} on "
                f"{weight.device.type} (use --dtype bfloat16 or auto, or --compile)")
    if model._bind_packed() is None:
        return "--compile-layers runs the layers on packed weights: load the model with --quantize int4, int8 or auto"
    return None


def compile_layers(model: Any, folder: Path, progress: bool = True, retry_failed: bool = True) -> LayerProgram:
    """Run `model`'s passes on packed weights through its compiled layer (`LayerProgram.build`), its libraries
    kept in `folder` (`canvaslm.load`: `$CANVASLM_HOME/compiled`). A CanvasError says what is missing (`refusal`)
    or why the build failed."""
    reason = refusal(model)
    if reason is not None:
        raise CanvasError(reason)
    layer = model._bind_packed().layers[0]
    model.layer_program = LayerProgram.build(layer, model.embed_tokens.weight.dtype, folder, progress, retry_failed)
    forget_bound_layers(model)  # bound again, with the program
    return model.layer_program
