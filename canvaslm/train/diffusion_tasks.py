"""Block-diffusion training tasks for the trainer: `digits` (the synthetic reverse/sort task that converts a tiny
AR model on a CPU in minutes) and `shards` (examples built by `canvaslm data build`).

Both share one loss (`block_diffusion_loss`) and one evaluation: held-out loss, token accuracy when every canvas
is corrupted at several noise levels, and — what users get — token accuracy and tokens per forward of real
sampling with the inference loop on held-out prompts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from canvaslm.checkpoints import hf
from canvaslm.checkpoints.tokenizer import Tokenizer
from canvaslm.diffusion.generate import generate
from canvaslm.diffusion.sampling import DiffusionSampling
from canvaslm.errors import TrainingError
from canvaslm.knobs import ORDERS
from canvaslm.train import digits
from canvaslm.train.batch import DiffusionBatch, collate
from canvaslm.train.config import ConfigError, TrainConfig, read_section
from canvaslm.train.objective import ObjectiveOptions, accuracy_at_noise, block_diffusion_loss

Example = tuple[Sequence[int], Sequence[int]]
PARTS_REFRESH_STEPS = 20  # steps between looks for newly finished data parts


@dataclass(frozen=True)
class EvalOptions:
    examples: int = 64
    """Held-out examples for the loss, the noise-level accuracies and real sampling."""
    noise_levels: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    sample_examples: int = 64
    """How many of them are answered by real sampling (0 turns sampling off)."""
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    order: str = field(default="confidence", metadata={"choices": ORDERS})
    """The acceptance order sampling uses (the `order` knob): confidence or left_to_right."""


class BlockDiffusionTask:
    """Shared part: batches from `examples(step, micro)`, the loss, evaluation and export."""

    generation_defaults: dict[str, Any] = {}  # sampler settings an exported model decodes with by default

    def __init__(self, config: TrainConfig, tokenizer: Tokenizer | None, eos: int, pad: int) -> None:
        self.options = read_section(ObjectiveOptions, config.objective, config.source, "objective")
        self.eval_options = read_section(EvalOptions, config.eval, config.source, "eval")
        self.batch_size, self.seed = config.optim.batch_size, config.train.seed
        self.tokenizer, self.eos, self.pad = tokenizer, eos, pad
        self.canvas_length = _canvas_length(config)

    def examples(self, step: int, micro: int) -> list[Example]:
        raise NotImplementedError

    def held_out(self) -> list[Example]:
        raise NotImplementedError

    def batch(self, step: int, micro: int, generator: torch.Generator) -> DiffusionBatch:
        return collate(self.examples(step, micro), self.canvas_length, self.eos, self.pad)

    def loss(self, model: nn.Module, batch: DiffusionBatch, generator: torch.Generator) -> tuple[Tensor, dict]:
        loss, metrics = block_diffusion_loss(model, batch, self.options, generator)
        return loss, {**metrics, "tokens": float(batch.valid.sum())}

    def _mark(self, model: nn.Module) -> None:
        """Record in the model's config how it is trained (shift, mask noise) so that sampling matches."""
        shift, mask_id = self.options.shift, self.options.mask_token_id if self.options.kind == "masked" else None
        if not (shift or mask_id is not None):
            return
        if not hasattr(model.config, "canvas_shift"):
            raise TrainingError(f"{type(model).__module__} models cannot sample with shift or mask noise yet; "
                                "train them with objective.kind = 'flat' or 'udlm' and shift = false")
        model.config = dataclasses.replace(model.config, canvas_shift=shift, mask_token_id=mask_id)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        self._mark(model)
        device = next(model.parameters()).device
        held_out = self.held_out()
        batch = collate(held_out, self.canvas_length, self.eos, self.pad).to(device)
        generator = torch.Generator(device).manual_seed(self.seed)
        loss, metrics = block_diffusion_loss(model, batch, self.options, generator)
        result = {"loss": float(loss), "denoise_token_accuracy": metrics["token_accuracy"]}
        for t in self.eval_options.noise_levels:
            result[f"denoise_token_accuracy_t{t:g}"] = accuracy_at_noise(model, batch, t, generator, self.options)
        if self.eval_options.sample_examples:
            result.update(self._sample(model, held_out[: self.eval_options.sample_examples], device))
        return result

    def _sample(self, model: nn.Module, examples: list[Example], device: torch.device) -> dict[str, float]:
        """Answer the prompts with the inference loop; score answers position by position (EOS included): this is
        `token_accuracy`, what a user gets, unlike the single-pass `denoise_token_accuracy`."""
        width = max(len(p) for p, _ in examples)
        ids = torch.tensor([[self.pad] * (width - len(p)) + list(p) for p, _ in examples], device=device)
        valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p, _ in examples], device=device)
        longest = max(len(r) for _, r in examples)
        settings = DiffusionSampling(max_denoising_steps=self.eval_options.max_denoising_steps,
                                     entropy_bound=self.eval_options.entropy_bound,
                                     order=self.eval_options.order)
        out = generate(model, ids, valid, longest, settings, [self.eos], self.pad,
                       torch.Generator(device).manual_seed(self.seed))
        correct = total = exact = 0
        for row, (_, target) in zip(out.sequences[:, width:].tolist(), examples):
            hits = sum(a == b for a, b in zip(row, target))
            correct, total, exact = correct + hits, total + len(target), exact + (hits == len(target))
        return {"token_accuracy": correct / total, "exact_match": exact / len(examples),
                "tokens_per_forward": float(out.tokens_per_forward.mean())}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        self._mark(model)
        generation = {**self.generation_defaults, "eos_token_id": [self.eos], "pad_token_id": self.pad}
        hf.save_model(model, out_dir, generation)
        if self.tokenizer is not None:
            self.tokenizer.to_dir(out_dir)


