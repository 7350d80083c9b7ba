"""A decoder layer's pass, compiled ahead of time (`canvaslm.load(compile="layers")`).

An eager pass runs ~40 small ops a layer around its products (norms, the rotation, the split of q/k/v, the gate,
the residuals); on a 2-core CPU they cost about as much as the int4 products of a SmolLM2 pass. AOTInductor
(torch.export + `torch._inductor.aoti_compile_and_package`) fuses them into a few C++ kernels around the packed
kernels (torch's own, or ours where the CPU runs them: `canvaslm.models.cpu_kernels`) and SDPA, and writes a shared
library that loads in milliseconds. The weights are the function's
arguments, so one program serves all layers, the causal pass and the canvas pass (whose merged weights are
another packed set), any rows and any cache length: one build of ~20-50 s per model shape, kept in
`$CANVASLM_HOME/compiled/` and reused by every later run. `torch.compile` of whole passes (`compile=True`) takes
minutes to start and traces again in every process.

Two kinds of program, as `llama.Model` binds its layers: on the packed weights (the small passes: AR steps, commits
and canvases at batch 1 and in small batches), and on the dense weights for a server's large batches
(`compile_layers(..., dense=True)`, which `canvaslm serve` asks for): their commits and canvases, and their AR steps
of one query in many rows, whose attention runs as two matmuls (`cache.attend`'s way there).

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
from canvaslm.hardware import cpu_flags, one_query_sdpa_max_rows, packed_max_rows
from canvaslm.models.quant import DenseLinears, PackedWeight, forget_bound_layers, packed_product


def product(x: Tensor, packed: Tensor, scales: Tensor, mode: str) -> Tensor:
    """x [..., K] @ W.T by torch's packed kernel (`quant.packed_product`, bfloat16 rows)."""
    y = packed_product(x.reshape(-1, x.shape[-1]), packed, scales, mode)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def layer_pass(x: Tensor, cos: Tensor, sin: Tensor, cached_k: Tensor, cached_v: Tensor, mask: Tensor | None,
               input_norm: Tensor, post_norm: Tensor, qkv: Linear, o: Linear, gate_up: Linear, down: Linear, *,
               sizes: tuple[int, int, int], eps: float, act: Callable[[Tensor], Tensor], one_query: bool
               ) -> tuple[Tensor, Tensor, Tensor]:
    """`BoundLayer.__call__` for x [B, n, H] at positions cos/sin [B, 1, n, D] after cached keys and values
    [B, Hkv, T, D], with its linears as functions (`_Program`: packed or dense): the layer's output and the keys and
    values [B, Hkv, T + n, D] its attention read (what a causal pass stores). mask: None or [B, 1, G * n, T + n]
    (`cache.pass_mask`'s layout); with one_query (n = 1 in many rows), [B, 1, 1, T + 1]."""
    from canvaslm.models.llama import (  # the layer's own pieces (llama imports this module)
        apply_rope,
        rms_norm,
    )
    heads, kv_heads, dim = sizes
    b, n, _ = x.shape
    qk, v = qkv(rms_norm(x, input_norm, eps)).split([(heads + kv_heads) * dim, kv_heads * dim], dim=-1)
    qk = apply_rope(qk.reshape(b, n, heads + kv_heads, dim).transpose(1, 2), cos, sin)
    q, k = qk.split([heads, kv_heads], dim=1)
    v = v.reshape(b, n, kv_heads, dim).transpose(1, 2)
    k, v = torch.cat([cached_k, k], dim=2), torch.cat([cached_v, v], dim=2)
    if one_query:  # `cache.attend`'s matmuls for one query in many rows: a kv head's query heads as rows
        scores = (q.reshape(b, kv_heads, heads // kv_heads, dim) @ k.transpose(-1, -2)).float() * dim ** -0.5
        scores = scores.masked_fill(~mask[:, :, 0, None, :], float("-inf"))
        out = (scores.softmax(dim=-1).to(v.dtype) @ v).reshape(b, n, heads * dim)
    else:  # `cache.attend`'s grouped layout: a kv head's query heads as one longer sequence
        out = F.scaled_dot_product_attention(q.reshape(b, kv_heads, heads // kv_heads * n, dim), k, v,
                                             attn_mask=mask, scale=dim ** -0.5)
        out = out.reshape(b, heads, n, dim).transpose(1, 2).reshape(b, n, heads * dim)
    x = x + o(out)
    gate, up = gate_up(rms_norm(x, post_norm, eps)).chunk(2, dim=-1)
    return x + down(act(gate) * up), k, v


Linear = Callable[[Tensor], Tensor]

# each kind of program's libraries: (name, masked, one query)
LIBRARIES = {"packed": (("masked", True, False), ("unmasked", False, False)),
             "dense": (("masked", True, False), ("one-query", True, True))}


class _Program(torch.nn.Module):
    """`layer_pass` with its inputs as one list, as the library's runner takes them: x, cos, sin, the cached keys
    and values, the mask where `masked`, then the layer's weights (`weights_of`)."""

    def __init__(self, static: dict[str, Any], kind: str, masked: bool, one_query: bool) -> None:
        super().__init__()
        self.static, self.kind, self.masked, self.one_query = static, kind, masked, one_query

    def forward(self, inputs: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        x, cos, sin, cached_k, cached_v = inputs[:5]
        mask = inputs[5] if self.masked else None
        weights = inputs[5 + self.masked:]
        if self.kind == "packed":
            input_norm, qkv, qkv_scales, o, o_scales, post_norm, gate_up, gate_up_scales, down, down_scales = weights
            modes = self.static["modes"]
            linears = (lambda h: product(h, qkv, qkv_scales, modes[0]), lambda h: product(h, o, o_scales, modes[1]),
                       lambda h: product(h, gate_up, gate_up_scales, modes[2]),
                       lambda h: product(h, down, down_scales, modes[3]))
        else:  # as `quant.DenseLinears` joins them
            input_norm, q, k, v, o, post_norm, gate, up, down = weights
            linears = (lambda h: torch.cat([F.linear(h, q), F.linear(h, k), F.linear(h, v)], dim=-1),
                       lambda h: F.linear(h, o), lambda h: torch.cat([F.linear(h, gate), F.linear(h, up)], dim=-1),
                       lambda h: F.linear(h, down))
        return layer_pass(x, cos, sin, cached_k, cached_v, mask, input_norm, post_norm, *linears,
                          sizes=self.static["sizes"], eps=self.static["eps"], act=self.static["act"],
                          one_query=self.one_query)


def kind_of(layer: Any) -> str | None:
    """"packed" or "dense": the kind of program a `BoundLayer` runs on (`weights_of`), None where neither takes it
    (a dense linear with a bias)."""
    linears = (layer.qkv, layer.o, layer.gate_up, layer.down)
    if all(isinstance(w, PackedWeight) for w in linears):
        return "packed"
    if all(isinstance(w, DenseLinears) and all(bias is None for _, bias in w.parts) for w in linears) and \
            [len(w.parts) for w in linears] == [3, 1, 2, 1]:
        return "dense"
    return None


def weights_of(layer: Any) -> tuple[Tensor, ...]:
    """A `BoundLayer`'s tensors in `_Program`'s order: its norms and its packed weights and scales, or its dense
    weights."""
    if kind_of(layer) == "packed":
        return (layer.input_norm, layer.qkv.packed, layer.qkv.scales, layer.o.packed, layer.o.scales,
                layer.post_norm, layer.gate_up.packed, layer.gate_up.scales, layer.down.packed, layer.down.scales)
    (q, _), (k, _), (v, _) = layer.qkv.parts
    (gate, _), (up, _) = layer.gate_up.parts
    return (layer.input_norm, q, k, v, layer.o.parts[0][0], layer.post_norm, gate, up, layer.down.parts[0][0])


class LayerProgram:
    """The compiled `layer_pass` of one model shape and kind (`LIBRARIES`), loaded from a folder of built libraries
    or built there (`build`)."""

    def __init__(self, kind: str, libraries: dict[str, Callable[[list[Tensor]], list[Tensor]]], dtype: torch.dtype,
                 groups: int, weights: tuple[tuple[Any, ...], ...], kv_shape: tuple[int, int]) -> None:
        self.kind, self.libraries, self.dtype, self.groups = kind, libraries, dtype, groups
        self.kv_shape = kv_shape  # (kv heads, head dim): an empty cache's keys, as none held
        self.weights = weights  # each weight's shape (and packed mode): the library was traced for them
        self.calls = 0  # passes' layers it ran (tests, `bench`)
        self._last: tuple | None = None  # the last pass's rope, mask and x's layout, and its inputs

    def fits(self, layer: Any) -> bool:
        """Whether `BoundLayer` `layer` is of the kind and has the weights' shapes (and packed modes) the library was
        traced for (each layer is bound to the program only then: `Model._bind_packed`, `_bind_dense`)."""
        return kind_of(layer) == self.kind and _shapes(layer) == self.weights

    def bind(self, layer: Any) -> ProgramLayer:
        """The program for one layer that `fits`: what `BoundLayer.program` holds."""
        return ProgramLayer(self, layer.index, weights_of(layer))

    def run(self, layer: ProgramLayer, x: Tensor, rope: tuple[Tensor, Tensor], cache: Any, mask: Tensor | None,
            write: bool) -> Tensor | None:
        """The layer's output for this pass, None where the program does not take it (the layer then runs
        eagerly): another dtype or device, a sliding window, or a mask other than None or the grouped boolean
        layout. A prompt's first chunk (an empty cache) reads no cached keys: on the 2-core AVX-512 EPYC, 20 tokens
        of `smol-ar` took 29.5 ms in the library's 30 layers against 45.5 ms for the eager pass (its head included;
        `runs/s44/empty.py`). One query (an AR step, a commit of one token) goes through the fused attention
        kernel on packed weights at every row count they serve (`hardware.packed_max_rows`): on the 2-core AVX-512
        EPYC without AMX, where the eager layers take the matmuls from one row up, the kernel in the library took
        AR steps of `smol-ar` as fast as a library of the matmuls did from 16 to 32 rows and 10% faster at one row
        (`runs/s44/ab_oneq.py`); in more rows, on the dense weights, one query takes the matmuls' library."""
        i = layer.index
        if cache.windows[i] is not None:
            return None
        inputs = self._pass_inputs(x, rope, mask, cache.length + x.shape[1])
        cached_k, cached_v = cache.keys[i], cache.values[i]
        if cached_k is None and cache.length == 0:  # a prompt's first chunk
            kv_heads, dim = self.kv_shape
            cached_k = cached_v = x.new_empty(x.shape[0], kv_heads, 0, dim)
        if inputs is None or cached_k is None or cached_k.shape[2] != cache.length or cached_k.shape[0] != x.shape[0]:
            return None
        library, cos, sin, mask = inputs
        head = [x.contiguous(), cos, sin, cached_k.contiguous(), cached_v.contiguous()]
        out, k, v = library([*head, *layer.weights] if mask is None else [*head, mask, *layer.weights])
        if write:  # what `KVCache.extend` stores for a full layer: the keys the pass read
            cache.keys[i], cache.values[i] = k, v
        self.calls += 1
        return out

    def _pass_inputs(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, keys: int
                     ) -> tuple[Callable[[list[Tensor]], list[Tensor]], Tensor, Tensor, Tensor | None] | None:
        """The library for this pass over `keys` keys, with cos, sin and the mask as it reads them (contiguous, at
        its traced layout), or None where none takes the pass. Every layer of a pass gets the same rope and mask:
        they are laid out once a pass (kept with the tensors they came from, so an identity check cannot match a
        freed one's successor)."""
        last = self._last
        if last is not None and last[0] is rope[0] and last[1] is rope[1] and last[2] is mask and \
                last[3] == x.shape and last[4] == keys and last[5] == x.dtype and last[6] == x.device:
            return last[7]
        self._last = (rope[0], rope[1], mask, x.shape, keys, x.dtype, x.device, self._lay_out(x, rope, mask, keys))
        return self._last[7]

    def _lay_out(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, keys: int
                 ) -> tuple[Callable[[list[Tensor]], list[Tensor]], Tensor, Tensor, Tensor | None] | None:
        b, n, _ = x.shape
        if x.dtype != self.dtype or x.device.type != "cpu" or (mask is not None and mask.dtype != torch.bool):
            return None
        if n == 1 and self.kind == "dense" and b > one_query_sdpa_max_rows("cpu"):  # the matmuls' library
            if mask is not None and mask.shape[2] != 1:
                return None
            name, rows = "one-query", 1
        else:
            if mask is not None and n == 1 and mask.shape[2] == 1:
                mask = mask.expand(b, 1, self.groups, mask.shape[3])  # one query's row, for each head of a group
            if mask is not None and mask.shape[2] != self.groups * n:
                return None
            name, rows = ("unmasked" if mask is None and self.kind == "packed" else "masked"), self.groups * n
        if mask is None and name != "unmasked":  # the dense libraries read a mask: here one that hides nothing
            mask = torch.ones(b, 1, rows, keys, dtype=torch.bool)
        cos, sin = (r.expand(b, 1, n, r.shape[-1]).contiguous() for r in rope)  # [n, D] or [B, 1, n, D]
        return self.libraries[name], cos, sin, None if mask is None else mask.contiguous()

    @classmethod
    def build(cls, layer: Any, dtype: torch.dtype, folder: Path, progress: bool = True,
              retry_failed: bool = True) -> LayerProgram:
        """The program for the shape and kind of `BoundLayer` `layer` (its sizes, norm epsilon, activation, and
        its weights' shapes and packed modes: `kind_of`) in `dtype`: loaded if built before on this machine's kind
        of CPU and torch, at this number of threads (inductor writes it into its loops), else compiled (~20-50 s
        for SmolLM2 on a 2-core Xeon) and kept. A CanvasError says why where it cannot be built (no C++ compiler,
        a torch without AOTInductor, a folder it cannot write) and leaves a note beside the libraries: with
        retry_failed=False (the compiled layer by default, `canvaslm.load(compile="auto")`) a build that failed on
        this machine is not tried again."""
        heads, kv_heads, dim = layer.sizes
        kind = kind_of(layer)
        modes = tuple(w.mode for w in (layer.qkv, layer.o, layer.gate_up, layer.down)) if kind == "packed" else ()
        static = {"sizes": tuple(layer.sizes), "eps": float(layer.eps), "act": layer.act, "modes": modes}
        act = getattr(layer.act, "__name__", repr(layer.act))
        flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))
        key = hashlib.sha256(json.dumps([_source(), torch.__version__, static["sizes"], static["eps"], act, kind,
                                         _shapes(layer), str(dtype), flags, torch.get_num_threads()]).encode()
                             ).hexdigest()[:16]
        paths = {name: folder / f"layer-{key}-{name}.pt2" for name, _, _ in LIBRARIES[kind]}
        failed = folder / f"layer-{key}.failed"
        if not retry_failed and failed.exists():
            raise CanvasError(f"the compiled layer failed to build here before ({_first_line(failed)}); "
                              f"delete {failed} or run with --compile-layers to try again")
        missing = [name for name, path in paths.items() if not path.exists()]
        if missing and progress:
            what = "decoder layer" if kind == "packed" else "decoder layer for large batches"
            print(f"canvaslm: compiling the {what} for this CPU, once per model shape (~20-50 s; kept in "
                  f"{folder}; --no-compile-layers skips it)", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            for name, masked, one_query in LIBRARIES[kind]:
                if name in missing:
                    _compile(_Program(static, kind, masked, one_query), _examples(layer, dtype, masked, one_query),
                             paths[name], masked, one_query)
            libraries = {name: _load(path) for name, path in paths.items()}
        except CanvasError as error:
            with contextlib.suppress(OSError):
                failed.write_text(f"{error}\n")
            raise
        failed.unlink(missing_ok=True)
        if missing and progress:
            print(f"canvaslm: compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        return cls(kind, libraries, dtype, heads // kv_heads, _shapes(layer), (kv_heads, dim))


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
    """A `LayerProgram` bound to one layer: its index and its weights in `_Program`'s order, gathered once."""

    __slots__ = ("program", "index", "weights")

    def __init__(self, program: LayerProgram, index: int, weights: tuple[Tensor, ...]) -> None:
        self.program, self.index, self.weights = program, index, weights

    def __call__(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: Any, mask: Tensor | None,
                 write: bool) -> Tensor | None:
        return self.program.run(self, x, rope, cache, mask, write)


def _shapes(layer: Any) -> tuple[tuple[Any, ...], ...]:
    """Each weight's shape in `_Program`'s order, with the packed linears' modes or the dense weights' dtypes (a
    library reads its arguments as the ones it was traced with)."""
    if kind_of(layer) == "packed":
        return tuple((w.mode, tuple(w.packed.shape)) for w in (layer.qkv, layer.o, layer.gate_up, layer.down))
    return tuple((str(w.dtype), tuple(w.shape)) for w in weights_of(layer)[1:] if w.dim() == 2)


def _source() -> str:
    """The code a program is built from: a package built by other code is never loaded."""
    from canvaslm.models.llama import apply_rope, rms_norm
    return "".join(inspect.getsource(f) for f in (layer_pass, _Program, product, packed_product, apply_rope,
                                                  rms_norm, _examples))


def _examples(layer: Any, dtype: torch.dtype, masked: bool, one_query: bool) -> list[Tensor]:
    """Inputs for tracing: sizes that differ from each other and from 0 and 1, so that export keeps them
    symbolic and no two are taken for one (one row for one query, which the library is for)."""
    heads, kv_heads, dim = layer.sizes
    batch, rows, keys = (11, 1, 7) if one_query else (2, 5, 7)
    hidden = layer.input_norm.shape[0]
    x = torch.randn(batch, rows, hidden, dtype=dtype)
    cos, sin = torch.randn(batch, 1, rows, dim, dtype=dtype), torch.randn(batch, 1, rows, dim, dtype=dtype)
    cached = torch.randn(batch, kv_heads, keys, dim, dtype=dtype)
    mask = torch.ones(batch, 1, 1 if one_query else heads // kv_heads * rows, keys + rows, dtype=torch.bool)
    head = [x, cos, sin, cached, cached.clone()] + ([mask] if masked else [])
    return head + [w.detach() for w in weights_of(layer)]


def _compile(module: torch.nn.Module, examples: list[Tensor], path: Path, masked: bool, one_query: bool) -> None:
    auto = torch.export.Dim.AUTO
    rows = {} if one_query else {1: auto}  # one query: a library for one row
    shapes: list[dict[int, Any]] = [{0: auto, **rows}, {0: auto, **{2: auto for _ in rows}},
                                    {0: auto, **{2: auto for _ in rows}}, {0: auto, 2: auto}, {0: auto, 2: auto}]
    if masked:
        shapes.append({0: auto, 3: auto} if one_query else {0: auto, 2: auto, 3: auto})
    shapes += [{} for _ in examples[len(shapes):]]
    part = path.with_name(f"{path.stem}.{os.getpid()}.part.pt2")  # the packager wants a .pt2 name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations inside export, not the user's
            program = torch.export.export(module, (examples,), dynamic_shapes=(shapes,))
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


def compile_layers(model: Any, folder: Path, progress: bool = True, retry_failed: bool = True,
                   dense: bool = False) -> LayerProgram:
    """Run `model`'s passes on packed weights through its compiled layer (`LayerProgram.build`), its libraries
    kept in `folder` (`canvaslm.load`: `$CANVASLM_HOME/compiled`); with `dense`, also its passes on the dense
    weights (a server's large batches), where its layers bind to them (no biases). A CanvasError says what is
    missing (`refusal`) or why the build failed."""
    reason = refusal(model)
    if reason is not None:
        raise CanvasError(reason)
    dtype = model.embed_tokens.weight.dtype
    model._pass(canvas=False)  # traced on the causal pass's weights; the canvas pass's are bound where they fit
    packed = model._bind_packed()
    model.layer_program = LayerProgram.build(packed.layers[0], dtype, folder, progress, retry_failed)
    dense_binding = model._bind_dense() if dense else None
    if dense_binding is not None and kind_of(dense_binding.layers[0]) == "dense":
        model.dense_layer_program = LayerProgram.build(dense_binding.layers[0], dtype, folder, progress, retry_failed)
        for weight in packed.guards:  # passes the dense program now runs faster than the packed one
            weight.max_rows = min(weight.max_rows, packed_max_rows(weight.mode, dense_program=True))
    forget_bound_layers(model)  # bound again, with the programs
    return model.layer_program
