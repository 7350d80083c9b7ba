"""The training loop: `train(config, task)` fits a model to any objective described by a small `Task`.

One optimizer step (steps 0 .. max_steps - 1):
  1. set the learning rate (`lr_at`: linear warmup, then cosine decay to lr * min_lr_ratio)
  2. for each of grad_accum micro-batches: reseed the micro-batch generators from (seed, step, micro), build the
     batch, compute the task's loss (bf16 autocast where it is fast: CUDA, CPUs with AMX / AVX-512 BF16) and
     backward loss / grad_accum; gradients are
     synchronised between ranks on the last micro-batch only
  3. clip the global gradient norm; AdamW step (skipped when the norm is not finite)
  4. average the loss and task metrics over micro-batches and ranks; log, evaluate and checkpoint on schedule
A step depends only on (seed, step, micro-batch index), the weights, the optimizer state and the global RNG state
(dropout), all of which the checkpoint holds, so a resumed run repeats the uninterrupted one exactly.

Under torchrun (WORLD_SIZE > 1) the model runs under DDP or FSDP2 (`train.distributed`) and rank r computes the
global micro-batches r * grad_accum .. (r + 1) * grad_accum - 1 of each step; rank 0 alone logs and writes files.
Outputs in out_dir: metrics.jsonl, loss.png, checkpoint-<step>/, model/ (the export) and, with LoRA, adapter/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from canvaslm.errors import CanvasError
from canvaslm.hardware import bf16_is_fast
from canvaslm.loading import load
from canvaslm.models import llama
from canvaslm.models.lora import apply_lora, hf_module_names, load_adapter, merge_lora, save_adapter
from canvaslm.plotting import new_figure, save
from canvaslm.train.checkpoint import (checkpoint_steps, load_checkpoint, remove_partial, resolve_resume,
                                       save_checkpoint)
from canvaslm.train.config import (ConfigError, ModelConfig, OptimConfig, RunConfig, TrainConfig, init_fields,
                                   load_config)
from canvaslm.train.tasks import Task, make_task

__all__ = ["Task", "build_model", "clip_gradients", "lr_at", "main", "plot_metrics", "train"]

PREFIX = "model."  # parameter names under `Objective` are the model's own with this prefix
METRICS = "metrics.jsonl"
PLOT = "loss.png"


# ---- public API ---------------------------------------------------------------------------------------------------

def main(config_path: str, overrides: Sequence[str] = ()) -> int:
    """Load and check the config (with `section.key=value` overrides), build its task, train. Prints one JSON
    object of final metrics as the last stdout line (rank 0); errors print one `canvaslm: error:` line, status 2."""
    try:
        config = load_config(config_path, overrides)
        result = train(config, make_task(config))
    except CanvasError as e:
        print(f"canvaslm: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)
    return 0


def train(config: TrainConfig, task: Task) -> dict[str, Any]:
    """Run (or resume) the training `config` describes; returns the final metrics (on rank 0; other ranks get the
    same keys)."""
    runtime = _start(config)
    try:
        result = _Run(config, task, runtime).fit()
        if runtime.owns_group:
            # every rank done sending before any tears its group down: a rank that left while another's last
            # gloo transfer was in flight aborted at exit ("terminate called without an active exception")
            dist.barrier()
        return result
    finally:
        if runtime.owns_group:
            dist.destroy_process_group()


def lr_at(step: int, optim: OptimConfig, elapsed_s: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup reaching `lr` at step warmup_steps - 1, then
    cosine decay from `lr` to lr * min_lr_ratio at the last step; with `optim.max_minutes` the decay follows
    whichever of steps and elapsed time (`elapsed_s`) is further along, so a run cut by its clock still anneals."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, optim.max_steps - optim.warmup_steps - 1))
    if optim.max_minutes is not None:
        progress = max(progress, min(1.0, elapsed_s / (60.0 * optim.max_minutes)))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.lr * (optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine)


def clip_gradients(parameters: Sequence[nn.Parameter], max_norm: float) -> float:
    """Scale gradients so that their global L2 norm is at most `max_norm` (0: no clipping); returns the norm
    before clipping (over all ranks' shards under FSDP2)."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else math.inf)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def build_model(config: ModelConfig, source: str = "<config>") -> nn.Module:
    """The `[model]` network on the CPU: loaded from `source`, or a random Llama from `init` (weights drawn from
    N(0, initializer_range), default 0.02, as Hugging Face initialises Llama); then converted to block diffusion
    when `diffusion_canvas_length` is set."""
    dtype = getattr(torch, config.dtype)
    if config.source is not None:
        network = load(config.source, device="cpu", dtype=dtype).network
    else:
        fields = init_fields(config)
        std = float(fields.pop("initializer_range", 0.02))
        network = llama.Model(llama.Config.from_hf(fields, f"{source} [model.init]"))
        for module in network.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if network.self_conditioning is not None:  # a grid model is built in diffusion mode: its block starts as 0
            network.self_conditioning.reset()
        network = network.to(dtype)
    if config.deepen_to is not None:
        if not isinstance(network, llama.Model):
            raise ConfigError(source, "model.deepen_to", "only Llama-family models can be deepened",
                              found=type(network).__name__)
        try:
            network = network.deepened(config.deepen_to)
        except ValueError as error:
            raise ConfigError(source, "model.deepen_to", str(error), found=config.deepen_to) from None
    if config.diffusion_canvas_length is not None:
        network.to_diffusion(config.diffusion_canvas_length)
    return network


def plot_metrics(jsonl: str | Path, png: str | Path) -> bool:
    """Draw the train loss (and eval loss, when logged) against the step; False when matplotlib is missing."""
    records = [json.loads(line) for line in Path(jsonl).read_text(encoding="utf-8").splitlines() if line.strip()]
    figure = new_figure(7, 4)
    if figure is None:
        return False
    axes = figure.add_subplot()
    for split, style in (("train", "-"), ("eval", "o-")):
        points = [(r["step"], r["loss"]) for r in records if r.get("split") == split and "loss" in r]
        if points:
            axes.plot(*zip(*points), style, label=f"{split} loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    return save(figure, png, dpi=100)


# ---- the run ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # this process initialised torch.distributed (so it tears it down)

    @property
    def main(self) -> bool:
        return self.rank == 0


class Objective(nn.Module):
    """Runs the task's loss inside `forward`, so that DDP and FSDP2 see the whole computation (a loss may call any
    method of the model, not only its forward)."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: Any, generator: torch.Generator) -> tuple[Tensor, Mapping[str, Any]]:
        return self.task.loss(self.model, batch, generator)


class _Run:
    """One training run: the model, its wrappers, the optimizer and the outputs; `fit` is the loop."""

    def __init__(self, config: TrainConfig, task: Task, runtime: Runtime) -> None:
        self.config, self.task, self.rt = config, task, runtime
        self.out_dir = Path(config.train.out_dir)
        self.resume_from = _resume_point(config)  # out_dir and resume mistakes surface before any compute
        self.sharded = runtime.world_size > 1 and config.train.distributed == "fsdp"
        self.model, self.hf_names = _prepare_model(config, task, runtime.device)
        self.objective = Objective(self.model, task)
        self.wrapped = _distribute(self.objective, runtime, self.sharded)
        self.optimizer = _optimizer(self.objective, config.optim)
        self.trainable = [p for p in self.objective.parameters() if p.requires_grad]
        self.call = torch.compile(self.wrapped) if config.train.compile else self.wrapped
        self.batch_generator = torch.Generator()
        self.loss_generator = torch.Generator(runtime.device)
        self.last_eval: dict[str, float] = {}

    def fit(self) -> dict[str, Any]:
        state = self._restore()
        start, max_steps = state["step"], self.config.optim.max_steps
        metrics_log = _MetricsLog(self.out_dir / METRICS, keep_until=start) if self.rt.main else None
        started = time.perf_counter() - state["elapsed"]  # elapsed time continues across resumes
        window = _Window(time.perf_counter())
        record: dict[str, Any] = {"step": start}
        out_of_time, clock = False, self._clock(started)  # one clock reading a step: the stop, then the next lr
        self.objective.train()
        with _StopOnSigterm() as sigterm, _Progress(self.rt.main, start, max_steps) as progress:
            for step in range(start, max_steps):
                record, stop = self._step(step, sigterm, clock)
                done = step + 1
                clock = self._clock(started)
                out_of_time = self._out_of_time(clock)
                last = done == max_steps or out_of_time
                stop = stop or out_of_time
                window.tokens += record.get("tokens", 0.0)
                record["elapsed"] = time.perf_counter() - started
                if _due(done, self.config.train.log_every, last or stop):
                    record["tokens_per_s"] = window.rate(time.perf_counter())
                    if metrics_log:
                        metrics_log.write({"split": "train", **record})
                    progress.update(record)
                if _due(done, self.config.train.eval_every, last):
                    self._evaluate(done, started, metrics_log)
                if _due(done, self.config.train.save_every, last or stop):
                    self._save(done, record["elapsed"])
                if stop:
                    break
        return self._finish(record, stopped=record["step"] < max_steps and not out_of_time)  # the clock ends a run

    # -- one optimizer step -------------------------------------------------------------------------------------

    def _clock(self, started: float) -> float:
        """Seconds since the run began (resumes included). With `optim.max_minutes` the clock sets the learning
        rate and the stop, which every rank must agree on: rank 0's clock is the run's."""
        elapsed = time.perf_counter() - started
        if self.config.optim.max_minutes is not None and self.rt.world_size > 1:
            value = torch.tensor(elapsed, dtype=torch.float64, device=self.rt.device)
            dist.broadcast(value, 0)
            elapsed = float(value.item())
        return elapsed

    def _out_of_time(self, elapsed_s: float) -> bool:
        minutes = self.config.optim.max_minutes
        return minutes is not None and elapsed_s >= 60.0 * minutes

    def _step(self, step: int, sigterm: _StopOnSigterm, elapsed_s: float) -> tuple[dict[str, Any], bool]:
        optim = self.config.optim
        lr = lr_at(step, optim, elapsed_s)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        totals: dict[str, Tensor] = {}
        for micro in range(optim.grad_accum):
            index = self.rt.rank * optim.grad_accum + micro
            loss, metrics = self._micro_step(step, index, sync=micro == optim.grad_accum - 1)
            for name, value in {"loss": loss.detach(), **metrics}.items():
                value = torch.as_tensor(value, dtype=torch.float64, device=self.rt.device)
                totals[name] = totals[name] + value if name in totals else value
        grad_norm = clip_gradients(self.trainable, optim.grad_clip)
        if math.isfinite(grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        averaged, stop = self._reduce(totals, sigterm.requested)
        return {"step": step + 1, "loss": averaged.pop("loss"), "lr": lr, "grad_norm": grad_norm, **averaged}, stop

    def _micro_step(self, step: int, index: int, sync: bool) -> tuple[Tensor, Mapping[str, Any]]:
        seed = self.config.train.seed
        self.batch_generator.manual_seed(_micro_seed(seed, step, index, "batch"))
        self.loss_generator.manual_seed(_micro_seed(seed, step, index, "loss"))
        batch = _to_device(self.task.batch(step, index, self.batch_generator), self.rt.device)
        with _gradient_sync(self.wrapped, sync):
            with _autocast(self.config.train, self.rt.device):
                loss, metrics = self.call(batch, self.loss_generator)
            (loss / self.config.optim.grad_accum).backward()
        return loss, metrics

    def _reduce(self, totals: dict[str, Tensor], stop_requested: bool) -> tuple[dict[str, float], bool]:
        """Means over micro-batches and ranks ("tokens": the sum), and whether any rank was asked to stop."""
        names = sorted(totals)
        flag = torch.tensor(float(stop_requested), dtype=torch.float64, device=self.rt.device)
        vector = torch.stack([totals[n] for n in names] + [flag])
        if self.rt.world_size > 1:
            dist.all_reduce(vector)
        *values, stops = vector.tolist()
        count = self.config.optim.grad_accum * self.rt.world_size
        return {n: v if n == "tokens" else v / count for n, v in zip(names, values, strict=True)}, stops > 0

    # -- evaluation, checkpoints, end of run --------------------------------------------------------------------

    def _evaluate(self, step: int, started: float, metrics_log: _MetricsLog | None) -> None:
        self.objective.eval()
        with torch.no_grad(), _autocast(self.config.train, self.rt.device), _unsharded(self.objective):
            metrics = {k: float(v) for k, v in self.task.evaluate(self.model, step).items()}
        self.objective.train()
        self.last_eval = metrics
        if metrics_log:
            metrics_log.write({"split": "eval", "step": step, "elapsed": time.perf_counter() - started, **metrics})

    def _save(self, step: int, elapsed: float) -> None:
        state = {"elapsed": elapsed, "grad_accum": self.config.optim.grad_accum,
                 "batch_size": self.config.optim.batch_size, "config": self.config.to_json()}
        save_checkpoint(self.out_dir, step, self.objective, self.optimizer, state, prefix=PREFIX,
                        trainable_only=self.config.lora.enabled, sharded=self.sharded)
        if self.config.lora.enabled and self.config.lora.scope == "canvas":
            # canvas-only adapters export without touching the weights: adapter/ and model/ always hold the
            # latest, so `canvaslm asset pack` can ship a run that is still going (or is cut off)
            self._export()
            self.objective.train()

    def _restore(self) -> dict[str, Any]:
        """Load the checkpoint to resume from, or seed a fresh run; returns {"step", "elapsed"}."""
        if self.rt.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_partial(self.out_dir)
            config_json = json.dumps(self.config.to_json(), indent=1, default=str)
            (self.out_dir / "train_config.json").write_text(config_json + "\n", encoding="utf-8")
        if self.resume_from is None:
            _seed_all(self.config.train.seed + self.rt.rank)  # dropout differs between ranks
            return {"step": 0, "elapsed": 0.0}
        state = load_checkpoint(self.resume_from, self.objective, self.optimizer, prefix=PREFIX,
                                trainable_only=self.config.lora.enabled, sharded=self.sharded)
        split = (state.get("world_size"), state.get("grad_accum"))
        if self.rt.main and split != (self.rt.world_size, self.config.optim.grad_accum):
            print(f"canvaslm: warning: resuming a run made with (ranks, grad_accum) = {split} as "
                  f"({self.rt.world_size}, {self.config.optim.grad_accum}): same micro-batches per step only if "
                  "the products match", file=sys.stderr)
        return {"step": int(state["step"]), "elapsed": float(state["elapsed"])}

    def _finish(self, record: Mapping[str, Any], stopped: bool) -> dict[str, Any]:
        result: dict[str, Any] = {**record, **{f"eval_{k}": v for k, v in self.last_eval.items()},
                                  "out_dir": str(self.out_dir), "stopped_early": stopped}
        if "tokens_per_forward" in self.last_eval:  # the project's key metric, reported without a prefix too
            result["tokens_per_forward"] = self.last_eval["tokens_per_forward"]
        checkpoints = checkpoint_steps(self.out_dir)
        if checkpoints:
            result["checkpoint"] = str(self.out_dir / f"checkpoint-{checkpoints[-1]}")
        if not stopped:
            exported = self._export()
            result.update({"model": str(exported)} if exported else {})
        if self.rt.main and plot_metrics(self.out_dir / METRICS, self.out_dir / PLOT):
            result["plot"] = str(self.out_dir / PLOT)
        return result

    def _export(self) -> Path | None:
        """Write the adapter (LoRA) and the merged model with the task's `export`; rank 0 only."""
        model = self.model
        if self.sharded:  # gather the shards (a collective), then export a plain CPU copy
            full = get_model_state_dict(self.objective, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
            if not self.rt.main:
                return None
            model, _ = _prepare_model(self.config, self.task, torch.device("cpu"))
            model.load_state_dict({k.removeprefix(PREFIX): t for k, t in full.items()})
        elif not self.rt.main:
            return None
        lora = self.config.lora
        if lora.enabled:
            save_adapter(model, self.out_dir / "adapter", rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                         modules_to_save=lora.modules_to_save, base_model=self.config.model.source,
                         hf_names=self.hf_names)
            if lora.scope == "all":  # canvas-only adapters stay apart: the model writes them beside the parent
                merge_lora(model)
        model.eval()
        self.task.export(model, self.out_dir / "model")
        return self.out_dir / "model"


# ---- setup --------------------------------------------------------------------------------------------------------

def _start(config: TrainConfig) -> Runtime:
    """Device and process group: under torchrun (WORLD_SIZE > 1) join the group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(config, local_rank)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(dist.get_rank() if world > 1 else 0, world, device, owns)


def _device(config: TrainConfig, local_rank: int) -> torch.device:
    name = config.train.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(config.source, "train.device", "unknown device", expected="auto, cpu, cuda or cuda:N",
                          found=repr(name)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(config.source, "train.device", "CUDA is not available on this machine",
                          expected="auto or cpu", found=repr(name))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def _resume_point(config: TrainConfig) -> Path | None:
    out_dir = Path(config.train.out_dir)
    found = resolve_resume(out_dir, config.train.resume)
    if found is None and config.train.resume is False and checkpoint_steps(out_dir):
        raise ConfigError(config.source, "train.out_dir", "already holds checkpoints of another run",
                          found=str(out_dir), hint="set train.resume = true to continue it, or pick a new out_dir")
    return found


def _prepare_model(config: TrainConfig, task: Task, device: torch.device) -> tuple[nn.Module, dict[str, str]]:
    """(model on `device` with LoRA applied when enabled, our -> checkpoint module names for the adapter file)."""
    _seed_all(config.train.seed)  # the same initial weights (and adapters) on every rank
    builder = getattr(task, "build_model", None)
    model = builder(config) if builder is not None else build_model(config.model, config.source)
    hf_names = hf_module_names(model)
    lora = config.lora
    if lora.scope == "canvas":
        if not lora.enabled or not getattr(model, "canvas_length", None) or not hasattr(model.config,
                                                                                        "canvas_adapters"):
            raise ConfigError(config.source, "lora.scope", "canvas-only adapters need lora.enabled = true and a "
                              "Llama-family block-diffusion model (model.diffusion_canvas_length)",
                              found=repr(lora.scope))
        model.config = dataclasses.replace(model.config, canvas_adapters=True)
    if lora.enabled:
        apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.targets, lora.modules_to_save)
        if lora.init is not None:  # continue a run from its last shipped adapter
            load_adapter(model, lora.init, hf_names)
        for p in model.parameters():  # trained tensors stay float32 (AdamW's master copy) whatever the base is
            if p.requires_grad:
                p.data = p.data.float()
    return model.to(device), hf_names


def _distribute(objective: Objective, runtime: Runtime, sharded: bool) -> nn.Module:
    if runtime.world_size == 1:
        return objective
    if sharded:
        for block in _blocks(objective.model):
            fully_shard(block)
        fully_shard(objective)
        return objective
    # a diffusion loss may skip a module on some micro-batches (self-conditioning), which plain DDP rejects
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(objective, device_ids=device_ids, find_unused_parameters=True)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """FSDP2 units: the members of every nn.ModuleList (the transformer layers)."""
    return [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]


def _optimizer(root: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    trainable = [p for p in root.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=optim.betas)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _micro_seed(seed: int, step: int, micro: int, stream: str) -> int:
    """An independent 63-bit seed for each (run seed, step, global micro-batch, stream)."""
    digest = hashlib.blake2b(f"{seed}/{step}/{micro}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---- small helpers ------------------------------------------------------------------------------------------------

def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a task's batch type (DiffusionBatch)
        return dataclasses.replace(value, **{f.name: _to_device(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def uses_bf16(config: RunConfig, device: torch.device) -> bool:
    """train.bf16: "auto" = where bfloat16 matmuls are fast on `device`; true / false as given."""
    return bf16_is_fast(device) if config.bf16 == "auto" else bool(config.bf16)


def _autocast(config: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for the forward (matmuls and attention in bf16, reductions in float32)."""
    if uses_bf16(config, device) and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _gradient_sync(wrapped: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
    if isinstance(wrapped, DistributedDataParallel) and not enabled:
        with wrapped.no_sync():
            yield
        return
    if isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(enabled)
    yield


@contextlib.contextmanager
def _unsharded(root: nn.Module) -> Iterator[None]:
    """Gather FSDP2 root parameters, so that evaluation may call any method of the model (a no-op otherwise)."""
    if not isinstance(root, FSDPModule):
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def _due(step: int, every: int, last: bool) -> bool:
    return last or (every > 0 and step % every == 0)


@dataclass
class _Window:
    """Tokens trained on since the last log line, for tokens/s."""
    start: float
    tokens: float = 0.0

    def rate(self, now: float) -> float:
        rate = self.tokens / max(now - self.start, 1e-9)
        self.start, self.tokens = now, 0.0
        return rate


class _MetricsLog:
    """metrics.jsonl: one JSON object per line; on resume, lines after the checkpoint's step are dropped (the
    resumed run writes them again)."""

    def __init__(self, path: Path, keep_until: int) -> None:
        kept = []
        if keep_until > 0 and path.is_file():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_until]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.path = path

    def write(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class _StopOnSigterm:
    """Turns SIGTERM into a request to checkpoint and stop after the current step (main thread only)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopOnSigterm:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True


class _Progress:
    """A rich progress bar on stderr when it is a terminal, else one plain stderr line per log step; rank 0 only."""

    def __init__(self, enabled: bool, start: int, total: int) -> None:
        self.enabled, self.start, self.total = enabled, start, total
        self.console = Console(stderr=True)
        self.bar: Progress | None = None
        if enabled and self.console.is_terminal:
            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.description}"), TimeRemainingColumn(), console=self.console)

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
            self.task_id = self.bar.add_task("", total=self.total, completed=self.start)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, record: Mapping[str, Any]) -> None:
        text = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  grad {record['grad_norm']:.3f}  "
                f"{record.get('tokens_per_s', 0.0):,.0f} tok/s")
        if self.bar is not None:
            self.bar.update(self.task_id, completed=record["step"], description=text)
        elif self.enabled:
            print(f"step {record['step']}/{self.total}  {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":  # torchrun --nproc-per-node N -m canvaslm.train.trainer config.toml [section.key=value ...]
    sys.exit(main(sys.argv[1], sys.argv[2:]))
