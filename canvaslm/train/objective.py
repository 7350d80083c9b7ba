"""The block-diffusion training objective: corrupt every canvas, denoise them all in one pass, score.

`block_diffusion_loss` is the whole recipe (docs/training.md derives it): one noise level t per canvas, the
supervised tokens of that canvas corrupted at rate t, a two-pass self-conditioning draw, one training forward
(encoder pass over the clean sequence + decoder pass over every noised canvas), then

    loss = diffusion loss (kind "flat", "udlm" or "masked") + ar_weight * causal next-token loss of the encoder.

The default ("flat") is the DiffusionGemma / NeMo Automodel SFT recipe: uniform-random replacement, plain mean
cross-entropy over all supervised canvas positions, corrupted or not, with no 1/t weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from canvaslm.diffusion.sampling import carry_over
from canvaslm.errors import TrainingError
from canvaslm.train.batch import DiffusionBatch

KINDS = ("flat", "udlm", "masked")


class BlockDiffusionModel(Protocol):
    vocab_size: int
    canvas_length: int

    def forward_block_diffusion(self, input_ids: Tensor, valid: Tensor, prompt_length: int, noised: Tensor,
                                self_conditioning_logits: Tensor | None,
                                self_conditioning_rows: Tensor | None = None,
                                hidden_states: bool = False) -> tuple[Tensor, Tensor]: ...
    def logits(self, hidden: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class ObjectiveOptions:
    kind: str = "flat"
    """"flat": uniform replacement, mean CE over all supervised positions (DiffusionGemma); "udlm": uniform
    replacement, UDLM's continuous-time NELBO per token; "masked": replacement by mask_token_id, CE on masked
    positions weighted 1/t (MDLM)."""
    ar_weight: float = 1.0
    """Weight of the causal next-token loss on the clean sequence (the encoder pass); 0 turns it off."""
    self_conditioning_p: float = 0.5
    """Probability, drawn per row, that a row is trained with self-conditioning: a no-grad first pass over the
    whole batch feeds its predictions to the second pass in those rows (the others get a zero signal)."""
    shift: bool = False
    """Score canvas token i with the decoder output at i - 1 (a canvas's first token with the encoder output at
    the position before the canvas). DiffusionGemma does not shift, and `generate` does not support it yet."""
    t_min: float = 1e-3
    """Noise levels are drawn from U(t_min, 1), one per canvas."""
    full_mask_p: float = 0.0
    """Probability that a canvas is corrupted entirely (t = 1): the first denoising step of inference, which a
    uniform t rarely trains (Fast-dLLM v2, research notes §6)."""
    anchor_p: float = 0.0
    """Probability that a canvas is corrupted the way verified decoding drafts (canvaslm/engine/verified.py): its
    first token clean (the anchor, already chosen), every other one replaced (t = 1 - 1/C), so the canvas learns to
    draft the tokens after a known one too (DFlash's layout, arXiv 2602.06036, in the model itself)."""
    position_decay: float = 0.0
    """gamma > 0: on anchored canvases, the k-th token after the anchor is weighted exp(-(k - 1) / gamma), scaled
    to a mean of 1 over the C - 1 tokens so an anchored canvas weighs as much as before (DFlash's position-decayed
    loss, gamma 4-7 there: a verified round keeps a draft token only after every one before it, so the first ones
    decide the accepted length); 0 weights them all alike. Needs anchor_p > 0."""
    prefix_p: float = 0.0
    """Probability that a canvas is corrupted the way left-to-right decoding (`order = "left_to_right"`) sees it: a
    clean prefix of k ~ U{0, ..., C - 1} tokens, every token after it masked (t = (C - k) / C). Random masks spend
    most of the training on layouts that decoder never meets (clean tokens right of a mask); a fully masked canvas
    (k = 0) and an anchored one (k = 1) are its ends. Kind "masked" only."""
    complementary: bool = False
    """Score every example twice, the second copy corrupted exactly where the first is not (noise level 1 - t):
    each supervised token is predicted once from its context (Fast-dLLM v2's complementary masks)."""
    mask_token_id: int | None = None
    """The absorbing token of kind "masked" (must be below the vocabulary size)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TrainingError(f"objective kind must be one of {KINDS}, got {self.kind!r}")
        if not 0 < self.t_min < 1:
            raise TrainingError(f"t_min must be in (0, 1), got {self.t_min!r}")
        if not 0 <= self.self_conditioning_p <= 1:
            raise TrainingError(f"self_conditioning_p must be in [0, 1], got {self.self_conditioning_p!r}")
        if not self.ar_weight >= 0:
            raise TrainingError(f"ar_weight must be >= 0, got {self.ar_weight!r}")
        if not self.position_decay >= 0:
            raise TrainingError(f"position_decay must be >= 0, got {self.position_decay!r}")
        if self.position_decay > 0 and self.anchor_p == 0:
            raise TrainingError("position_decay weights the tokens after an anchor: it needs anchor_p > 0")
        for name in ("full_mask_p", "anchor_p", "prefix_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise TrainingError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.anchor_p > 0 and self.kind == "udlm":
            raise TrainingError('anchor_p needs objective kind "masked" or "flat": UDLM\'s NELBO has no weight for '
                                'a fully replaced canvas')
        if self.prefix_p > 0 and self.kind != "masked":
            raise TrainingError(f'prefix_p needs objective kind "masked", got {self.kind!r}: with uniform noise '
                                'every position is re-drawn at each step, so no decoder fills a canvas as a prefix')
        if self.kind == "masked" and self.mask_token_id is None:
            raise TrainingError('objective kind "masked" needs mask_token_id')

    @property
    def absorbing_token(self) -> int | None:
        """What corruption writes: the mask token for kind "masked", None (a uniform random token) otherwise."""
        return self.mask_token_id if self.kind == "masked" else None


def block_diffusion_loss(model: BlockDiffusionModel, batch: DiffusionBatch, options: ObjectiveOptions,
                         generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    """The training loss of one batch (a scalar with gradients) and its metrics: loss, diffusion_loss, ar_loss
    (when it is trained), token_accuracy (argmax = clean token, over the scored positions) and mean_t (over
    canvases holding supervised tokens). Random draws, in order: t per canvas, full-mask canvases (when
    full_mask_p > 0), anchored canvases (when anchor_p > 0), prefix canvases and their prefix lengths (when
    prefix_p > 0), corruption, complementary corruption (when on), self-conditioning rows.

    Logits are computed only where they are scored (every supervised position; for kind "masked" the corrupted
    ones), from the model's hidden states: with a 49k vocabulary the head is a fifth of the forward's FLOPs."""
    _check(model, batch, options)
    canvas, prompt = model.canvas_length, batch.prompt_length
    clean = batch.input_ids[:, prompt:]                                          # [B, R]
    blocks = (batch.input_ids.shape[0], batch.response_length // canvas)
    device = clean.device
    # 1. one noise level per canvas; UDLM's log-linear schedule keeps alpha_t >= t_min
    t = options.t_min + (1 - options.t_min) * _uniform(blocks, generator, device)  # [B, K]
    if options.full_mask_p > 0:
        t = torch.where(_uniform(blocks, generator, device) < options.full_mask_p, 1.0, t)
    anchored = None
    if options.anchor_p > 0:  # drafting canvases: all replaced but the first token
        anchored = _uniform(blocks, generator, device) < options.anchor_p
        t = torch.where(anchored, 1 - 1 / canvas, t)  # the share masked: its 1/t weight, and 1 - t for a complement
    prefixed = None
    if options.prefix_p > 0:  # left-to-right canvases: k clean tokens, then masks (an anchored canvas stays one)
        prefixed = _uniform(blocks, generator, device) < options.prefix_p
        if anchored is not None:
            prefixed &= ~anchored
        kept = (_uniform(blocks, generator, device) * canvas).long()                # k in 0..C-1
        t = torch.where(prefixed, (canvas - kept) / canvas, t)
    t_token = t.repeat_interleave(canvas, dim=1)                                   # [B, R]
    rate = (1 - options.t_min) * t_token if options.kind == "udlm" else t_token
    if anchored is not None:
        rate = torch.where(anchored.repeat_interleave(canvas, dim=1), 1.0, rate)
    if prefixed is not None:  # rate 0 on the prefix, 1 after it: the layout is exact, not drawn token by token
        after = (torch.arange(canvas, device=device) >= kept[..., None]).float()  # [B, K, C]
        rate = torch.where(prefixed.repeat_interleave(canvas, dim=1), after.view_as(rate), rate)
    noised, corrupted = corrupt(clean, batch.supervised, rate, model.vocab_size, options.absorbing_token, generator)
    if anchored is not None:
        first = torch.zeros_like(corrupted).view(*blocks, canvas)
        first[..., 0] = anchored
        first = first.view_as(corrupted)
        noised, corrupted = torch.where(first, clean, noised), corrupted & ~first
    weight = None
    if anchored is not None and options.position_decay > 0:  # [B, R]: decayed after each anchor, 1 elsewhere
        decay = torch.exp(-torch.arange(canvas - 1, device=device) / options.position_decay)
        decay = torch.cat([decay.new_ones(1), decay / decay.mean()])  # the anchor itself: 1
        weight = torch.where(anchored[..., None], decay, 1.0).view_as(clean)
    if options.complementary:  # the same rows again, corrupted exactly where the first copy is clean
        flipped = batch.supervised & ~corrupted
        again, _ = corrupt(clean, flipped, flipped.float(), model.vocab_size, options.absorbing_token, generator)
        # both copies go to the model as noised [2B, R]: it runs one encoder pass for them
        clean, noised, corrupted = clean.repeat(2, 1), torch.cat([noised, again]), torch.cat([corrupted, flipped])
        t, t_token, rate = torch.cat([t, 1 - t]), torch.cat([t_token, 1 - t_token]), torch.cat([rate, 1 - rate])
        blocks = (2 * blocks[0], blocks[1])
        weight = None if weight is None else torch.cat([weight, torch.ones_like(weight)])
    # 2. self-conditioning: rows drawn with probability p get the (no-grad) first pass's predictions
    sc_rows = _uniform((blocks[0],), generator, device) < options.self_conditioning_p
    sc_logits = None
    if bool(sc_rows.any()):
        with torch.no_grad():
            first = model.forward_block_diffusion(batch.input_ids, batch.valid, prompt, noised, None)
            sc_logits = _carry_over(_predictions(*first, prompt, canvas, options.shift), noised, options).detach()
    encoder_hidden, canvas_hidden = model.forward_block_diffusion(
        batch.input_ids, batch.valid, prompt, noised, sc_logits, sc_rows if sc_logits is not None else None,
        hidden_states=True)
    # 3. score the predictions where they count, and the encoder's next-token predictions when trained
    copies = noised.shape[0] // batch.input_ids.shape[0]
    supervised = batch.supervised.repeat(copies, 1)
    scored = supervised & corrupted if options.kind == "masked" else supervised                     # [B, R]
    hidden = _predictions(encoder_hidden, canvas_hidden, prompt, canvas, options.shift)[scored]      # [N, H]
    logits, targets = model.logits(hidden), clean[scored]                                            # [N, V]
    if options.kind == "flat":
        per_token = _cross_entropy(logits, targets)
    elif options.kind == "masked":  # unmasked positions keep their token (SUBS): nothing to score there
        per_token = _cross_entropy(logits, targets) / t_token[scored]
    else:
        alpha = 1 - rate[scored]
        per_token = udlm_nelbo(logits, targets, noised[scored], alpha,
                               torch.full_like(alpha, -(1 - options.t_min)))
    if weight is not None:
        per_token = per_token * weight[scored]
    diffusion = per_token.sum() / supervised.sum()
    loss, metrics = diffusion, {}
    if options.ar_weight > 0 and not _causal_pass_frozen(model):
        ar = causal_lm_loss(model.logits(encoder_hidden), batch.input_ids, batch.valid)
        loss, metrics = diffusion + options.ar_weight * ar, {"ar_loss": ar.item()}
    scored_canvases = supervised.view(*blocks, canvas).any(dim=-1)
    metrics = {"loss": loss.item(), "diffusion_loss": diffusion.item(), **metrics,
               "token_accuracy": (logits.argmax(dim=-1) == targets).float().mean().item() if len(targets) else 0.0,
               "mean_t": t[scored_canvases].mean().item()}
    return loss, metrics


def _causal_pass_frozen(model: BlockDiffusionModel) -> bool:
    """Canvas-only adapters: the causal pass is the frozen parent, so its AR loss trains nothing."""
    return bool(getattr(getattr(model, "config", None), "canvas_adapters", False))


@torch.no_grad()
def accuracy_at_noise(model: BlockDiffusionModel, batch: DiffusionBatch, t: float, generator: torch.Generator | None,
                      options: ObjectiveOptions | None = None) -> float:
    """Token accuracy over supervised positions when every canvas is corrupted at rate t, without
    self-conditioning. `options` supplies the corruption (mask token for kind "masked") and `shift`."""
    options = options or ObjectiveOptions()
    if not 0 <= t <= 1:
        raise TrainingError(f"noise level t must be in [0, 1], got {t!r}")
    _check(model, batch, options)
    prompt, clean = batch.prompt_length, batch.input_ids[:, batch.prompt_length:]
    rate = torch.full(clean.shape, t, device=clean.device)
    noised, _ = corrupt(clean, batch.supervised, rate, model.vocab_size, options.absorbing_token, generator)
    encoder_logits, canvas_logits = model.forward_block_diffusion(batch.input_ids, batch.valid, prompt, noised, None)
    logits = _predictions(encoder_logits, canvas_logits, prompt, model.canvas_length, options.shift)
    return _accuracy(_carry_over(logits, noised, options), clean, batch.supervised)


def corrupt(clean: Tensor, supervised: Tensor, rate: Tensor, vocab_size: int, mask_token_id: int | None,
            generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Replace each supervised token of clean [B, R] with probability rate [B, R]: by a uniform random token of
    the vocabulary (which may redraw the token itself), or by mask_token_id when given. Returns (noised [B, R],
    replaced [B, R] bool); unsupervised positions are never touched."""
    replaced = (_uniform(clean.shape, generator, clean.device) < rate) & supervised
    if mask_token_id is None:
        where = generator.device if generator is not None else clean.device
        replacement = torch.randint(0, vocab_size, clean.shape, generator=generator, device=where).to(clean.device)
    else:
        replacement = torch.full_like(clean, mask_token_id)
    return torch.where(replaced, replacement, clean), replaced


def causal_lm_loss(logits: Tensor, input_ids: Tensor, valid: Tensor) -> Tensor:
    """Mean next-token cross-entropy of logits [B, S, V] over pairs of consecutive valid positions."""
    pairs = valid[:, :-1] & valid[:, 1:]                                      # [B, S - 1]
    per_token = _cross_entropy(logits[:, :-1], input_ids[:, 1:])
    return (per_token * pairs).sum() / pairs.sum().clamp(min=1)


def udlm_nelbo(logits: Tensor, clean: Tensor, noised: Tensor, alpha: Tensor, alpha_prime: Tensor) -> Tensor:
    """UDLM's continuous-time NELBO integrand per token [B, R] (research notes §1.3), for model logits
    [B, R, V] at noisy tokens z = noised, clean tokens x, signal alpha_t and its derivative alpha'_t [B, R]:

        xbar   = K alpha e_x  + (1 - alpha) 1          xbar_th = K alpha softmax(logits) + (1 - alpha) 1
        loss   = alpha' / (K alpha) * [ K / xbar[z] - K / xbar_th[z]
                                        - sum_j xbar[j] / xbar[z] * log(xbar[j] xbar_th[z] / (xbar_th[j] xbar[z])) ]

    >= 0, and 0 when the model predicts x with certainty. xbar takes two values (c = K alpha + 1 - alpha at
    x, a = 1 - alpha elsewhere), so the sum over j reduces to the vocabulary sum of log xbar_th; those [B, R]
    statistics are combined in float64 because the terms cancel to a small number."""
    k = logits.shape[-1]
    a = 1 - alpha
    log_xbar_th = torch.logaddexp(torch.log(k * alpha)[..., None] + logits.float().log_softmax(dim=-1),
                                  torch.log(a)[..., None])                                        # [B, R, V]
    sum_log_th = log_xbar_th.sum(dim=-1).double()
    log_th_x = log_xbar_th.gather(-1, clean[..., None])[..., 0].double()
    log_th_z = log_xbar_th.gather(-1, noised[..., None])[..., 0].double()
    alpha, a = alpha.double(), a.double()
    c = k * alpha + a
    xbar_z = torch.where(clean == noised, c, a)
    xbar_log_xbar = (k - 1) * a * torch.log(a) + c * torch.log(c)                                 # sum_j xbar log xbar
    log_ratio_sum = (xbar_log_xbar - a * sum_log_th - k * alpha * log_th_x
                     + k * (log_th_z - torch.log(xbar_z))) / xbar_z
    bracket = k / xbar_z - k * torch.exp(-log_th_z) - log_ratio_sum
    return (alpha_prime.double() / (k * alpha) * bracket).to(logits.dtype)


def _predictions(encoder_logits: Tensor, canvas_logits: Tensor, prompt_length: int, canvas_length: int,
                 shift: bool) -> Tensor:
    """Logits [B, R, V] predicting each response token: the canvas logits, or with `shift` the decoder output
    one position earlier, a canvas's first token taking the encoder output before the canvas (the AR head)."""
    if not shift:
        return canvas_logits
    if encoder_logits.shape[0] != canvas_logits.shape[0]:  # k corrupted copies of each row
        encoder_logits = encoder_logits.repeat(canvas_logits.shape[0] // encoder_logits.shape[0], 1, 1)
    response = canvas_logits.shape[1]
    first = (torch.arange(response, device=canvas_logits.device) % canvas_length == 0)[None, :, None]
    before = encoder_logits[:, prompt_length - 1:prompt_length - 1 + response]  # position P + i - 1
    return torch.where(first, before, canvas_logits.roll(1, dims=1))


def _carry_over(logits: Tensor, noised: Tensor, options: ObjectiveOptions) -> Tensor:
    """For kind "masked", unmasked positions keep their token (SUBS), as sampling does; a no-op otherwise."""
    return logits if options.kind != "masked" else carry_over(logits, noised, options.mask_token_id)


def _cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-position cross-entropy [...] of logits [..., V] (float32 math whatever the logits' dtype)."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)


def _accuracy(logits: Tensor, targets: Tensor, scored: Tensor) -> float:
    return (logits.argmax(dim=-1) == targets)[scored].float().mean().item()


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """U[0, 1) draws from `generator` (on its own device), moved to `device`."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def _check(model: BlockDiffusionModel, batch: DiffusionBatch, options: ObjectiveOptions) -> None:
    """Fail early, with a clear message, on a batch or options the model cannot take."""
    if not model.canvas_length:
        raise TrainingError("block-diffusion training needs a diffusion model (canvas_length unset)")
    if batch.response_length % model.canvas_length:
        raise TrainingError(f"the batch's response region ({batch.response_length}) is not whole canvases of "
                            f"{model.canvas_length}: collate with the model's canvas_length")
    if int(batch.input_ids.max()) >= model.vocab_size or int(batch.input_ids.min()) < 0:
        raise TrainingError(f"token ids must be in [0, {model.vocab_size}), found "
                            f"{int(batch.input_ids.min())} .. {int(batch.input_ids.max())}")
    if options.kind == "masked" and not 0 <= options.mask_token_id < model.vocab_size:
        raise TrainingError(f"mask_token_id {options.mask_token_id} is not in the vocabulary [0, {model.vocab_size})")
    if options.shift and batch.prompt_length == 0:
        raise TrainingError("shift predicts a canvas's first token from the position before it: prompts must "
                            "not all be empty")

