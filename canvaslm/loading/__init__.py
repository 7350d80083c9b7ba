"""Loading: a registered name, an asset folder, an HF-layout directory or a .gguf file -> `LM`.

Orchestration above the engine and the file formats: `registry` says where a name's files are, `assets` builds a
shipped delta into a full model once, `files` reads a model from disk."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from canvaslm.engine.lm import LM
from canvaslm.errors import CanvasError, CheckpointError
from canvaslm.hardware import resolve_dtype, resolve_quantize
from canvaslm.loading import assets, registry
from canvaslm.loading.files import load_path
from canvaslm.models import aot
from canvaslm.models.quant import quantize as quantize_weights


def load(source: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
         quantize: str = "none", compile: bool | str = False, large_batches: bool = False) -> LM:
    """Load a model from an HF-layout directory, a .gguf file, an asset folder (a delta on a registered base,
    built once into the cache dir) or a registered name (`smol-ar`, `smol`).

    dtype: a torch dtype or "auto" (bfloat16 where this machine computes it fast); default bfloat16 on CUDA,
    float32 on CPUs. quantize: "none", "int8", "int4" (weight-only, CPU; canvaslm.models.quant) or "auto"
    (int4 on CPUs with fast bfloat16 or AVX2: `canvaslm.hardware.int4_pays`). compile: the model's passes (its
    `compiled_passes`: the causal pass of AR steps, canvas commits and verified checks, and for Llama-family models
    the canvas pass's layers too) run through torch.compile with dynamic shapes: the first passes take minutes to
    compile, later ones skip most of eager mode's per-op overhead (docs/performance.md). compile="layers": the
    decoder layer on packed weights compiled ahead of time into a library kept in `$CANVASLM_HOME/compiled/`
    (~20-50 s once per model shape and thread count, then loaded in milliseconds; `canvaslm.models.aot`).
    compile="auto" (the command line's default): the compiled layer where the model runs it (a Llama-family model
    in bfloat16 on the CPU with packed weights) and it builds, else the eager layers (a build that fails says so on
    stderr, once: `layers_where_they_run`). `lm.compiled` says what ran: True, "layers" or False. large_batches
    (`canvaslm serve`): the compiled layer also for passes past the packed kernels' rows, on the dense weights
    (another build of ~20-50 s, once)."""
    if compile not in (False, True, "layers", "auto"):
        raise CanvasError(f"compile={compile!r}: expected False, True, \"layers\" or \"auto\"")
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
    if compile == "auto":
        compile = layers_where_they_run(lm.network, large_batches)
    elif compile == "layers":
        aot.compile_layers(lm.network, registry.cache_dir() / "compiled", dense=large_batches)
    elif compile:
        # instance attributes: every caller of network.encode (forward, advance, the engines) or network.decode gets
        # the compiled pass
        for name in lm.network.compiled_passes:
            setattr(lm.network, name, torch.compile(getattr(lm.network, name), dynamic=True))
    lm.compiled = compile
    return lm


LAYERS_OFF = ("0", "off", "false", "no")  # $CANVASLM_COMPILE_LAYERS values that keep "auto" on the eager layers


def layers_where_they_run(network, large_batches: bool = False) -> str | bool:
    """compile="auto": "layers" where `network` runs the compiled layer (`aot.refusal`) and its library is built
    or builds here, else False. A failed build prints one line on stderr and is not tried again on this machine
    until --compile-layers asks for it (`LayerProgram.build`); $CANVASLM_COMPILE_LAYERS=0 turns the default off."""
    if os.environ.get("CANVASLM_COMPILE_LAYERS", "").strip().lower() in LAYERS_OFF or aot.refusal(network):
        return False
    try:
        aot.compile_layers(network, registry.cache_dir() / "compiled", retry_failed=False, dense=large_batches)
    except CanvasError as error:
        print(f"canvaslm: running the eager layers: {error}", file=sys.stderr, flush=True)
        return False
    return "layers"


def compile_choice(args) -> bool | str:
    """`load`'s compile for parsed command-line flags: --compile (True), --compile-layers ("layers": build or
    fail), --no-compile-layers (False), neither ("auto")."""
    layers = getattr(args, "compile_layers", None)
    if getattr(args, "compile", False):
        if layers:
            raise CanvasError("--compile and --compile-layers: give one (the compiled passes or the compiled layer)")
        return True
    return {True: "layers", False: False, None: "auto"}[layers]


def load_model(args, source: str | None = None, large_batches: bool = False) -> LM:
    """`load` with the --device / --dtype / --quantize / --compile(-layers) of parsed command-line `args` (source:
    args.model)."""
    dtype = args.dtype if args.dtype in (None, "auto") else getattr(torch, args.dtype)
    return load(source or args.model, device=args.device, dtype=dtype, quantize=args.quantize,
                compile=compile_choice(args), large_batches=large_batches)
