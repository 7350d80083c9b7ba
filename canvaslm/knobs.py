"""The sampling options, declared once: name, type, range, default and help of every knob.

Everything else is derived from this list, so adding an option touches one place:

* `canvaslm.diffusion.sampling.DiffusionSampling` (the diffusion knobs, their defaults and checks) and the AR
  defaults of `LM` (`defaults("ar")`);
* the command line's flags (`canvaslm generate --entropy-bound ...`);
* the server's request fields (`canvaslm.server.protocol.Sampling`), with the same bounds.

tests/test_knobs.py proves the three surfaces agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from canvaslm.errors import GenerationError

ACCEPTANCE_RULES = ("entropy_bound", "threshold", "top_k", "adaptive")
SAMPLERS = ("reference", "fast", "greedy")
ORDERS = ("confidence", "left_to_right")
FIRST_TOKENS = ("decoder", "causal")
ADJACENT_REPEATS = ("keep", "wait", "drop")


@dataclass(frozen=True)
class Knob:
    name: str
    kind: type                    # int, float or str
    default: Any
    help: str
    mode: str                     # "ar" (autoregressive decoding), "diffusion" (canvases) or "both"
    low: float | None = None      # smallest value (excluded when low_open)
    low_open: bool = False
    high: float | None = None     # largest value (included)
    choices: tuple[str, ...] = ()

    @property
    def expected(self) -> str:
        """What a value must be, in words ("an integer >= 1", "a number in (0, 1]")."""
        if self.choices:
            return f"one of {self.choices}"
        what = "an integer" if self.kind is int else "a number"
        low = None if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is None:
            return f"{what} {low}" if low else what
        left = "(" if self.low_open else "["
        return f"{what} in {left}{self.low:g}, {self.high:g}]"

    def valid(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, int if self.kind is int else (int, float)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def check(self, value: Any) -> None:
        if not self.valid(value):
            raise GenerationError(f"{self.name} must be {self.expected}, got {value!r}")


KNOBS: tuple[Knob, ...] = (
    # autoregressive models
    Knob("temperature", float, 0.7, "sampling temperature, 0 = greedy", "ar", low=0, high=2),
    Knob("top_p", float, 1.0, "nucleus sampling mass", "ar", low=0, low_open=True, high=1),
    Knob("top_k", int, 0, "sample among the k most likely tokens (0 = all)", "ar", low=0),
    # block-diffusion models (defaults and names of transformers' DiffusionGemmaGenerationConfig)
    Knob("max_denoising_steps", int, 48, "most decoder passes spent on one canvas", "diffusion", low=1, high=1024),
    Knob("entropy_bound", float, 0.1, "accept the k most certain tokens whose summed entropy, minus the largest, "
         "stays under this (nats)", "diffusion", low=0, low_open=True),
    Knob("t_min", float, 0.4, "temperature at the last denoising step", "diffusion", low=0),
    Knob("t_max", float, 0.8, "temperature at the first denoising step (linear schedule in between)", "diffusion",
         low=0),
    Knob("stability_threshold", int, 1, "a canvas stops once its argmax is unchanged for this many steps (and is "
         "confident)", "diffusion", low=0, high=64),
    Knob("confidence_threshold", float, 0.005, "... and its mean token entropy (nats) is below this", "diffusion",
         low=0, low_open=True),
    Knob("acceptance", str, "entropy_bound", "which tokens a step keeps (the rest are re-noised): entropy_bound "
         "(the reference's rule), threshold (top probability >= accept_probability, as Fast-dLLM), top_k "
         "(accept_k more tokens per step), adaptive (entropy_bound plus Fast-dLLM v2's confidence-factor rule)",
         "diffusion", choices=ACCEPTANCE_RULES),
    Knob("accept_probability", float, 0.9, "rule threshold: top probability a token needs to be kept", "diffusion",
         low=0, low_open=True, high=1),
    Knob("accept_k", int, 8, "rule top_k: tokens added per step (k x step kept)", "diffusion", low=1, high=65536),
    Knob("accept_factor", float, 1.0, "rule adaptive: slack of the confidence-factor rule", "diffusion", low=0,
         low_open=True),
    Knob("sampler", str, "reference", "how a step draws its tokens: reference (torch.multinomial, the reference's "
         "random stream) or fast (one uniform per position and an inverse-CDF search: the same distribution, "
         "~4x less sampler time on a CPU) or greedy (each position's most likely token; the temperature then only "
         "shapes the confidence the acceptance rule reads: puzzles, where a sampled slip is an error)", "diffusion",
         choices=SAMPLERS),
    Knob("revise_probability", float, 0.0, "masked models trained to revise (Sudoku's data.revision_p): a kept "
         "token changes to the model's most likely token when that one differs and has at least this probability; "
         "0 = a kept token is final", "diffusion", low=0, high=1),
    Knob("order", str, "confidence", "masked models: which undecided positions the acceptance rule looks at first: "
         "confidence (the most certain anywhere in the canvas, the reference's way) or left_to_right (the rule "
         "runs along the canvas and keeps a prefix of the undecided positions, the first always: no token is placed "
         "ahead of text it cannot see yet)", "diffusion", choices=ORDERS),
    Knob("first_token", str, "decoder", "shift-trained masked models (`smol`): where each canvas's first token comes "
         "from: decoder (the canvas's first decoder pass, the reference's way) or causal (drawn, at the first step's "
         "temperature, from the causal pass that encoded the text before it, which such a model's first pass reads "
         "it from anyway: one decoder pass fewer per canvas, and the next pass sees it)", "diffusion",
         choices=FIRST_TOKENS),
    Knob("first_token_temperature", float, 0.0, "first_token = causal: the temperature the first token is drawn at "
         "from the causal pass; 0 = the first denoising step's (t_max). The parent's own temperature (0.7) draws it "
         "as the parent would, where the canvas after it stays cold", "diffusion", low=0),
    Knob("adjacent_repeats", str, "keep", "order left_to_right: a token that one pass draws for two neighbouring "
         "undecided positions: keep both (as drawn) or wait (the second stays undecided until a pass that sees "
         "the first draws it again: positions drawn in one pass are drawn independently, and the doubled words "
         "they give, \"the sky sky\", are ~1% of a canvas's words and none of the AR's), or drop (kept in the "
         "pass, and `commit_check` drops the canvas from the second of two equal neighbours after its first token: "
         "the causal pass that committed the first then draws what follows it, a repeat only where the model "
         "itself wants one, and no decoder pass is spent waiting; needs commit_check, and under a constraint, which is "
         "never checked, it waits)", "diffusion",
         choices=ADJACENT_REPEATS),
    Knob("canvas_size", int, 0, "tokens a canvas holds at decoding time, at most the canvas the model was "
         "trained on (0 = that canvas): a smaller one is fewer rows a decoder pass and a commit more often, which "
         "pays where rows cost (a batch of requests, int4 CPU kernels); `smol`, trained on clean prefixes, writes "
         "better text in canvases of 4. An infill keeps the trained canvas unless this is given: a middle sees "
         "its suffix only inside the suffix's canvas", "diffusion", low=0, high=65536),
    Knob("sub_block", int, 0, "masked models: only the first sub-block of this many positions that still holds a "
         "mask may keep tokens in a step, so a canvas fills left to right in chunks (Fast-dLLM v2's small blocks); "
         "0 = the whole canvas", "diffusion", low=0, high=65536),
    Knob("think_passes", int, 0, "rule threshold on a masked model: passes a canvas may spend keeping nothing "
         "when no undecided token reaches accept_probability, re-reading its own beliefs through self-conditioning, "
         "before it keeps its most confident one anyway (models trained on recycled beliefs: Sudoku's "
         "data.recycle_passes); 0 = keep it at once", "diffusion", low=0, high=64),
    Knob("commit_check", float, 0.0, "the causal pass that commits a canvas (the model's own AR logits) checks it: "
         "the first token after the canvas's first that it gives less than this probability is dropped, with the "
         "rest of the canvas, and the next canvas starts there (the cache rolled back; a shift-trained model's "
         "first token drawn from the causal pass at that position): a canvas's unlikely slips, \"Try2to-5\", never "
         "reach the answer, at the cost of the passes that drew the dropped tokens; served text streams at each "
         "commit, once checked, not as settled prefixes. Not under a constraint (infill, JSON schema: their pins "
         "sit at fixed positions); 0 = off",
         "diffusion", low=0, high=0.5),
    # every decoding (OpenAI's penalties, counted over the generated tokens only, as OpenAI and vLLM count them)
    Knob("presence_penalty", float, 0.0, "subtracted from the logit of every token the answer already holds "
         "(a canvas: its committed text and the tokens it keeps)", "both", low=-2, high=2),
    Knob("no_repeat_ngram_size", int, 0, "no n-gram of this many generated tokens comes twice: a token that would "
         "complete one the answer already holds is never drawn (a canvas bans it where the tokens before it are "
         "known; one drawn beside undecided neighbours waits for a pass that sees them); 0 = off", "both",
         low=0, high=64),
    Knob("frequency_penalty", float, 0.0, "subtracted from a token's logit once per time the answer already holds "
         "it", "both", low=-2, high=2),
)
BY_NAME = {knob.name: knob for knob in KNOBS}


def knobs(mode: str) -> tuple[Knob, ...]:
    """The knobs of "ar" or "diffusion" decoding (those of both included)."""
    return tuple(knob for knob in KNOBS if knob.mode in (mode, "both"))


def defaults(mode: str) -> dict[str, Any]:
    return {knob.name: knob.default for knob in knobs(mode)}


DECODING = ("diffusion", "verified", "autoregressive")
"""How a diffusion model writes: its canvases (`diffusion`); canvas drafts checked by its causal pass, with exactly
the AR distribution (`verified`, `canvaslm.engine.verified`); or its causal pass alone, token by token
(`autoregressive`). The last two take the AR options (temperature, top_p, top_k; the penalties, which every decoding
takes). An AR model only does the last."""
