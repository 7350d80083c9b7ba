"""Sudoku training tasks: `sudoku` (block diffusion, the 81 cells on one canvas) and `sudoku-ar` (the same model
trained left to right, the baseline), on the same data: a pool of generated puzzles with unique solutions,
augmented every batch by a random symmetry of the grid (so no two batches repeat a puzzle), and a held-out set
generated from a separate seed stream.

Both report `solve_rate` (exact solutions of held-out hard puzzles, found by the model alone) and the forward
passes spent per puzzle.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from canvaslm.checkpoints import hf
from canvaslm.diffusion.sampling import carry_over
from canvaslm.engine.lm import LM
from canvaslm.errors import TrainingError
from canvaslm.models.cache import KVCache
from canvaslm.sudoku import board as sudoku
from canvaslm.sudoku.solver import DECODING, REVISING, solve
from canvaslm.train.batch import DiffusionBatch, collate
from canvaslm.train.config import ConfigError, TrainConfig, read_section
from canvaslm.train.diffusion_tasks import BlockDiffusionTask, EvalOptions
from canvaslm.train.objective import corrupt

Pair = tuple[str, str]


@dataclass(frozen=True)
class SudokuData:
    task: str
    pool: dict[str, int] = field(default_factory=lambda: {"easy": 500, "medium": 1000, "hard": 3000})
    """Generated puzzles per difficulty that training batches are drawn from (then randomly transformed)."""
    held_out: str = "hard"
    """Difficulty of the held-out puzzles `solve_rate` is measured on."""
    revision_p: float = 0.0
    """Grid models: probability that a blank left unmasked in a training canvas holds a wrong digit instead of its
    own; every blank is then scored, so the model learns to spot and correct a wrong digit it reads (decode with
    `revise_probability`). 0: only masked blanks are scored."""
    hard_masks_p: float = 0.0
    """Grid models: share of training puzzles whose masked blanks are the ones easy-first decoding reaches last
    (passes without gradients, `hard_masks_passes`), instead of a random subset of the same size. Easy-first
    decoding fills the cells it is sure of first, so the canvases it meets late hold exactly the hard cells,
    which random masks rarely leave together."""
    hard_masks_passes: int = 1
    """Passes of easy-first decoding replayed (without gradients) to rank the blanks for hard masks: 1 ranks by
    the model's confidence on the empty grid; more reach the canvases where decoding gets stuck (nothing left it
    is sure of), where its guesses and its errors are made (`hardest_blanks`)."""
    recycle_passes: int = 1
    """Grid models with `objective.self_conditioning_p` > 0: the beliefs a self-conditioned pass reads come from a
    chain of 1 to `recycle_passes` passes without gradients (drawn per batch) over the same canvas, each reading
    the last one's beliefs (AlphaFold's recycling). With 1 they come from one pass that read none, while decoding
    feeds beliefs that were themselves refined; more trains on what decoding and its think passes
    (`think_passes`: a stuck canvas re-reads its beliefs before it guesses) feed."""


def puzzle_pool(counts: dict[str, int], seed: int, label: str = "generating sudoku puzzles") -> list[Pair]:
    """Puzzles per difficulty from seed stream `seed`, with a progress bar (hard ones take ~30 ms each)."""
    out: list[Pair] = []
    with Progress(transient=True) as progress:
        bar = progress.add_task(label, total=sum(counts.values()))
        for index, (difficulty, n) in enumerate(sorted(counts.items())):
            for pair in sudoku.puzzles(difficulty, n, seed * 100 + index):
                out.append(pair)
                progress.advance(bar)
    return out


class _SudokuData:
    """Training pairs (pool + symmetry) and held-out pairs shared by both tasks."""

    def __init__(self, config: TrainConfig) -> None:
        self.data = read_section(SudokuData, config.data, config.source, "data")
        unknown = sorted(set(self.data.pool) - set(sudoku.DIFFICULTIES))
        if unknown or not all(isinstance(n, int) and n >= 0 for n in self.data.pool.values()):
            raise ConfigError(config.source, "data.pool", "bad puzzle counts", found=self.data.pool,
                              expected=f"non-negative integers for keys among {list(sudoku.DIFFICULTIES)}")
        if self.data.held_out not in sudoku.DIFFICULTIES:
            raise ConfigError(config.source, "data.held_out", "unknown difficulty", found=self.data.held_out,
                              expected=f"one of {list(sudoku.DIFFICULTIES)}")
        if not 0 <= self.data.revision_p < 1:
            raise ConfigError(config.source, "data.revision_p", "out of range", found=self.data.revision_p,
                              expected="a probability in [0, 1)")
        if not 0 <= self.data.hard_masks_p <= 1:
            raise ConfigError(config.source, "data.hard_masks_p", "out of range", found=self.data.hard_masks_p,
                              expected="a probability in [0, 1]")
        if not (isinstance(self.data.hard_masks_passes, int) and 1 <= self.data.hard_masks_passes <= 81):
            raise ConfigError(config.source, "data.hard_masks_passes", "out of range",
                              found=self.data.hard_masks_passes, expected="an integer from 1 to 81")
        if not (isinstance(self.data.recycle_passes, int) and 1 <= self.data.recycle_passes <= 16):
            raise ConfigError(config.source, "data.recycle_passes", "out of range",
                              found=self.data.recycle_passes, expected="an integer from 1 to 16")
        self.seed = config.train.seed
        self.pool = puzzle_pool(self.data.pool, 1 + self.seed)
        if not self.pool:
            raise ConfigError(config.source, "data.pool", "no puzzles", expected="at least one puzzle")

    def train_pairs(self, step: int, micro: int, n: int) -> list[Pair]:
        rng = random.Random((self.seed * 1_000_003 + step) * 1_009 + micro)
        return [sudoku.transform(*self.pool[rng.randrange(len(self.pool))], rng) for _ in range(n)]

    def held_out_pairs(self, n: int) -> list[Pair]:
        # seed stream 0 is never used for the pool (which uses 1 + seed >= 1)
        return list(sudoku.puzzles(self.data.held_out, n, -1 - self.seed))


class SudokuTask(BlockDiffusionTask):
    """Block diffusion: prompt = the givens (`<bos>` alone for a grid model), one canvas = the 81 digits of the
    solution."""

    def __init__(self, config: TrainConfig) -> None:
        self.sudoku = _SudokuData(config)
        self.generation_defaults = REVISING if self.sudoku.data.revision_p > 0 else DECODING
        super().__init__(config, sudoku.tokenizer(), sudoku.EOS, sudoku.PAD)
        if self.canvas_length != 81:
            raise ConfigError(config.source, "model.diffusion_canvas_length", "wrong canvas length",
                              expected="81 (one canvas holds the whole grid)", found=self.canvas_length)
        self._held_out = [(sudoku.encode_puzzle(p), sudoku.encode_solution(s))
                          for p, s in self.sudoku.held_out_pairs(self.eval_options.examples)]

    def examples(self, step: int, micro: int) -> list[tuple[list[int], list[int]]]:
        return [(sudoku.encode_puzzle(p), sudoku.encode_solution(s))
                for p, s in self.sudoku.train_pairs(step, micro, self.batch_size)]

    def batch(self, step: int, micro: int, generator: torch.Generator) -> DiffusionBatch:
        return self._collate(self.examples(step, micro))

    def _collate(self, examples: list[tuple[list[int], list[int]]]) -> DiffusionBatch:
        """The givens sit fixed in the canvas at inference (`generate(fixed=...)`), so training never corrupts
        nor scores them: every noised token and every loss term is a blank cell."""
        batch = collate(examples, 81, self.eos, self.pad, max_canvases=1)
        batch.supervised &= torch.tensor([[t == sudoku.BLANK for t in prompt[1:]] for prompt, _ in examples])
        return batch

    def held_out(self) -> list[tuple[list[int], list[int]]]:
        return self._held_out

    def loss(self, model: nn.Module, batch: DiffusionBatch, generator: torch.Generator) -> tuple[Tensor, dict]:
        if getattr(model.config, "canvas_grid", None) is None:
            return super().loss(model, batch, generator)
        if self.options.absorbing_token is None:
            raise TrainingError('a grid model trains with masked noise: set objective.kind = "masked" and '
                                f"objective.mask_token_id = {sudoku.MASK}")
        # held-out loss (model.eval()) reads random masks only, so it compares across runs with any hard_masks_p
        hard_masks_p = self.sudoku.data.hard_masks_p if model.training else 0.0
        return grid_loss(model, batch, self.options.absorbing_token, generator, self.sudoku.data.revision_p,
                         self.options.self_conditioning_p, hard_masks_p, self.sudoku.data.hard_masks_passes,
                         self.sudoku.data.recycle_passes)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        self._mark(model)
        device = next(model.parameters()).device
        held_out = self.held_out()
        result = {"loss": float(self.loss(model, self._collate(held_out).to(device),
                                          torch.Generator(device).manual_seed(self.seed))[0])}
        n = self.eval_options.sample_examples
        if n:
            result.update(_solve_rate(model, held_out[:n], self.generation_defaults))
        return result


def grid_loss(model: nn.Module, batch: DiffusionBatch, mask_token_id: int, generator: torch.Generator,
              revision_p: float = 0.0, self_conditioning_p: float = 0.0, hard_masks_p: float = 0.0,
              hard_masks_passes: int = 1, recycle_passes: int = 1) -> tuple[Tensor, dict[str, float]]:
    """Masked diffusion on the blanks of a grid model, through the inference path itself: `encode` of `<bos>`,
    then `decode` of the canvas with the givens in place and each blank masked with probability t ~ U(0, 1) per
    puzzle; cross-entropy averaged over the masked blanks (no 1/t weight: the reveal order at inference is
    easy-first, so every noise level is a state the solver meets). The prompt of the batch is not read: the
    canvas holds the givens. 82 tokens per puzzle instead of the 244 of `block_diffusion_loss`.

    With `revision_p` > 0 each unmasked blank holds a wrong digit with that probability, and the cross-entropy
    covers every blank: the model learns which digits it reads are wrong (what decoding's revision acts on).

    With `hard_masks_p` > 0 that share of the puzzles keeps its number of masked blanks, but masks the blanks
    easy-first decoding reaches last (`hardest_blanks`, replaying `hard_masks_passes` passes of it).

    With `self_conditioning_p` > 0 that share of the puzzles is decoded twice: the second pass reads the first
    one's beliefs as sampling feeds back the previous step's (`denoise_step`: kept cells certain, digits only), so
    the model learns to refine its own candidate digits from pass to pass. With `recycle_passes` = k > 1 the
    beliefs come from a chain of 1 to k passes (drawn per batch) over the same canvas, each reading the last's."""
    clean, blanks = batch.input_ids[:, batch.prompt_length:], batch.supervised                    # [B, 81]
    t = torch.rand(clean.shape[0], 1, generator=generator, device=generator.device).to(clean.device)
    noised, masked = corrupt(clean, blanks, t.expand_as(clean), model.vocab_size, mask_token_id, generator)
    if hard_masks_p > 0:
        rows = torch.rand(clean.shape[0], generator=generator, device=generator.device).to(clean.device)
        rows = (rows < hard_masks_p).nonzero().squeeze(1)
        if len(rows):  # the replay runs on these puzzles only
            masked = masked.clone()
            masked[rows] = hardest_blanks(model, clean[rows], blanks[rows], masked[rows].sum(dim=1), mask_token_id,
                                          hard_masks_passes)
            noised = torch.where(masked, mask_token_id, clean)
    scored = masked
    if revision_p > 0:
        wrong = (torch.rand(clean.shape, generator=generator, device=generator.device).to(clean.device)
                 < revision_p) & blanks & ~masked
        shift = torch.randint(1, 9, clean.shape, generator=generator, device=generator.device).to(clean.device)
        digit = sudoku.DIGIT_IDS[0]
        noised = torch.where(wrong, digit + (clean - digit + shift) % 9, noised)  # another digit, never the same
        scored = blanks
    cache = _bos_cache(model, clean.shape[0], clean.device)
    # the math attention kernel: in a profile of this step (2-core Xeon, bf16, 256 puzzles, 8 heads of 32) the CPU
    # flash kernel's backward took 1.5 s of 3.4 s; with the math kernel the whole step took 2.2 s
    with sdpa_kernel([SDPBackend.MATH]):
        beliefs, rows = None, None
        if self_conditioning_p > 0:
            rows = torch.rand(clean.shape[0], generator=generator, device=generator.device).to(clean.device)
            rows = rows < self_conditioning_p
        if rows is not None and bool(rows.any()):  # no row reads them: no first pass
            chain = 1
            if recycle_passes > 1:
                chain += int(torch.randint(recycle_passes, (1,), generator=generator, device=generator.device))
            with torch.no_grad():  # on the self-conditioned puzzles only: the others never read the beliefs
                picked = rows.nonzero().squeeze(1)
                canvas, picked_cache, chained = noised[picked], _bos_cache(model, len(picked), clean.device), None
                for _ in range(chain):
                    chained = digit_beliefs(model.decode(canvas, picked_cache, chained), canvas, mask_token_id)
                beliefs = chained.new_zeros(*noised.shape, chained.shape[-1]).index_copy_(0, picked, chained)
        logits = model.decode(noised, cache, beliefs, rows)[scored]                                # [N, V]
    targets = clean[scored]
    loss = F.cross_entropy(logits, targets) if len(targets) else logits.sum() * 0
    right = logits.argmax(-1) == targets
    metrics = {"loss": loss.item(), "diffusion_loss": loss.item(), "mean_t": t.mean().item(),
               "token_accuracy": right.float().mean().item() if len(targets) else 0.0,
               "tokens": float(clean.numel() + clean.shape[0])}
    if revision_p > 0:  # how many of the wrong digits the model would correct
        metrics["corrected"] = right[wrong[scored]].float().mean().item() if bool(wrong.any()) else 0.0
    return loss, metrics


def digit_beliefs(logits: Tensor, canvas: Tensor, mask_token_id: int) -> Tensor:
    """The beliefs decoding feeds back (`denoise_step` under the solver's digit-only cells): each shown cell its
    own digit for certain, each masked one a distribution over the nine digits. [B, 81, V] -> [B, 81, V]."""
    beliefs = carry_over(logits, canvas, mask_token_id)
    not_digit = torch.ones(beliefs.shape[-1], dtype=torch.bool, device=beliefs.device)
    not_digit[sudoku.DIGIT_IDS] = False
    return beliefs.masked_fill(not_digit, float("-inf"))


def _bos_cache(model: nn.Module, batch_size: int, device: torch.device) -> KVCache:
    """The prefix every grid canvas reads: `<bos>` alone, encoded (the givens sit in the canvas)."""
    cache = model.new_cache(batch_size, device)
    bos = torch.full((batch_size, 1), sudoku.BOS, device=device)
    model.encode(bos, cache, torch.ones_like(bos, dtype=torch.bool))
    return cache


@torch.no_grad()
def hardest_blanks(model: nn.Module, clean: Tensor, blanks: Tensor, count: Tensor, mask_token_id: int,
                   passes: int = 1, threshold: float = float(DECODING["accept_probability"])) -> Tensor:
    """[B, 81] bool: in each puzzle the `count[b]` blanks easy-first decoding reaches last (the givens are never
    chosen). Decoding is replayed from the empty grid for up to `passes` passes: each pass shows, with its true
    digit, every masked blank whose most likely digit the model is sure of (>= `threshold`, decoding's rule), and
    blanks rank by the pass that showed them, the ones never shown last; within a pass, the less sure one is the
    later. One pass ranks by the model's confidence on the empty grid alone; more passes reach the canvases where
    decoding gets stuck (nothing left it is sure of), which are where its guesses, and its errors, are made."""
    canvas = torch.where(blanks, mask_token_id, clean)
    cache = _bos_cache(model, clean.shape[0], clean.device)
    hidden = blanks.clone()
    lateness = torch.full(clean.shape, float("-inf"), device=clean.device)  # givens: never chosen
    for n in range(passes):
        with sdpa_kernel([SDPBackend.MATH]):
            sure = model.decode(canvas, cache, None).float().softmax(dim=-1).amax(dim=-1)            # [B, 81]
        lateness = torch.where(hidden, n + 1 - sure, lateness)  # a blank shown this pass keeps its value
        shown = hidden & (sure >= threshold)
        if n == passes - 1 or not bool(shown.any()):  # the last pass, or every puzzle stuck: nothing changes
            break
        canvas, hidden = torch.where(shown, clean, canvas), hidden & ~shown
    rank = lateness.argsort(dim=1, descending=True).argsort(dim=1)  # 0 = the blank decoding reaches last
    return rank < count[:, None]


class SudokuARTask:
    """The autoregressive baseline: the same prompt, then the 81 digits left to right (greedy at evaluation)."""

    def __init__(self, config: TrainConfig) -> None:
        self.sudoku = _SudokuData(config)
        self.eval_options = read_section(EvalOptions, config.eval, config.source, "eval")
        self.batch_size = config.optim.batch_size
        self._held_out = self.sudoku.held_out_pairs(self.eval_options.examples)

    def batch(self, step: int, micro: int, generator: torch.Generator) -> Tensor:
        return torch.tensor([sudoku.encode_puzzle(p) + sudoku.encode_solution(s)
                             for p, s in self.sudoku.train_pairs(step, micro, self.batch_size)])  # [B, 163]

    def loss(self, model: nn.Module, batch: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        # the math kernel, as for the grid model: on CPUs the flash kernel's backward was 35% of a 64-puzzle step
        with sdpa_kernel([SDPBackend.MATH]):
            logits = model(batch, model.new_cache(batch.shape[0], batch.device),
                           torch.ones_like(batch, dtype=torch.bool))
        predicted, targets = logits[:, 81:-1], batch[:, 82:]  # the logits that predict the 81 solution digits
        # as for diffusion, only blanks are scored: decoding copies the givens (`allowed_tokens`)
        blank = batch[:, 1:82] == sudoku.BLANK
        loss = F.cross_entropy(predicted[blank].float(), targets[blank])
        accuracy = float((predicted.argmax(-1) == targets)[blank].float().mean())
        return loss, {"token_accuracy": accuracy, "tokens": float(blank.sum())}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        device = next(model.parameters()).device
        full = torch.tensor([sudoku.encode_puzzle(p) + sudoku.encode_solution(s) for p, s in self._held_out],
                            device=device)
        result = {"loss": float(self.loss(model, full, torch.Generator())[0])}
        n = self.eval_options.sample_examples
        if n:
            result.update(_solve_rate(model, [(sudoku.encode_puzzle(p), []) for p, _ in self._held_out[:n]],
                                      DECODING))
        return result

    def export(self, model: nn.Module, out_dir: Path) -> None:
        hf.save_model(model, out_dir, {"eos_token_id": [sudoku.EOS], "pad_token_id": sudoku.PAD})
        sudoku.tokenizer().to_dir(out_dir)


def _solve_rate(model: nn.Module, examples: list[tuple[list[int], list[int]]], decoding: dict[str, Any]
                ) -> dict[str, float]:
    """solve_rate (valid grids keeping the givens, by the model alone, as `canvaslm sudoku eval` solves with an
    exported model's default `decoding`) and the forward passes per puzzle."""
    puzzles = [sudoku.decode_cells(prompt[1:]) for prompt, _ in examples]
    answers = solve(LM(model, sudoku.tokenizer(), "the model in training", decoding), puzzles)
    return {"solve_rate": sum(a.solved for a in answers) / len(answers),
            "forward_passes": sum(a.forward_passes for a in answers) / len(answers)}
