"""Sampling settings and the pure tensor functions one denoising step is made of.

Defaults and names are those of transformers' `DiffusionGemmaGenerationConfig`; the functions reproduce its
`LinearTemperatureScheduleLogitsProcessor`, `EntropyBoundSampler` and `StableAndConfidentStoppingCriteria`
numerically, as small functions instead of stateful classes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from canvaslm.errors import GenerationError


@dataclass(frozen=True)
class DiffusionSampling:
    max_denoising_steps: int = 48
    """Most decoder passes spent on one canvas."""
    entropy_bound: float = 0.1
    """Accept the k most certain tokens whose summed entropy, minus the largest, stays under this (nats)."""
    t_min: float = 0.4
    """Temperature at the last denoising step."""
    t_max: float = 0.8
    """Temperature at the first denoising step (linear schedule in between)."""
    stability_threshold: int = 1
    """A canvas stops once its argmax is unchanged for this many steps ..."""
    confidence_threshold: float = 0.005
    """... and its mean token entropy (nats) is below this."""

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.max_denoising_steps, int) and self.max_denoising_steps > 0,
             "max_denoising_steps", "an integer > 0"),
            (_is_number(self.entropy_bound) and self.entropy_bound > 0, "entropy_bound", "a number > 0"),
            (_is_number(self.t_min) and self.t_min >= 0, "t_min", "a number >= 0"),
            (_is_number(self.t_max) and self.t_max >= 0, "t_max", "a number >= 0"),
            (isinstance(self.stability_threshold, int) and self.stability_threshold >= 0,
             "stability_threshold", "an integer >= 0"),
            (_is_number(self.confidence_threshold) and self.confidence_threshold > 0,
             "confidence_threshold", "a number > 0"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise GenerationError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        if self.t_max <= self.t_min:
            raise GenerationError(f"t_max must be > t_min, got t_max={self.t_max!r} <= t_min={self.t_min!r}")

    def replace(self, **overrides: Any) -> DiffusionSampling:
        """A copy with `overrides` applied; None values leave a field as it is, unknown names are an error."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise GenerationError(f"unknown diffusion sampling option(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def temperature_at(step: int, settings: DiffusionSampling) -> Tensor:
    """Temperature when `step` steps remain (N..1): t_min + (t_max - t_min) * step / N, in float32 like the
    reference (which turns the step into an int32 tensor)."""
    fraction = torch.tensor(step, dtype=torch.int32) / settings.max_denoising_steps
    return settings.t_min + (settings.t_max - settings.t_min) * fraction


def entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of softmax(logits) over the last dim: [B, C, V] -> [B, C]."""
    log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
    log_probs_clamped = log_probs.clamp(min=torch.finfo(log_probs.dtype).min)
    return -(log_probs_clamped * log_probs.softmax(dim=-1)).sum(dim=-1)


def entropy_bound_accept(token_entropy: Tensor, bound: float) -> Tensor:
    """Accept the lowest-entropy tokens while sum(entropy) - max(entropy) <= bound (arXiv 2505.24857).

    The most certain token is always accepted. [B, C] float -> [B, C] bool."""
    sorted_entropy, order = torch.sort(token_entropy, dim=-1)
    selected = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= bound
    return torch.zeros_like(selected).scatter(-1, order, selected)


def random_canvas(batch_size: int, canvas_length: int, vocab_size: int, generator: torch.Generator | None,
                  device: torch.device | str = "cpu", mask_token_id: int | None = None) -> Tensor:
    """A canvas [B, C] drawn from the diffusion prior: uniformly random ids, or all `mask_token_id` for an
    absorbing-state (masked) model."""
    if mask_token_id is not None:
        return torch.full((batch_size, canvas_length), mask_token_id, device=device)
    return torch.randint(0, vocab_size, (batch_size, canvas_length), generator=generator, device=device)


def renoise(canvas: Tensor, accepted: Tensor, vocab_size: int, generator: torch.Generator | None,
            mask_token_id: int | None = None) -> Tensor:
    """Replace every non-accepted position with fresh noise (a uniformly random token, or the mask token)."""
    noise = random_canvas(*canvas.shape, vocab_size, generator, canvas.device, mask_token_id)
    return torch.where(accepted, canvas, noise)


def carry_over(logits: Tensor, canvas: Tensor, mask_token_id: int) -> Tensor:
    """Absorbing-state (masked) models: a position whose token is not the mask keeps it with certainty (MDLM's
    SUBS parameterisation), since such models are only trained to predict masked positions. [B, C, V]."""
    certain = torch.full_like(logits, -1e4).scatter(-1, canvas[..., None], 0.0)
    return torch.where((canvas != mask_token_id)[..., None], certain, logits)


def sample_tokens(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One multinomial draw per position: [B, C, V] probabilities -> [B, C] ids."""
    batch, length, vocab = probs.shape
    return torch.multinomial(probs.view(-1, vocab), 1, generator=generator).view(batch, length)


def stable_and_confident(history: Tensor, argmax: Tensor, token_entropy: Tensor,
                         confidence_threshold: float) -> tuple[Tensor, Tensor]:
    """The stop test: argmax unchanged over the whole history [S, B, C] and mean entropy below the threshold.

    Returns (stop [B] bool, updated history). With S = 0 stability always holds."""
    confident = token_entropy.mean(dim=-1) < confidence_threshold
    if history.shape[0] == 0:
        return confident, history
    stable = (history == argmax[None]).all(dim=-1).all(dim=0)
    history = torch.cat([history[1:], argmax[None]], dim=0)
    return stable & confident, history
