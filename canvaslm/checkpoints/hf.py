"""Hugging Face-layout checkpoint directories: config.json, safetensors weights (single or sharded), and
generation_config.json. Architecture-agnostic: `canvaslm.models.architecture(model_type)` builds the network.

Weights are read from safetensors only. Pickle files (pytorch_model.bin, *.pt) are refused, never unpickled.
Each safetensors header is checked against the file size before safetensors reads it, so that a truncated or
corrupt file gives an error naming the file and the problem rather than a crash deep inside a reader.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Mapping
from math import prod
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from canvaslm.errors import CheckpointError
from canvaslm.models import ARCHITECTURES, architecture

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CANVAS_ADAPTER = "canvas_adapter"  # the adapter of a model whose config says canvas_adapters
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit
SAMPLER_CLASS = "EntropyBoundSamplerConfig"


def _directory(directory: str | os.PathLike) -> Path:
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(path, "checkpoint directory does not exist" if not path.exists() else "not a directory")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"cannot read the file ({e})") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of a checkpoint directory."""
    path = _directory(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(path, "config.json is missing")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(path, "config.json must hold a JSON object", found=type(config).__name__)
    return config


def load_generation_config(directory: str | os.PathLike) -> dict[str, Any]:
    """generation_config.json as flat settings: nulls and metadata dropped, `sampler_config.entropy_bound`
    lifted to `entropy_bound`. Empty when the file is absent."""
    path = _directory(directory) / GENERATION_CONFIG
    if not path.is_file():
        return {}
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise CheckpointError(path, "generation_config.json must hold a JSON object", found=type(raw).__name__)
    settings = {k: v for k, v in raw.items() if v is not None and not k.startswith("_") and k != "transformers_version"}
    sampler = settings.pop("sampler_config", None)
    if sampler is not None:
        if not isinstance(sampler, dict) or sampler.get("_cls_name", SAMPLER_CLASS) != SAMPLER_CLASS:
            raise CheckpointError(path, "unsupported sampler", field="sampler_config",
                                  expected=f"a {SAMPLER_CLASS} object", found=sampler)
        if sampler.get("entropy_bound") is not None:
            settings["entropy_bound"] = sampler["entropy_bound"]
    return settings


def _check_safetensors(path: Path) -> dict[str, dict[str, Any]]:
    """Validate a safetensors file's header against its size; returns {tensor name: header entry}."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(path, "truncated safetensors file: no header", expected="at least 8 bytes",
                                  found=f"{size} bytes")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(path, "corrupt or truncated safetensors file: header length beyond the file",
                                  expected=f"at most {size - 8} bytes", found=f"{header_len} bytes")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"corrupt safetensors header: not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt safetensors header", expected="a JSON object", found=type(header).__name__)
    header.pop("__metadata__", None)
    data_bytes, end = size - 8 - header_len, 0
    for name, entry in header.items():
        try:
            dtype, shape, (begin, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not all(type(x) is int and x >= 0 for x in (begin, stop, *shape)):
                raise ValueError("offsets and dimensions must be non-negative integers")
            nbytes = DTYPE_BYTES[dtype] * prod(shape)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(path, "corrupt safetensors header entry", field=name,
                                  expected="known dtype, shape and 2 data_offsets", found=entry) from e
        if stop - begin != nbytes:
            raise CheckpointError(path, "corrupt safetensors header: data offsets do not match dtype and shape",
                                  field=name, expected=f"{nbytes} bytes", found=f"offsets {begin}..{stop}")
        end = max(end, stop)
    if end > data_bytes:
        raise CheckpointError(path, "truncated safetensors file: data shorter than the header says",
                              expected=f"{end} data bytes", found=f"{data_bytes}")
    return header


def _read_safetensors(path: Path, listed: list[str] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of one file; for a shard, `listed` are the names the index puts there and must match."""
    header = _check_safetensors(path)
    if listed is not None:
        missing, unlisted = [n for n in listed if n not in header], sorted(set(header) - set(listed))
        if missing:
            raise CheckpointError(path, "tensor listed in the index is not in this shard", field=missing[0],
                                  expected=f"in {path.name} (per {INDEX})", found="absent from the file")
        if unlisted:
            raise CheckpointError(path, "tensor not listed in the index for this shard", field=unlisted[0],
                                  expected=f"listed in {INDEX}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in header}
    except Exception as e:  # safetensors' own checks (overlapping data, ...) raise its private error type
        raise CheckpointError(path, f"cannot read the safetensors file ({e})") from e


def weight_files(directory: str | os.PathLike) -> Path:
    """The weights entry point of a directory: model.safetensors.index.json or model.safetensors."""
    path = _directory(directory)
    for name in (INDEX, WEIGHTS):
        if (path / name).is_file():
            return path / name
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(path, f"pickle weights are refused ({', '.join(pickles)}): they can run code when "
                              "loaded; convert the checkpoint to safetensors", expected=f"{WEIGHTS} or {INDEX}")
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    raise CheckpointError(path, "no weight files", expected=f"{WEIGHTS} or {INDEX}",
                          found=", ".join(shards) if shards else "none")


def load_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (single file, or shards validated against their index), on the CPU."""
    entry = weight_files(directory)
    if entry.name == WEIGHTS:
        return _read_safetensors(entry)
    index = _read_json(entry)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(entry, "bad index", field="weight_map", expected="an object of tensor -> shard file")
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for shard, names in by_shard.items():
        path = entry.parent / shard
        if Path(shard).name != shard or not path.is_file():
            raise CheckpointError(entry, "index points to a missing shard", field=names[0], expected=shard,
                                  found="no such file in the directory")
        tensors.update(_read_safetensors(path, names))
    return tensors


def load_model(directory: str | os.PathLike, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> tuple[ModuleType, nn.Module]:
    """(architecture module, model in eval mode) for a checkpoint directory. Floating-point weights are cast to
    `dtype` when given; the network is built on the meta device and takes the loaded tensors as they are."""
    config_dict = read_config(directory)
    config_path = Path(directory) / CONFIG
    model_type = config_dict.get("model_type")
    module = architecture(model_type) if isinstance(model_type, str) else None
    if module is None:
        raise CheckpointError(config_path, "unknown model_type" if model_type else "model_type is missing",
                              field="model_type", expected=f"one of {sorted(ARCHITECTURES)}", found=repr(model_type))
    config = module.Config.from_hf(config_dict, config_path)
    entry = weight_files(directory)
    tensors = load_tensors(directory)
    tensors = {k: t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
               for k, t in tensors.items()}
    with torch.device("meta"):
        model = module.Model(config)
    model.load_hf_tensors(tensors, entry)
    if getattr(config, "canvas_adapters", False):
        _attach_canvas_adapter(model, Path(directory) / CANVAS_ADAPTER)
    return module, model.eval()


def _attach_canvas_adapter(model: nn.Module, directory: Path) -> None:
    """Canvas-only adapters: the weights are the AR parent's, the adapter (PEFT layout) acts in the canvas pass;
    its merged weights are kept beside the parent's so that a canvas pass costs one matmul per layer."""
    from canvaslm.models.lora import attach_adapter, cache_canvas_weights, hf_module_names

    if not directory.is_dir():
        raise CheckpointError(directory.parent / CONFIG, "canvas_adapters is set but the adapter folder is missing",
                              field="canvas_adapters", expected=f"{directory.name}/ with the adapter")
    attach_adapter(model, directory, hf_module_names(model))
    cache_canvas_weights(model)


def save_model(model: nn.Module, directory: str | os.PathLike, generation_config: Mapping[str, Any] | None = None,
               max_shard_bytes: int = 5 << 30) -> None:
    """Write config.json, the weights (sharded with an index above `max_shard_bytes`) and, when given,
    generation_config.json in transformers' format. Earlier weight files in `directory` are removed."""
    from canvaslm.models.lora import hf_module_names, save_adapter, without_adapters

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    with without_adapters(model) as adapters:  # canvas-only adapters: the parent's weights + the adapter apart
        if adapters and not getattr(model.config, "canvas_adapters", False):
            raise CheckpointError(path, "the model holds unmerged LoRA adapters; merge them (merge_lora) first")
        tensors = {k: t.detach().to("cpu").contiguous() for k, t in model.hf_tensors().items()}
        names = hf_module_names(model) if adapters else None
    shutil.rmtree(path / CANVAS_ADAPTER, ignore_errors=True)
    if adapters:
        first = adapters[0][1]
        save_adapter(model, path / CANVAS_ADAPTER, rank=first.rank, alpha=first.alpha, dropout=0.0, hf_names=names)
    config = model.config.to_hf()
    config["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    (path / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for old in [*path.glob("model*.safetensors"), path / INDEX]:
        old.unlink(missing_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], path / WEIGHTS, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if generation_config is not None:
        settings = dict(generation_config)
        if "entropy_bound" in settings:
            settings["sampler_config"] = {"entropy_bound": settings.pop("entropy_bound"), "_cls_name": SAMPLER_CLASS}
        (path / GENERATION_CONFIG).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