@dataclass(frozen=True)
class DigitsData:
    task: str
    kind: str = field(default="reverse", metadata={"choices": digits.TASKS})
    min_digits: int = 4
    max_digits: int = 8


class DigitsTask(BlockDiffusionTask):
    """Reverse or sort a digit sequence: fresh random examples every step, a fixed held-out set."""

    def __init__(self, config: TrainConfig) -> None:
        self.data = read_section(DigitsData, config.data, config.source, "data")
        super().__init__(config, digits.tokenizer(), digits.EOS, digits.PAD)

    def examples(self, step: int, micro: int) -> list[Example]:
        seed = (self.seed * 1_000_003 + step) * 1_009 + micro  # a function of (seed, step, micro): exact resume
        return digits.examples(self.data.kind, self.batch_size, self.data.min_digits, self.data.max_digits, seed)

    def held_out(self) -> list[Example]:
        # a negative seed stream never used for training batches
        return digits.examples(self.data.kind, self.eval_options.examples, self.data.min_digits,
                               self.data.max_digits, -1 - self.seed)


@dataclass(frozen=True)
class ShardsData:
    task: str
    path: str
    held_out: int = 64
    """The last `held_out` examples of the shards (of the first part, for a directory of parts) are kept out of
    training."""
    max_canvases: int = 4


class ShardsTask(BlockDiffusionTask):
    """Examples from `canvaslm data build` shards, in a seeded order that is a function of the step."""

    def __init__(self, config: TrainConfig) -> None:
        from canvaslm.train.shards import open_shards

        self.data = read_section(ShardsData, config.data, config.source, "data")
        self.shards = open_shards(self.data.path)
        first = self.shards.parts[0]
        self.held_out_start = len(first) - self.data.held_out  # stable while later parts arrive
        if len(first) <= self.data.held_out:
            raise ConfigError(config.source, "data.path", "too few examples", expected=f"more than "
                              f"data.held_out={self.data.held_out}", found=len(self.shards))
        tokenizer = _shards_tokenizer(self.shards)
        eos = tokenizer.eos_token_ids[0] if tokenizer and tokenizer.eos_token_ids else 0
        pad = tokenizer.pad_token_id if tokenizer and tokenizer.pad_token_id is not None else eos
        super().__init__(config, tokenizer, eos, pad)

    def _example(self, i: int) -> Example:
        prompt, response = self.shards[i]
        return prompt.tolist(), response.tolist()

    def examples(self, step: int, micro: int) -> list[Example]:
        if micro == 0 and step % PARTS_REFRESH_STEPS == 0:
            # data still being built (`data build --parts`): later steps also draw from parts finished since.
            # The draw is then a function of (seed, step, micro, parts seen), so a resumed run may differ.
            self.shards.refresh()
        train = len(self.shards) - self.data.held_out
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_009 + micro)
        picks = torch.randint(0, train, (self.batch_size,), generator=generator)
        return [self._example(int(i) if i < self.held_out_start else int(i) + self.data.held_out) for i in picks]

    def batch(self, step: int, micro: int, generator: torch.Generator) -> DiffusionBatch:
        return collate(self.examples(step, micro), self.canvas_length, self.eos, self.pad, self.data.max_canvases)

    def held_out(self) -> list[Example]:
        end = self.held_out_start + self.data.held_out
        return [self._example(i) for i in range(self.held_out_start, end)][: self.eval_options.examples]


def _canvas_length(config: TrainConfig) -> int:
    """The canvas length of the model to train, checked before any compute: a model without a diffusion head
    (an AR checkpoint or a random `init`) needs `model.diffusion_canvas_length` to be converted."""
    if config.model.diffusion_canvas_length is not None:
        return config.model.diffusion_canvas_length
    source = config.model.source
    if source is not None and (Path(source) / "config.json").is_file():
        model_config = hf.read_config(source)
        if model_config.get("model_type") == "diffusion_gemma":
            return int(model_config.get("canvas_length") or 256)
        if model_config.get("canvas_length"):
            return int(model_config["canvas_length"])
    raise ConfigError(config.source, "model.diffusion_canvas_length", "missing required key",
                      expected=f"a canvas length: the model ({source or 'model.init'}) is autoregressive, without "
                               "a diffusion head, so block-diffusion training must convert it (e.g. 8, 32, 256)")


def _shards_tokenizer(shards: Any) -> Tokenizer | None:
    """The tokenizer the shards were built with, when its source can be loaded again."""
    source = shards.manifest.get("tokenizer", {}).get("source")
    if not source:
        return None
    from canvaslm import load

    return load(source, device="cpu").tokenizer
