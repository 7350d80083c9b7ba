"""Shipped model assets: a small delta (LoRA adapter + fully trained modules) on top of a registered base.

A converted model does not ship its 540 MB of float32 weights. An asset folder holds

* `asset.json`: the base (a registered name such as "smol-ar") and the SHA-256 of its file, the diffusion fields
  of the converted config (canvas length, shift, mask token), the sampling defaults, and a summary of training;
* `adapter/`: `adapter_model.safetensors` + `adapter_config.json` as the trainer writes them (PEFT layout).

`materialize` rebuilds the full model once into `$CANVASLM_HOME/models/<name>-<digest>/` (base -> block diffusion ->
adapter merged -> HF-layout directory), with a progress bar; later loads read that directory and need no network.
`pack` makes an asset folder from a finished LoRA training run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import load_file, save_file

from canvaslm.checkpoints import hf
from canvaslm.diffusion.sampling import DiffusionSampling
from canvaslm.engine.lm import LM
from canvaslm.errors import CheckpointError, GenerationError
from canvaslm.loading import registry
from canvaslm.loading.files import load_path
from canvaslm.models.lora import attach_adapter, hf_module_names, merge_lora

FORMAT = "canvaslm-asset"
ASSET_FILE = "asset.json"
ADAPTER_DIR = "adapter"
MAX_ASSET_BYTES = 64 << 20
DIFFUSION_FIELDS = ("canvas_length", "canvas_shift", "mask_token_id", "canvas_adapters")


def is_asset(path: str | Path) -> bool:
    return (Path(path) / ASSET_FILE).is_file()


def read_asset(path: str | Path) -> dict[str, Any]:
    """asset.json, checked: every field materialize needs is there and has the right type."""
    file = Path(path) / ASSET_FILE
    try:
        asset = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(file, "missing; an asset folder needs asset.json and adapter/") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(file, f"not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(asset, dict) or asset.get("format") != FORMAT:
        raise CheckpointError(file, "not a canvaslm asset", field="format", expected=FORMAT,
                              found=asset.get("format") if isinstance(asset, dict) else type(asset).__name__)
    for key, kind in (("name", str), ("base", str), ("base_sha256", str), ("model_config", dict),
                      ("generation_config", dict)):
        if not isinstance(asset.get(key), kind):
            raise CheckpointError(file, "missing or of the wrong type", field=key, expected=kind.__name__,
                                  found=type(asset.get(key)).__name__ if key in asset else "nothing")
    unknown = sorted(set(asset["model_config"]) - set(DIFFUSION_FIELDS))
    if unknown or not isinstance(asset["model_config"].get("canvas_length"), int):
        raise CheckpointError(file, "model_config holds the converted model's diffusion fields only",
                              field="model_config",
                              expected=f"canvas_length (int) and optionally {DIFFUSION_FIELDS[1:]}",
                              found=unknown or asset["model_config"])
    adapter = Path(path) / ADAPTER_DIR
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter / name).is_file():
            raise CheckpointError(adapter / name, "missing from the asset folder")
    return asset


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _asset_digest(path: Path) -> str:
    digest = hashlib.sha256((path / ASSET_FILE).read_bytes())
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update(sha256(path / ADAPTER_DIR / name).encode())
    return digest.hexdigest()[:16]


def materialize(path: str | Path, cache: Path, show_progress: bool = True) -> Path:
    """The HF-layout directory of the full model an asset describes, built into `cache` on first use."""
    path = Path(path)
    asset = read_asset(path)
    target = cache / "models" / f"{asset['name']}-{_asset_digest(path)}"
    if (target / "config.json").is_file() and (target / ".complete").is_file():
        return target
    base_file = registry.resolve(asset["base"])
    if base_file is None:
        raise CheckpointError(path / ASSET_FILE, "unknown base model", field="base",
                              expected=f"one of {sorted(registry.NAMES)}", found=asset["base"])
    steps = ["checking the base", "loading the base", "applying the adapter", "writing"]
    columns = (TextColumn("materializing " + asset["name"] + ": {task.description}"), BarColumn(),
               TimeElapsedColumn())
    # on stderr: stdout stays clean for --json, even on the first use that builds the model
    with Progress(*columns, console=Console(stderr=True), disable=not show_progress, transient=True) as progress:
        task = progress.add_task(steps[0], total=len(steps))
        found = sha256(base_file)
        if found != asset["base_sha256"]:
            raise CheckpointError(base_file, "the base model file is not the one this asset was trained on",
                                  field="base_sha256", expected=asset["base_sha256"], found=found)
        progress.update(task, advance=1, description=steps[1])
        lm = _build(asset, base_file, path / ADAPTER_DIR, lambda d: progress.update(task, advance=1, description=d),
                    steps[2])
        progress.update(task, advance=1, description=steps[3])
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        lm.save(staging)
        (staging / ".complete").write_text(json.dumps({"asset": str(path)}) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        progress.update(task, advance=1)
    return target


def _build(asset: Mapping[str, Any], base_file: Path, adapter_dir: Path, step: Any, label: str) -> Any:
    base = load_path(base_file, device=torch.device("cpu"), dtype=torch.float32)
    network = base.network
    fields = asset["model_config"]
    network.to_diffusion(fields["canvas_length"])
    network.config = dataclasses.replace(network.config, **{k: v for k, v in fields.items() if k != "canvas_length"})
    step(label)
    attach_adapter(network, adapter_dir, hf_module_names(network))
    if not fields.get("canvas_adapters"):  # canvas-only adapters stay apart: saved beside the parent's weights
        merge_lora(network)
    settings = asset["generation_config"]
    try:
        known = DiffusionSampling.__dataclass_fields__
        DiffusionSampling().replace(**{k: v for k, v in settings.items() if k in known})
    except GenerationError as e:
        raise CheckpointError(adapter_dir.parent / ASSET_FILE, f"bad sampling default ({e})",
                              field="generation_config") from None
    return LM(network.eval(), base.tokenizer, asset["name"], settings)


def pack(run_dir: str | Path, out_dir: str | Path, name: str, base: str,
         generation_config: Mapping[str, Any] | None = None, training: Mapping[str, Any] | None = None) -> Path:
    """An asset folder from a finished LoRA run (`run_dir/adapter`, `run_dir/model/config.json`)."""
    run, out = Path(run_dir), Path(out_dir)
    adapter = run / ADAPTER_DIR
    if not (adapter / "adapter_model.safetensors").is_file():
        raise CheckpointError(adapter, "no adapter here: pack needs a finished run trained with [lora] enabled")
    base_file = registry.resolve(base)
    if base_file is None:
        raise CheckpointError(base, "unknown base model", expected=f"one of {sorted(registry.NAMES)}")
    config = hf.read_config(run / "model")
    model_config = {k: config[k] for k in DIFFUSION_FIELDS if config.get(k) is not None}
    if "canvas_length" not in model_config:
        raise CheckpointError(run / "model" / "config.json", "not a block-diffusion model", field="canvas_length")
    generation = dict(hf.load_generation_config(run / "model") or {})
    generation.update(generation_config or {})
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / ADAPTER_DIR).mkdir(parents=True)
    shutil.copy(adapter / "adapter_config.json", staging / ADAPTER_DIR)
    # bfloat16 halves the download; the deltas are merged in float32 (rounding them costs < 1e-2 relative)
    tensors = {k: t.to(torch.bfloat16) for k, t in load_file(str(adapter / "adapter_model.safetensors")).items()}
    save_file(tensors, staging / ADAPTER_DIR / "adapter_model.safetensors", metadata={"format": "pt"})
    size = sum(f.stat().st_size for f in (staging / ADAPTER_DIR).iterdir())
    if size > MAX_ASSET_BYTES:
        shutil.rmtree(staging)
        raise CheckpointError(adapter, f"the adapter is {size / 2**20:.1f} MiB in bfloat16; an asset must stay "
                              f"under {MAX_ASSET_BYTES >> 20} MiB (lower lora.rank)")
    asset = {"format": FORMAT, "name": name, "base": base, "base_sha256": sha256(base_file),
             "model_config": model_config, "generation_config": generation, "training": dict(training or {})}
    (staging / ASSET_FILE).write_text(json.dumps(asset, indent=2, sort_keys=True) + "\n")
    read_asset(staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out
