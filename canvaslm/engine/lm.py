"""The public model object: `canvaslm.load(...)` returns an `LM` that generates, chats and completes.

It owns the network, the tokenizer and the sampling defaults; the loops themselves live in
`canvaslm.diffusion.generate` (block diffusion) and `canvaslm.engine.ar` (autoregressive baseline).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from canvaslm.checkpoints import hf
from canvaslm.checkpoints.tokenizer import Tokenizer
from canvaslm.diffusion.generate import DiffusionResult, generate_steps
from canvaslm.diffusion.sampling import DiffusionSampling
from canvaslm.diffusion.step import Constraint, canvas_size
from canvaslm.engine.ar import ar_generate
from canvaslm.engine.structured import SlotGrammars, StructuredResult, generate_json
from canvaslm.engine.verified import verified_generate
from canvaslm.errors import GenerationError, UnsupportedError
from canvaslm.knobs import BY_NAME, DECODING, defaults
from canvaslm.models.cache import encode_chunked

AR_SAMPLING = defaults("ar")
"""Autoregressive defaults (temperature 0 = greedy), from canvaslm.knobs."""


@dataclass
class GenerateResult:
    sequences: Tensor           # [B, L + new] prompts (left-padded) then generated ids, pad after EOS
    tokens_per_forward: Tensor  # [B] generated tokens / decoder forward passes (AR: 1 token per pass)
    forward_passes: Tensor      # [B]
    seconds: float
    commit_passes: Tensor | None = None  # [B] a diffusion model's causal passes over its committed canvases (None
                                         # for verified and AR decoding, whose forward_passes count them all)


@dataclass
class TextResult:
    text: str
    token_ids: list[int]        # generated ids, up to (not including) EOS
    tokens_per_forward: float
    forward_passes: int
    seconds: float
    finish_reason: str          # "stop" (EOS) or "length" (max_new_tokens reached)


class LM:
    """A loaded model: `kind` is "diffusion" or "autoregressive"; `tokenizer` is None when the checkpoint has none."""

    def __init__(self, network: nn.Module, tokenizer: Tokenizer | None, source: str,
                 generation_config: Mapping[str, Any] | None = None) -> None:
        self.network, self.tokenizer, self.source = network, tokenizer, source
        self.quantization = "none"  # weight-only packing `canvaslm.load` applied (canvaslm.models.quant)
        self.compiled: bool | str = False  # what `canvaslm.load` compiled: True (the passes), "layers" or False
        self.kind: str = network.kind
        self.config = network.config
        settings = dict(generation_config or {})
        diffusion_keys = {k: settings[k] for k in DiffusionSampling.__dataclass_fields__ if k in settings}
        self.diffusion_defaults = DiffusionSampling().replace(**diffusion_keys)
        if self.kind == "diffusion":
            canvas_size(network, self.diffusion_defaults)  # a default canvas_size must fit the trained canvas
        # a diffusion model's generation config tunes its canvases: the penalties there are not its causal pass's
        self.ar_defaults = {k: settings.get(k, v) if self.kind != "diffusion" or BY_NAME[k].mode == "ar" else v
                            for k, v in AR_SAMPLING.items()}
        eos = settings.get("eos_token_id", getattr(self.config, "eos_token_id", None))
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer is not None:
            eos_ids += [i for i in tokenizer.eos_token_ids if i not in eos_ids]
        self.eos_token_ids: list[int] = eos_ids
        pad = settings.get("pad_token_id", getattr(self.config, "pad_token_id", None))
        if pad is None and tokenizer is not None:
            pad = tokenizer.pad_token_id
        self.pad_token_id: int | None = pad
        self._slot_grammars: SlotGrammars | None = None

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def dtype_name(self) -> str:
        """The weights' dtype as people write it ("bfloat16"): what reports and `--json` output show."""
        return str(next(self.network.parameters()).dtype).removeprefix("torch.")

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings

    def __repr__(self) -> str:
        return f"LM({self.source!r}, kind={self.kind!r}, device={self.device})"

    # ---- token-level API -------------------------------------------------------------------------------

    def generate(self, prompt_ids: Sequence[Sequence[int]] | Sequence[int] | Tensor, max_new_tokens: int = 256,
                 seed: int | None = None, attention_mask: Tensor | None = None, exact: bool = False,
                 decoding: str | None = None, **sampling: Any) -> GenerateResult:
        """Generate after one prompt or a batch of prompts (lists of ids of any lengths, or a left-padded
        tensor with `attention_mask`). Diffusion options: see `DiffusionSampling`; AR: temperature, top_p, top_k.
        Rows that finished cost no decoder work unless `exact` asks for the reference's random draws in every
        case (see `generate_steps`'s `skip_finished`). `decoding`: see `DECODING` (default: the model's kind)."""
        start = time.perf_counter()
        *_, result = self.generate_steps(prompt_ids, max_new_tokens, seed, attention_mask, exact,
                                         decoding=decoding, **sampling)
        return GenerateResult(result.sequences, result.tokens_per_forward, result.forward_passes,
                              time.perf_counter() - start, result.commit_passes)

    def generate_steps(self, prompt_ids: Any, max_new_tokens: int = 256, seed: int | None = None,
                       attention_mask: Tensor | None = None, exact: bool = False,
                       constraint: Constraint | None = None, decoding: str | None = None,
                       **sampling: Any) -> Iterator[Any]:
        """Like `generate`, yielding the loop's events (diffusion: `DenoisingStep`, `CanvasCommitted`) and last a
        `DiffusionResult` (verified and AR decoding: only the result). `constraint` pins generated positions to
        tokens and restricts the tokens others may take (diffusion decoding only, see
        `canvaslm.diffusion.step.Constraint`)."""
        mode = self.decoding_mode(decoding)
        input_ids, valid = self.batch(prompt_ids, attention_mask)
        self.check_length(input_ids.shape[1], max_new_tokens)
        generator = torch.Generator(self.device)
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        with torch.inference_mode():
            if mode == "diffusion":
                settings = self.diffusion_settings(sampling)
                yield from generate_steps(self.network, input_ids, valid, max_new_tokens, settings,
                                          self.eos_token_ids, self.pad_token_id, generator,
                                          constraint, skip_finished=not exact)
                return
            if constraint is not None:
                raise UnsupportedError(f"fixed tokens (infill, canvas constraints) need diffusion decoding; "
                                       f"{mode} decoding cannot see what follows")
            options = self.ar_settings(sampling)
            if mode == "verified":
                verified = verified_generate(self.network, input_ids, valid, max_new_tokens,
                                             eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id,
                                             generator=generator, **options)
                passes = verified.forward_passes.clamp(min=1)
                yield DiffusionResult(verified.sequences, passes, verified.new_tokens / passes)
                return
            out = ar_generate(self.network, input_ids, valid, max_new_tokens, eos_token_ids=self.eos_token_ids,
                              pad_token_id=self.pad_token_id, generator=generator, **options)
            passes = torch.full((input_ids.shape[0],), max(out.forward_passes, 1), device=input_ids.device)
            yield DiffusionResult(out.sequences, passes, out.new_tokens / passes)

    def decoding_mode(self, decoding: str | None) -> str:
        """`decoding` checked against this model (None: "diffusion" for a diffusion model, else "autoregressive")."""
        if decoding is None:
            return "diffusion" if self.kind == "diffusion" else "autoregressive"
        if decoding not in DECODING:
            raise GenerationError(f"decoding must be one of {list(DECODING)}, got {decoding!r}")
        if self.kind != "diffusion" and decoding != "autoregressive":
            raise UnsupportedError(f"{decoding} decoding needs a block-diffusion model; {self.source} is "
                                   "autoregressive")
        return decoding

    def denoise(self, prompt_ids: Any, canvas_ids: Tensor, self_conditioning_logits: Tensor | None = None) -> Tensor:
        """One decoder pass: float32 logits [B, canvas, vocab] for `canvas_ids` [B, canvas] after the prompts."""
        self._require("diffusion", "denoise")
        input_ids, valid = self.batch(prompt_ids, None)
        with torch.inference_mode():
            cache = self.network.new_cache(input_ids.shape[0], self.device)
            encode_chunked(self.network, input_ids, cache, valid)
            canvas = torch.as_tensor(canvas_ids, device=self.device).reshape(input_ids.shape[0], -1)
            sc = None if self_conditioning_logits is None else self_conditioning_logits.to(self.device)
            return self.network.decode(canvas, cache, sc).float()

    def logits(self, input_ids: Any) -> Tensor:
        """Causal next-token logits, float32 [B, L, vocab], for autoregressive models."""
        self._require("autoregressive", "logits")
        ids, valid = self.batch(input_ids, None)
        with torch.inference_mode():
            return self.network(ids, self.network.new_cache(ids.shape[0], self.device), valid).float()

    def save(self, directory: str | Path) -> None:
        """Write an HF-layout directory (config, safetensors weights, generation config, tokenizer) that
        `canvaslm.load` reads back."""
        settings = vars(self.diffusion_defaults) if self.kind == "diffusion" else dict(self.ar_defaults)
        hf.save_model(self.network, directory, {**settings, "eos_token_id": self.eos_token_ids,
                                                "pad_token_id": self.pad_token_id})
        if self.tokenizer is not None:
            self.tokenizer.to_dir(directory)

    # ---- text API ----------------------------------------------------------------------------------------

    def chat(self, messages: Sequence[Mapping[str, Any]], max_new_tokens: int = 256, seed: int | None = None,
             json_schema: Mapping[str, Any] | None = None, decoding: str | None = None,
             **sampling: Any) -> TextResult:
        """Answer a conversation ([{"role": ..., "content": ...}, ...]) rendered with the model's chat template;
        with `json_schema`, the answer is JSON that validates against it (`canvaslm.engine.structured`).
        `decoding`: see `DECODING`."""
        return self.answer(self.chat_prompt_ids(messages), max_new_tokens, seed, sampling, json_schema, decoding)

    def complete(self, text: str, max_new_tokens: int = 256, seed: int | None = None,
                 json_schema: Mapping[str, Any] | None = None, decoding: str | None = None,
                 **sampling: Any) -> TextResult:
        """Continue plain text (with `json_schema`: as JSON that validates against it)."""
        tokenizer = self.require_tokenizer()
        return self.answer(tokenizer.encode(text, add_special_tokens=True), max_new_tokens, seed, sampling,
                           json_schema, decoding)

    def generate_json(self, prompt_ids: list[int], schema: Mapping[str, Any], max_new_tokens: int = 256,
                      seed: int | None = None, **sampling: Any) -> StructuredResult:
        """JSON after `prompt_ids` that validates against `schema`: a diffusion model lays the schema out on the
        canvas (`canvaslm.engine.structured`; its size, not max_new_tokens, sets the length); an autoregressive
        one decodes under llguidance's grammar (`canvaslm.engine.guided`, needs `pip install llguidance`)."""
        if self.kind == "diffusion":
            return generate_json(self, prompt_ids, schema, seed=seed, **sampling)
        from canvaslm.engine.guided import guided_json

        self.check_length(len(prompt_ids), max_new_tokens)
        return guided_json(self, prompt_ids, schema, max_new_tokens, seed=seed, **self.ar_settings(sampling))

    def slot_grammars(self) -> SlotGrammars:
        """The token grammars of structured output for this tokenizer (built on first use: reads the vocabulary)."""
        if self._slot_grammars is None:
            tokenizer, vocab = self.require_tokenizer(), self.network.vocab_size
            known = min(tokenizer.vocab_size, vocab)
            anchor = tokenizer.encode("a", add_special_tokens=False)[0]
            self._slot_grammars = SlotGrammars(tokenizer.decode, known, anchor, vocab)
        return self._slot_grammars

    def infill(self, prefix: str, suffix: str, max_new_tokens: int = 64, seed: int | None = None,
               **sampling: Any) -> TextResult:
        """Write the middle between `prefix` and `suffix`: `max_new_tokens` free positions, then the suffix's
        tokens held fixed in the canvas (in whichever canvas they fall), so the middle is denoised seeing what
        follows it. The text is the middle, up to its first EOS ("stop") or all of it ("length")."""
        self._require("diffusion", "infill")
        tokenizer = self.require_tokenizer()
        prompt = tokenizer.encode(prefix, add_special_tokens=True)
        tail = tokenizer.encode(suffix, add_special_tokens=False)
        self.check_length(len(prompt) + len(tail), max_new_tokens)
        pins = torch.tensor([[-1] * max_new_tokens + tail], device=self.device)
        start = time.perf_counter()
        *_, out = self.generate_steps([prompt], max_new_tokens + len(tail), seed, constraint=Constraint(pins),
                                      **self.infill_sampling(sampling))
        ids, reason = self.decode_new(out.sequences[0], len(prompt))
        reason = "stop" if reason == "stop" and len(ids) < max_new_tokens else "length"
        ids, passes = ids[:max_new_tokens], int(out.forward_passes[0])
        # tokens per forward counts the written middle, not the suffix that was given
        return TextResult(tokenizer.decode(ids), ids, len(ids) / passes, passes, time.perf_counter() - start, reason)

    @staticmethod
    def infill_sampling(sampling: Mapping[str, Any]) -> dict[str, Any]:
        """An infill's options: the trained canvas unless `canvas_size` is given, whatever the model's default.
        The middle sees the suffix only inside the canvas the suffix starts in, so a short canvas hides it from all
        but the last few positions: `smol` in canvases of 4 parsed 6 of 50 code infills against 8 in its trained
        16, at two thirds of the speed (session 24, docs/default-model.md)."""
        return {"canvas_size": 0, **sampling}

    def chat_prompt_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        tokenizer = self.require_tokenizer()
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or not isinstance(message.get("content", ""), str):
                kinds = [part.get("type") for part in message.get("content", [])
                         if isinstance(part, Mapping)] if isinstance(message, Mapping) else []
                if any(k in ("image", "image_url", "video", "video_url", "input_audio") for k in kinds):
                    raise UnsupportedError(f"messages[{i}]: image/video/audio inputs are not supported yet; "
                                           "send text content only")
                raise GenerationError(f"messages[{i}] must be a mapping with a string 'content', got {message!r}")
        return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def decode_new(self, sequence: Tensor, prompt_length: int) -> tuple[list[int], str]:
        """Generated ids of one row up to its first EOS, and why generation ended there."""
        ids = sequence[prompt_length:].tolist()
        for i, token in enumerate(ids):
            if token in self.eos_token_ids:
                return ids[:i], "stop"
        return ids, "length"

    def answer(self, prompt: list[int], max_new_tokens: int, seed: int | None, sampling: dict,
               json_schema: Mapping[str, Any] | None = None, decoding: str | None = None) -> TextResult:
        """One answer after prompt ids, as text (the CLI's generate and chat): JSON valid against `json_schema`
        when one is given."""
        mode = self.decoding_mode(decoding)
        if json_schema is not None:
            if mode != ("diffusion" if self.kind == "diffusion" else "autoregressive"):
                raise UnsupportedError(f"json_schema answers are written by the model's own way ({self.kind}); "
                                       f"{mode} decoding does not take one")
            start = time.perf_counter()
            structured = self.generate_json(prompt, json_schema, max_new_tokens, seed, **sampling)
            ids = self.require_tokenizer().encode(structured.text, add_special_tokens=False)
            return TextResult(structured.text, ids, structured.tokens / structured.forward_passes,
                              structured.forward_passes, time.perf_counter() - start, "stop")
        out = self.generate([prompt], max_new_tokens, seed, decoding=decoding, **sampling)
        ids, reason = self.decode_new(out.sequences[0], len(prompt))
        ids = ids[:max_new_tokens]
        return TextResult(self.require_tokenizer().decode(ids), ids, float(out.tokens_per_forward[0]),
                          int(out.forward_passes[0]), out.seconds, reason)

    # ---- helpers -------------------------------------------------------------------------------------------

    def require_tokenizer(self) -> Tokenizer:
        """The tokenizer, or a GenerationError saying this checkpoint has none (the text API needs one)."""
        if self.tokenizer is None:
            raise GenerationError(f"{self.source}: this checkpoint has no tokenizer (tokenizer.json), so the text "
                                  "API (chat/complete) cannot be used; pass token ids to generate() instead")
        return self.tokenizer

    def _require(self, kind: str, method: str) -> None:
        if self.kind != kind:
            raise GenerationError(f"{method}() needs a {kind} model; {self.source} is {self.kind}")

    def resolve_sampling(self, sampling: dict[str, Any], decoding: str | None = None
                         ) -> DiffusionSampling | dict[str, Any]:
        """The settings a call in `decoding` (default: the model's own) runs with: this model's defaults overridden
        by `sampling`; a GenerationError names an option that decoding does not take or a value out of range."""
        if self.decoding_mode(decoding) == "diffusion":
            return self.diffusion_settings(sampling)
        options = self.ar_settings(sampling)
        for name in AR_SAMPLING:
            BY_NAME[name].check(options[name])
        return options

    def diffusion_settings(self, sampling: dict[str, Any]) -> DiffusionSampling:
        ar_only = sorted(name for name in sampling if name in BY_NAME and BY_NAME[name].mode == "ar")
        if ar_only:
            raise GenerationError(f"{ar_only} apply to autoregressive models; this diffusion model takes "
                                  f"{sorted(DiffusionSampling.__dataclass_fields__)}")
        settings = self.diffusion_defaults.replace(**sampling)
        canvas_size(self.network, settings)  # a canvas the model never saw is refused here, not in a loop
        return settings

    def ar_settings(self, sampling: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(sampling) - set(AR_SAMPLING))
        if unknown:
            raise GenerationError(f"unknown or diffusion-only option(s) {unknown} for an autoregressive model; "
                                  f"it takes {sorted(AR_SAMPLING)}")
        return {**self.ar_defaults, **{k: v for k, v in sampling.items() if v is not None}}

    def check_length(self, prompt_length: int, max_new_tokens: int) -> None:
        """A GenerationError when max_new_tokens is not >= 1 or the request does not fit the context."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if prompt_length + max_new_tokens > self.max_length:
            raise GenerationError(f"this model's maximum context length is {self.max_length} tokens and your "
                                  f"request has {prompt_length} input tokens plus max_new_tokens={max_new_tokens}")

    def batch(self, prompt_ids: Any, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Left-pad a prompt or list of prompts into (ids [B, L], valid [B, L])."""
        if isinstance(prompt_ids, Tensor):
            ids = prompt_ids.to(self.device).long().reshape(-1, prompt_ids.shape[-1])
            valid = (torch.ones_like(ids, dtype=torch.bool) if attention_mask is None
                     else attention_mask.to(self.device).bool().reshape(ids.shape))
        else:
            one = prompt_ids and isinstance(prompt_ids[0], int)
            rows = [list(prompt_ids)] if one else [list(r) for r in prompt_ids]
            if not rows or any(not row or not all(isinstance(t, int) for t in row) for row in rows):
                raise GenerationError("prompt_ids must be a non-empty list of token ids, or a list of such lists")
            width, pad = max(map(len, rows)), self.pad_token_id or 0
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
            valid = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], device=self.device)
        vocab = self.network.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise GenerationError(f"token ids must be in [0, {vocab}), got values in "
                                  f"[{int(ids.min())}, {int(ids.max())}]")
        return ids, valid
