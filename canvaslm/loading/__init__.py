"""Loading: a registered name, an asset folder, an HF-layout directory or a .gguf file -> `LM`.

Orchestration above the engine and the file formats: `registry` says where a name's files are, `assets` builds a
shipped delta into a full model once, `files` reads a model from disk."""

from __future__ import annotations

from pathlib import Path

import torch

from canvaslm.engine.lm import LM
from canvaslm.errors import CanvasError, CheckpointError
from canvaslm.hardware import resolve_dtype, resolve_quantize
from canvaslm.loading import assets, registry
from canvaslm.loading.files import load_path
from canvaslm.models.aot import compile_layers
from canvaslm.models.quant import quantize as quantize_weights


def load(source: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
         quantize: str = "none", compile: bool | str = False) -> LM:
    """Load a model from an HF-layout directory, a .gguf file, an asset folder (a delta on a registered base,
    built once into the cache dir) or a registered name (`smol-ar`, `smol`).

    dtype: a torch dtype or "auto" (bfloat16 where this machine computes it fast); default bfloat16 on CUDA,
    float32 on CPUs. quantize: "none", "int8", "int4" (weight-only, CPU; canvaslm.models.quant) or "auto"
    (int4 on CPUs with fast bfloat16 or AVX2: `canvaslm.hardware.int4_pays`). compile: the model's passes (its
    `compiled_passes`: the causal pass of AR steps, canvas commits and verified checks, and for Llama-family models
    the canvas pass's layers too) run through torch.compile with dynamic shapes: the first passes take minutes to
    compile, later ones skip most of eager mode's per-op overhead (docs/performance.md). compile="layers": the
    decoder layer on packed weights compiled ahead of time into a library kept in `$CANVASLM_HOME/compiled/`
    (~20-50 s once per model shape and thread count, then loaded in milliseconds; `canvaslm.models.aot`)."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    dtype = dtype if dtype is not None else torch.bfloat16 if device.type == "cuda" else torch.float32
    quantize = resolve_quantize(quantize, device)
    path = registry.resolve(str(source)) or Path(source)
    if assets.is_asset(path):
        path = assets.materialize(path, registry.cache_dir())
    if not path.exists():
        raise CheckpointError(source, "not found: expected an HF-layout directory, a .gguf file, an asset folder "
                              f"or one of the registered names {sorted(registry.NAMES)}")
    lm = load_path(path, device, dtype, str(source))
    quantize_weights(lm.network, quantize)
    lm.quantization = quantize
    if compile == "layers":
        compile_layers(lm.network, registry.cache_dir() / "compiled")
    elif compile:
        # instance attributes: every caller of network.encode (forward, advance, the engines) or network.decode gets
        # the compiled pass
        for name in lm.network.compiled_passes:
            setattr(lm.network, name, torch.compile(getattr(lm.network, name), dynamic=True))
    lm.compiled = compile
    return lm


def load_model(args, source: str | None = None) -> LM:
    """`load` with the --device / --dtype / --quantize / --compile of parsed command-line `args` (source:
    args.model)."""
    dtype = args.dtype if args.dtype in (None, "auto") else getattr(torch, args.dtype)
    compile: bool | str = getattr(args, "compile", False)
    if getattr(args, "compile_layers", False):
        if compile:
            raise CanvasError("--compile and --compile-layers: give one (the compiled passes or the compiled layer)")
        compile = "layers"
    return load(source or args.model, device=args.device, dtype=dtype, quantize=args.quantize,
                compile=compile)
