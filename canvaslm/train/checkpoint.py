"""Resumable training checkpoints, without pickle: safetensors for tensors, JSON for everything else.

`out_dir/checkpoint-<step>/` holds
  model.safetensors        the weights (only the trainable ones under LoRA), under the model's own names
  optimizer.safetensors    per-parameter optimizer tensors, named "<state key>/<parameter name>" (exp_avg, ...)
  optimizer.json           0-dim optimizer state (AdamW's step counts) and the param-group hyper-parameters
  rng-<rank>.safetensors   that rank's torch CPU (and CUDA) generator states as uint8 tensors
  rng-<rank>.json          that rank's python `random` and numpy states
  trainer_state.json       step (= LR schedule and data position), elapsed time, tokens seen, run shape
A checkpoint is written into a hidden temporary directory and renamed into place, so a run killed mid-write leaves
the previous checkpoints intact and never a partial one under a `checkpoint-<step>` name.

Model and optimizer states go through torch.distributed.checkpoint's state-dict API, which gathers FSDP2 shards
into full tensors (and scatters them back on load); with DDP or one process it returns the tensors as they are.
Every rank calls `save_checkpoint` / `load_checkpoint`; rank 0 writes the shared files, each rank its RNG files.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from canvaslm.errors import CheckpointError

MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
STATE = "trainer_state.json"
FORMAT = 1
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def save_checkpoint(out_dir: str | Path, step: int, root: nn.Module, optimizer: torch.optim.Optimizer,
                    state: Mapping[str, Any], *, prefix: str = "", trainable_only: bool = False,
                    sharded: bool = False) -> Path:
    """Write `out_dir/checkpoint-<step>/` atomically and return its path (on every rank).

    `root` is the module the optimizer's parameters were registered through (the FSDP2 root when `sharded`);
    `prefix` is stripped from its parameter names so that the files use the model's own names."""
    rank, world = _rank_world()
    final = Path(out_dir) / f"checkpoint-{step}"
    tmp = final.with_name(f".{final.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(world)
    _save_rng(tmp, rank)
    options = StateDictOptions(full_state_dict=sharded, cpu_offload=sharded)
    weights = _model_tensors(root, options, prefix, trainable_only)  # collective under FSDP2
    optim = get_optimizer_state_dict(root, optimizer, options=options)
    if rank == 0:
        save_file({k: t.detach().contiguous() for k, t in weights.items()}, tmp / MODEL)
        _save_optimizer(tmp, optim, prefix)
        _write_json(tmp / STATE, {"format": FORMAT, **state, "step": step, "world_size": world,
                                  "trainable_only": trainable_only})
        _sync_dir(tmp)
    _barrier(world)
    if rank == 0:
        _replace(tmp, final)
    _barrier(world)
    return final


def load_checkpoint(path: str | Path, root: nn.Module, optimizer: torch.optim.Optimizer, *, prefix: str = "",
                    trainable_only: bool = False, sharded: bool = False) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG states from a checkpoint directory (every rank reads the
    files); returns the trainer state saved with it."""
    path = Path(path)
    state = _read_json(path / STATE)
    if state.get("format") != FORMAT:
        raise CheckpointError(path / STATE, "unknown checkpoint format", field="format", expected=FORMAT,
                              found=state.get("format"))
    if state.get("trainable_only") != trainable_only:
        kinds = {True: "only the trainable (LoRA) tensors", False: "the full model"}
        raise CheckpointError(path / STATE, f"the checkpoint holds {kinds[not trainable_only]}, but this run "
                              f"trains {kinds[trainable_only]}", field="trainable_only")
    # keys were checked above; not strict, so that tied weights (saved once) load through their shared tensor
    options = StateDictOptions(full_state_dict=sharded, strict=False)
    shapes = {k.removeprefix(prefix): tuple(t.shape) for k, t in root.state_dict().items()}  # global under FSDP2
    expected = _model_keys(root, prefix, trainable_only)
    weights = _load_tensors(path / MODEL)
    for name in sorted(expected ^ weights.keys()):
        problem = "missing tensor" if name in expected else "unexpected tensor"
        raise CheckpointError(path / MODEL, f"checkpoint does not match the model: {problem}", field=name)
    for name, tensor in weights.items():
        if tuple(tensor.shape) != shapes[name]:
            raise CheckpointError(path / MODEL, "checkpoint does not match the model: wrong shape", field=name,
                                  expected=shapes[name], found=tuple(tensor.shape))
    set_model_state_dict(root, {prefix + k: t for k, t in weights.items()}, options=options)
    set_optimizer_state_dict(root, optimizer, _load_optimizer(path, prefix), options=options)
    _load_rng(path, _rank_world()[0])
    return state


def resolve_resume(out_dir: str | Path, resume: bool | str) -> Path | None:
    """The checkpoint to resume from: None for `False`; the newest in `out_dir` (or None if there is none) for
    `True` / "latest"; else `resume` itself, a checkpoint directory or a run directory holding some."""
    if resume is False:
        return None
    if resume is True or resume == "latest":
        return latest_checkpoint(out_dir)
    path = Path(resume)
    if (path / STATE).is_file():
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise CheckpointError(path, "no checkpoint to resume from", expected=f"a checkpoint-<step> directory "
                              f"with {STATE}, or a directory holding one")
    return found


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in `out_dir`, if any."""
    steps = checkpoint_steps(out_dir)
    return Path(out_dir) / f"checkpoint-{max(steps)}" if steps else None


def checkpoint_steps(out_dir: str | Path) -> list[int]:
    path = Path(out_dir)
    if not path.is_dir():
        return []
    return sorted(int(m.group(1)) for p in path.iterdir()
                  if (m := CHECKPOINT_NAME.fullmatch(p.name)) and (p / STATE).is_file())


def remove_partial(out_dir: str | Path) -> None:
    """Delete the temporary directories a run killed while writing a checkpoint left behind."""
    path = Path(out_dir)
    if path.is_dir():
        for leftover in path.glob(".checkpoint-*"):
            shutil.rmtree(leftover, ignore_errors=True)


# ---- model and optimizer ----------------------------------------------------------------------------------------

def _model_keys(root: nn.Module, prefix: str, trainable_only: bool) -> set[str]:
    """Names to save: each parameter once (tied weights share one name), trainable ones only under LoRA, plus
    persistent buffers for full checkpoints."""
    names = {n for n, p in root.named_parameters() if p.requires_grad or not trainable_only}
    if not trainable_only:
        names |= {n for n, _ in root.named_buffers()} & set(root.state_dict())
    return {n.removeprefix(prefix) for n in names}


def _model_tensors(root: nn.Module, options: StateDictOptions, prefix: str, trainable_only: bool) -> dict[str, Tensor]:
    keys = _model_keys(root, prefix, trainable_only)
    full = get_model_state_dict(root, options=options)
    return {k.removeprefix(prefix): t for k, t in full.items() if k.removeprefix(prefix) in keys}


def _save_optimizer(directory: Path, optim: Mapping[str, Any], prefix: str) -> None:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param, entries in optim["state"].items():
        name = param.removeprefix(prefix)
        for key, value in entries.items():
            if isinstance(value, Tensor) and value.ndim > 0:
                tensors[f"{key}/{name}"] = value.detach().to("cpu").contiguous()
            else:  # step counts: 0-dim tensors (or numbers) kept exactly as JSON
                scalars.setdefault(name, {})[key] = _scalar_to_json(value)
    groups = [{**g, "params": [p.removeprefix(prefix) for p in g["params"]]} for g in optim["param_groups"]]
    save_file(tensors, directory / OPTIMIZER)
    _write_json(directory / OPTIMIZER_JSON, {"scalars": scalars, "param_groups": groups})


def _load_optimizer(path: Path, prefix: str) -> dict[str, Any]:
    meta = _read_json(path / OPTIMIZER_JSON)
    state: dict[str, dict[str, Any]] = {}
    for key, tensor in _load_tensors(path / OPTIMIZER).items():
        kind, _, name = key.partition("/")
        state.setdefault(prefix + name, {})[kind] = tensor
    for name, entries in meta["scalars"].items():
        state.setdefault(prefix + name, {}).update({k: _scalar_from_json(v) for k, v in entries.items()})
    groups = [{**g, "params": [prefix + p for p in g["params"]]} for g in meta["param_groups"]]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def _scalar_to_json(value: Any) -> Any:
    if isinstance(value, Tensor):
        return {"tensor": value.item(), "dtype": str(value.dtype).removeprefix("torch.")}
    return value


def _scalar_from_json(value: Any) -> Any:
    if isinstance(value, dict) and "tensor" in value:
        return torch.tensor(value["tensor"], dtype=getattr(torch, value["dtype"]))
    return value


# ---- random number generators -----------------------------------------------------------------------------------

def _save_rng(directory: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda:{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, directory / f"rng-{rank}.safetensors")
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    _write_json(directory / f"rng-{rank}.json", {
        "python": {"version": version, "state": list(mt_state), "gauss_next": gauss},
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)}})


def _load_rng(directory: Path, rank: int) -> None:
    """Restore this rank's generators; a rank the checkpoint has no state for (more ranks than when it was
    written) keeps its fresh seeding."""
    tensors_path, json_path = directory / f"rng-{rank}.safetensors", directory / f"rng-{rank}.json"
    if not tensors_path.is_file() or not json_path.is_file():
        return
    tensors = _load_tensors(tensors_path)
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda:{i}"] for i in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    saved = _read_json(json_path)
    py = saved["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = saved["numpy"]
    np.random.set_state((npy["kind"], np.array(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))


# ---- files --------------------------------------------------------------------------------------------------------

def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1, default=str) + "\n", encoding="utf-8")  # str: TOML dates


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(path, f"cannot read the checkpoint file ({e})") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"invalid JSON at line {e.lineno}: {e.msg}") from e


def _load_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # missing file or safetensors' own (private) error type
        raise CheckpointError(path, f"cannot read the checkpoint tensors ({e})") from e


def _sync_dir(directory: Path) -> None:
    """fsync the files and the directory, so that the rename below publishes complete data even on power loss."""
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` (a rerun of the same step) is moved aside first."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
