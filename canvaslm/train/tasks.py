"""What the trainer trains on: the `Task` protocol, the registry `[data] task = "<name>"` picks from, and the toy
task the trainer's tests use.

Register a task with `TASKS["name"] = factory`, where `factory(config: TrainConfig) -> Task` checks its free-form
sections (`config.data`, `config.objective`, `config.eval`, e.g. with `read_section`) and raises ConfigError for
mistakes: it runs before any compute.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from canvaslm.checkpoints import hf
from canvaslm.train.config import ConfigError, TrainConfig, did_you_mean, read_section


class Task(Protocol):
    """An objective with its data. It may also define `build_model(config: TrainConfig) -> nn.Module` (on the CPU)
    to replace the trainer's default model from `[model]`."""

    def batch(self, step: int, micro: int, generator: torch.Generator) -> Any:
        """Micro-batch `micro` of optimizer step `step`. `micro` is global: 0 .. world_size * grad_accum - 1 (rank r
        asks for r * grad_accum ... (r + 1) * grad_accum - 1), so the data of a step does not depend on how it is
        split between ranks and accumulation. `generator` (CPU) is freshly seeded from (seed, step, micro) for each
        call: the batch must be a function of these arguments alone, which is what makes resume exact. Tensors in
        the result (also inside dicts, lists, tuples) are moved to the training device by the trainer."""
        ...

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> tuple[Tensor, Mapping[str, Any]]:
        """(scalar loss to minimise, metrics): metrics are floats or 0-dim tensors, the same keys on every call and
        rank, averaged over micro-batches and ranks; "tokens" (tokens trained on) is summed instead and gives
        tokens/s. `generator` is on the training device, freshly seeded per micro-batch. `model` is the plain
        model (may call any of its methods), with LoRA adapters when enabled; runs under bf16 autocast on CUDA."""
        ...

    def evaluate(self, model: nn.Module, step: int) -> Mapping[str, float]:
        """Held-out metrics after `step` optimizer steps; called on every rank, in eval mode, under no_grad."""
        ...

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """Write the final model (LoRA adapters already merged), e.g. with canvaslm.checkpoints.hf.save_model."""
        ...


@dataclass(frozen=True)
class ToyData:
    task: str
    seq_len: int = 16
    vocab: int = 32     # tokens drawn from [0, vocab): at most the model's vocab_size


@dataclass(frozen=True)
class ToyEval:
    batches: int = 2
    seed: int = 1234


@dataclass(frozen=True)
class NoOptions:
    pass


class CausalLMToy:
    """Next-token prediction on arithmetic sequences x_i = (a + i * d) mod vocab with random a and d: a tiny
    learnable task for a randomly initialised canvaslm Llama model (the trainer's stand-in objective in tests)."""

    def __init__(self, config: TrainConfig) -> None:
        self.data = read_section(ToyData, config.data, config.source, "data")
        self.eval_options = read_section(ToyEval, config.eval, config.source, "eval")
        read_section(NoOptions, config.objective, config.source, "objective")
        self.batch_size = config.optim.batch_size

    def batch(self, step: int, micro: int, generator: torch.Generator) -> Tensor:
        # examples are numbered within the step, so a step's data does not depend on how it is split into
        # micro-batches and ranks (which the accumulation and DDP tests rely on); `generator` is not needed
        first = micro * self.batch_size
        return torch.stack([self._example(step, i) for i in range(first, first + self.batch_size)])  # [B, L]

    def _example(self, step: int, index: int) -> Tensor:
        generator = torch.Generator().manual_seed(step * 1_000_003 + index)
        start = int(torch.randint(0, self.data.vocab, (), generator=generator))
        stride = int(torch.randint(1, 4, (), generator=generator))
        return (start + stride * torch.arange(self.data.seq_len)) % self.data.vocab

    def loss(self, model: nn.Module, batch: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
        logits = model(batch, model.new_cache(batch.shape[0], batch.device), torch.ones_like(batch, dtype=torch.bool))
        targets = batch[:, 1:]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten())
        return loss, {"tokens": float(targets.numel())}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        device = next(model.parameters()).device
        losses, correct, total = [], 0, 0
        for i in range(self.eval_options.batches):
            batch = self.batch(-1 - self.eval_options.seed, i, torch.Generator()).to(device)  # a step never trained
            logits = model(batch, model.new_cache(batch.shape[0], device), torch.ones_like(batch, dtype=torch.bool))
            targets = batch[:, 1:]
            losses.append(float(F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten())))
            correct += int((logits[:, :-1].argmax(-1) == targets).sum())
            total += targets.numel()
        return {"loss": sum(losses) / len(losses), "accuracy": correct / total}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        hf.save_model(model, out_dir)


def _digits(config: TrainConfig) -> Task:
    from canvaslm.train.diffusion_tasks import DigitsTask

    return DigitsTask(config)


def _shards(config: TrainConfig) -> Task:
    from canvaslm.train.diffusion_tasks import ShardsTask

    return ShardsTask(config)


def _sudoku(config: TrainConfig) -> Task:
    from canvaslm.train.sudoku_tasks import SudokuTask

    return SudokuTask(config)


def _sudoku_ar(config: TrainConfig) -> Task:
    from canvaslm.train.sudoku_tasks import SudokuARTask

    return SudokuARTask(config)


TASKS: dict[str, Callable[[TrainConfig], Task]] = {"causal-lm-toy": CausalLMToy, "digits": _digits,
                                                   "shards": _shards, "sudoku": _sudoku, "sudoku-ar": _sudoku_ar}


def make_task(config: TrainConfig) -> Task:
    """The task `[data] task` names, built (and its sections checked) from the config."""
    name = config.data.get("task")
    if not isinstance(name, str) or name not in TASKS:
        raise ConfigError(config.source, "data.task", "missing required key" if name is None else "unknown task",
                          expected=f"one of {sorted(TASKS)}", found=None if name is None else repr(name),
                          hint=did_you_mean(name, sorted(TASKS)) if isinstance(name, str) else None)
    return TASKS[name](config)
