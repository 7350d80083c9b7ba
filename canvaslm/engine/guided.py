"""Grammar-constrained autoregressive decoding with llguidance: the AR baseline for structured output.

Each step asks the grammar matcher which tokens may come next (a bitmask over the vocabulary), samples among
them, and then takes the tokens the grammar forces from there ("fast-forward": the `", "key": ` between two
values) without sampling; the sampled token and the forced ones go through the network in one forward pass.
That is what the strongest AR engines do (llguidance in vLLM/SGLang, "jump-forward" decoding), so the
comparison with the diffusion scaffold in `canvaslm.engine.structured` is fair.

`guided_json` gives autoregressive models `json_schema` answers (`LM.chat(json_schema=...)`, the server's
`response_format`). llguidance is optional (`pip install llguidance`; a 3 MB wheel with no dependencies).
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from canvaslm.diffusion.sampling import append_written, count_tokens
from canvaslm.engine.ar import advance, prefill, sample_next
from canvaslm.engine.structured import SchemaError, StructuredOutputError, StructuredResult, check_schema, violations
from canvaslm.errors import CanvasError, UnsupportedError

_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Tokenizer -> LLTokenizer (~0.5 s to build)


class GuidedDecodingError(CanvasError):
    """The grammar could not be compiled, or the answer did not finish within the token budget."""


@dataclass
class GuidedResult:
    token_ids: list[int]   # the answer's tokens (sampled and forced), without the EOS
    forward_passes: int    # prefill + one per sampled token after the first
    forced: int            # tokens the grammar forced (no sampling, no extra pass)
    finished: bool         # the grammar reached its end (the answer is complete)


def require_llguidance() -> Any:
    """The llguidance module, or UnsupportedError saying how to install it."""
    try:
        import llguidance
    except ImportError:
        raise UnsupportedError("grammar-constrained autoregressive decoding needs llguidance: "
                               "pip install llguidance") from None
    return llguidance


def llg_tokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """llguidance's view of a canvaslm `Tokenizer` (its `tokenizers` JSON), padded to the network's vocabulary;
    built once per tokenizer."""
    llguidance = require_llguidance()
    if tokenizer not in _TOKENIZERS:
        spec = tokenizer.backend.to_str()
        try:
            built = llguidance.LLTokenizer(spec, n_vocab=vocab_size, eos_token=tokenizer.eos_token_ids)
        except ValueError as error:  # llguidance reads byte-level and byte-fallback decoders, not Metaspace
            if (json.loads(spec).get("decoder") or {}).get("type") != "Metaspace":
                raise UnsupportedError(f"{tokenizer.source}: llguidance cannot read this tokenizer for "
                                       f"grammar-constrained decoding ({error})") from None
            built = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_MetaspaceTokens(tokenizer)),
                                           n_vocab=vocab_size, eos_token=tokenizer.eos_token_ids)
        _TOKENIZERS[tokenizer] = built
    return _TOKENIZERS[tokenizer]


class _MetaspaceTokens:
    """A sentencepiece-style tokenizer (Metaspace decoder) as the bytes of each token, the form llguidance's
    `TokenizerWrapper` takes: "▁" is a space, `<0xNN>` one byte, special tokens are marked, not spelled."""

    def __init__(self, tokenizer: Any) -> None:
        backend = tokenizer.backend
        special = {i for i, added in backend.get_added_tokens_decoder().items() if added.special}
        self.tokens: list[bytes] = []
        self._ids: dict[bytes, int] = {}  # the spelling of each ordinary token (the first id, for duplicates)
        for i in range(backend.get_vocab_size()):
            piece = backend.id_to_token(i) or ""
            if i in special:
                self.tokens.append(b"\xff" + piece.encode())
                continue
            byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
            self.tokens.append(bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode())
            self._ids.setdefault(self.tokens[-1], i)
        self.special_token_ids = sorted(special)
        self.eos_token_id = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
        self.bos_token_id = tokenizer.bos_token_id
        self._longest = max(map(len, self._ids), default=1)

    def __call__(self, text: bytes | str) -> list[int]:
        """Greedy longest-match tokens spelling exactly `text` (llguidance tokenizes the text a grammar forces
        with this). Not `Tokenizer.encode`: a Metaspace pre-tokenizer would prepend a space to the forced `{`."""
        data = text.encode() if isinstance(text, str) else text
        out, at = [], 0
        while at < len(data):
            for size in range(min(self._longest, len(data) - at), 0, -1):
                if data[at:at + size] in self._ids:
                    out.append(self._ids[data[at:at + size]])
                    at += size
                    break
            else:
                at += 1  # a byte no token spells: llguidance then refuses the forced text, an explicit error
        return out


def json_grammar(schema: Mapping[str, Any]) -> str:
    """llguidance's grammar for JSON validating against `schema` (compact: no free whitespace); SchemaError
    when the schema is invalid or llguidance cannot compile it."""
    llguidance = require_llguidance()
    check_schema(schema)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(schema), overrides={"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"})
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise SchemaError(f"schema at /: llguidance cannot compile it: {problem}")
    return grammar


def regex_grammar(pattern: str) -> str:
    return require_llguidance().LLMatcher.grammar_from_regex(pattern)


class Matcher:
    """One sequence's place in a grammar: which tokens may come next, which ones it forces, whether it ended.
    Used by `guided_generate` and by the serving engine's AR runner (a request's `grammar`)."""

    def __init__(self, llg_tok: Any, grammar: str) -> None:
        self._matcher = require_llguidance().LLMatcher(llg_tok, grammar, log_level=0)
        if self._matcher.is_error():
            raise GuidedDecodingError(f"llguidance refused the grammar: {self._matcher.get_error()}")

    def allowed(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """[V] bool: the tokens the grammar allows next."""
        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = np.zeros(vocab_size, dtype=bool)  # ids past the tokenizer's own (network padding): never
        allowed[:min(len(bits), vocab_size)] = bits[:vocab_size]
        return torch.from_numpy(allowed).to(device)

    def consume(self, tokens: list[int]) -> None:
        if not self._matcher.consume_tokens(tokens):
            raise GuidedDecodingError(f"llguidance rejected tokens {tokens}: {self._matcher.get_error()}")

    def forced(self) -> list[int]:
        """The tokens the grammar forces from here (the `", "key": ` between two values), not yet consumed."""
        return list(self._matcher.compute_ff_tokens())

    @property
    def stopped(self) -> bool:
        return bool(self._matcher.is_stopped())

    @property
    def complete(self) -> bool:
        """The text so far is a whole sentence of the grammar (it may or may not go on)."""
        return bool(self._matcher.is_stopped() or self._matcher.is_accepting())


@torch.inference_mode()
def guided_generate(network: Any, llg_tok: Any, prompt_ids: list[int], grammar: str, max_new_tokens: int,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    generator: torch.Generator | None = None, presence_penalty: float = 0.0,
                    frequency_penalty: float = 0.0, no_repeat_ngram_size: int = 0) -> GuidedResult:
    """Decode after `prompt_ids` with every token restricted to `grammar` (from `json_grammar` or
    `regex_grammar`), up to `max_new_tokens` tokens."""
    matcher = Matcher(llg_tok, grammar)
    device, vocab = network.embed_tokens.weight.device, network.vocab_size
    cache = network.new_cache(1, device)
    prompt = torch.tensor([prompt_ids], device=device)
    logits = prefill(network, prompt, cache, torch.ones_like(prompt, dtype=torch.bool))
    out: list[int] = []
    passes, forced = 1, 0
    eos = set(llg_tok.eos_tokens)
    counts = torch.zeros(1, vocab, device=device) if presence_penalty or frequency_penalty else None
    written = prompt.new_zeros(1, 0) if no_repeat_ngram_size else None
    while len(out) < max_new_tokens and not matcher.stopped:
        token = int(sample_next(logits, temperature, top_k, top_p, generator, matcher.allowed(vocab, device), counts,
                                presence_penalty, frequency_penalty, written, no_repeat_ngram_size))
        matcher.consume([token])
        if token in eos:
            break
        step = [token] + matcher.forced()
        if len(step) > 1:
            matcher.consume(step[1:])
        forced += len(step) - 1
        out.extend(step)
        count_tokens(counts, torch.tensor([step], device=device))
        written = append_written(written, torch.tensor([step], device=device))
        if len(out) >= max_new_tokens or matcher.stopped:
            break
        logits = advance(network, cache, torch.tensor([step], device=device))
        passes += 1
    return GuidedResult(out[:max_new_tokens], passes, forced, matcher.complete)


def guided_json(lm: Any, prompt: list[int], schema: Mapping[str, Any], max_new_tokens: int, *,
                seed: int | None = None, temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                no_repeat_ngram_size: int = 0) -> StructuredResult:
    """An autoregressive answer to `prompt` that validates against `schema`, or StructuredOutputError when it
    did not finish within `max_new_tokens`."""
    grammar = json_grammar(schema)
    generator = torch.Generator(lm.device).manual_seed(seed) if seed is not None else None
    out = guided_generate(lm.network, llg_tokenizer(lm.require_tokenizer(), lm.network.vocab_size), prompt, grammar,
                          max_new_tokens, temperature, top_k, top_p, generator, presence_penalty, frequency_penalty,
                          no_repeat_ngram_size)
    text = lm.require_tokenizer().decode(out.token_ids)
    if not out.finished:
        shown = text if len(text) <= 200 else text[:200] + "..."
        raise StructuredOutputError(f"the answer did not finish within max_new_tokens={max_new_tokens}: {shown!r}")
    value = json.loads(text)
    problems = violations(schema, value)  # llguidance's grammar should make this empty; never return it unchecked
    if problems:
        raise StructuredOutputError("the answer breaks the schema: " + "; ".join(problems))
    return StructuredResult(value, json.dumps(value, ensure_ascii=False), out.forward_passes, 1, len(out.token_ids))
