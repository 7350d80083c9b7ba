"""JSON-schema output on a canvas: the skeleton is fixed, the values are denoised under their grammar.

    schema ─ scaffold() ─> fixed tokens ({ "key": , [ ] and the quotes, pinned in the canvas) + one slot per value
    denoise   the slots see the skeleton on both sides; tokens a slot's grammar can never use are refused
    project   each slot takes its most probable grammatical filling (canvaslm.diffusion.grammar)
    validate  jsonschema; slots that break a bound are re-noised and denoised again, at most `rounds` times

The answer is valid JSON that validates against the schema, or a `StructuredOutputError` saying which value did
not. Supported: objects (every listed property is written, in order), nested objects, arrays of one item schema
(`min_items`..`max_items` long: `array_items` items, clamped), strings (`minLength`/`maxLength`), integers and
numbers (`minimum`, `maximum`, exclusive bounds, enforced by the grammar: a range of at most 64 integers becomes an
enum, a wider one a digit automaton, and a bounded number is I or I.ddd with [I, I + 1) inside), booleans,
`enum`, `const`, `null`. Anything else is refused up front with its JSON pointer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from canvaslm.diffusion.generate import CanvasCommitted
from canvaslm.diffusion.grammar import (INTEGER, NUMBER, STRING, Automaton, TokenGrammar, bounded_string, literals,
                                        number_range, token_texts)
from canvaslm.diffusion.step import Constraint, canvas_size
from canvaslm.errors import CanvasError

IGNORED = {"title", "description", "$schema", "$id", "default", "examples", "additionalProperties", "required",
           "strict", "$comment"}
KEYWORDS = {"type", "properties", "items", "minItems", "maxItems", "enum", "const", "minimum", "maximum",
            "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength"} | IGNORED
SMALL_RANGE = 64   # an integer range this small becomes an enum: the grammar then enforces the bounds
COUNTED = 64       # strings with a maxLength up to this are counted in the grammar; longer ones are checked after
MAX_ITEMS = 256    # most items an array's minItems may ask for
ROUNDS = 3         # denoising rounds before a schema answer is given up


class SchemaError(CanvasError):
    """A schema canvaslm cannot write (an unsupported keyword or type), named by its JSON pointer."""


class StructuredOutputError(CanvasError):
    """No valid answer within the re-noising budget; says which value broke which rule."""


Texts = Sequence[str | None]


@dataclass(frozen=True)
class Slot:
    path: str                                  # JSON pointer of the value, e.g. "/items/0/name"
    key: str                                   # names the grammar (for the per-tokenizer cache)
    build: Callable[[Texts], TokenGrammar]     # the grammar from the tokenizer's token texts
    start: int                                 # first position in the generated region
    length: int


@dataclass
class Scaffold:
    fixed: list[int] = field(default_factory=list)   # a token per position, -1 inside slots
    slots: list[Slot] = field(default_factory=list)


@dataclass(frozen=True)
class Budget:
    string_tokens: int = 12
    number_tokens: int = 6
    array_items: int = 3


def scaffold(schema: Mapping[str, Any], encode: Callable[[str], list[int]], budget: Budget = Budget()) -> Scaffold:
    """The canvas layout of an answer to `schema`: fixed skeleton tokens and a slot per value."""
    check_schema(schema)
    out = Scaffold()
    _write(schema, "", out, encode, budget)
    return out


def check_schema(schema: Any) -> None:
    """SchemaError, with the JSON pointer, unless `schema` is a valid JSON schema (draft 2020-12)."""
    import jsonschema

    if not isinstance(schema, Mapping):
        raise SchemaError(f"schema at /: expected an object, found {schema!r}")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as error:
        where = "/" + "/".join(str(p) for p in error.absolute_path)
        raise SchemaError(f"schema at {where}: not a valid JSON schema: {error.message}") from None


def _write(schema: Any, path: str, out: Scaffold, encode: Callable[[str], list[int]], budget: Budget) -> None:
    where = path or "/"
    if not isinstance(schema, Mapping):
        raise SchemaError(f"schema at {where}: expected an object, found {schema!r}")
    unknown = sorted(set(schema) - KEYWORDS)
    if unknown:
        raise SchemaError(f"schema at {where}: unsupported keyword(s) {unknown}; supported: {sorted(KEYWORDS)}")

    def fixed(text: str) -> None:
        out.fixed += encode(text)

    def slot(key: str, build: Callable[[Texts], TokenGrammar], length: int) -> None:
        out.slots.append(Slot(path, key, build, len(out.fixed), length))
        out.fixed += [-1] * length

    def automaton(key: str, grammar: Automaton, length: int) -> None:
        slot(key, lambda texts: TokenGrammar.lift(grammar, texts), length)

    kind = schema.get("type")
    if "const" in schema:
        fixed(json.dumps(schema["const"], ensure_ascii=False))
    elif "enum" in schema:
        options = schema["enum"]
        if not isinstance(options, list) or not options:
            raise SchemaError(f"schema at {where}: enum must be a non-empty list, found {options!r}")
        texts = [json.dumps(v, ensure_ascii=False) for v in options]
        automaton("enum:" + json.dumps(texts), literals(texts), max(len(encode(t)) for t in texts) + 1)
    elif kind == "object":
        properties = schema.get("properties", {})
        if not isinstance(properties, Mapping):
            raise SchemaError(f"schema at {where}: properties must be an object, found {properties!r}")
        fixed("{")
        for i, (name, sub) in enumerate(properties.items()):
            fixed((", " if i else "") + json.dumps(name, ensure_ascii=False) + ": ")
            _write(sub, f"{path}/{name}", out, encode, budget)
        fixed("}")
    elif kind == "array":
        if "items" not in schema:
            raise SchemaError(f"schema at {where}: an array needs an 'items' schema")
        low = schema.get("minItems", 0)
        high = schema.get("maxItems", max(budget.array_items, low))
        if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high):
            raise SchemaError(f"schema at {where}: minItems/maxItems must be integers with 0 <= min <= max")
        if low > MAX_ITEMS:
            raise SchemaError(f"schema at {where}: minItems {low} is above the supported {MAX_ITEMS}")
        fixed("[")
        for i in range(min(max(budget.array_items, low), high)):
            if i:
                fixed(", ")
            _write(schema["items"], f"{path}/{i}", out, encode, budget)
        fixed("]")
    elif kind == "string":
        fixed('"')
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        if not isinstance(low, int) or not (high is None or isinstance(high, int) and low <= high):
            raise SchemaError(f"schema at {where}: minLength/maxLength must be integers with min <= max")
        if low > COUNTED:
            raise SchemaError(f"schema at {where}: minLength {low} is above the supported {COUNTED}")
        length = min(budget.string_tokens, high if high is not None else budget.string_tokens) + 1
        if high is not None and high <= COUNTED or low:
            top = high if high is not None and high <= COUNTED else max(COUNTED, low)
            slot(f"string:{low}:{top}", lambda texts: bounded_string(texts, low, top), max(length, low + 1))
        else:
            automaton("string", STRING, length)
    elif kind == "integer" and (values := _small_range(schema)) is not None:
        texts = [str(v) for v in values]
        automaton("enum:" + json.dumps(texts), literals(texts), max(len(encode(t)) for t in texts) + 1)
    elif kind in ("integer", "number"):
        low, high = _integer_bounds(schema)
        empty = low is not None and high is not None and low > high
        if empty and kind == "integer":
            raise SchemaError(f"schema at {where}: no integer lies between its minimum and maximum")
        if (low, high) == (None, None) or empty:  # a number range with no integer in it, e.g. [0.2, 0.8]: checked after
            automaton(kind, INTEGER if kind == "integer" else NUMBER, budget.number_tokens)
        else:
            automaton(f"{kind}:{low}:{high}", number_range(low, high, fraction=kind == "number"), budget.number_tokens)
    elif kind == "boolean":
        automaton("boolean", literals(["true", "false"]), max(len(encode("false")), len(encode("true"))) + 1)
    elif kind == "null":
        fixed("null")
    else:
        raise SchemaError(f"schema at {where}: unsupported or missing type {kind!r}; supported: object, array, "
                          "string, integer, number, boolean, null (or enum / const)")


def _integer_bounds(schema: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """The smallest and largest integers the bounds allow (None: unbounded); for numbers, the integer parts
    written (a number is written as an integer I or I.ddd with [I, I + 1) inside the bounds)."""
    lows = [math.ceil(schema["minimum"])] if "minimum" in schema else []
    highs = [math.floor(schema["maximum"])] if "maximum" in schema else []
    if "exclusiveMinimum" in schema:
        lows.append(math.floor(schema["exclusiveMinimum"]) + 1)
    if "exclusiveMaximum" in schema:
        highs.append(math.ceil(schema["exclusiveMaximum"]) - 1)
    return max(lows, default=None), min(highs, default=None)


def _small_range(schema: Mapping[str, Any]) -> range | None:
    low, high = _integer_bounds(schema)
    if low is not None and high is not None and 0 <= high - low < SMALL_RANGE:
        return range(low, high + 1)
    return None


class SlotGrammars:
    """Token grammars of one tokenizer, built once per slot kind (lifting a grammar reads the whole vocabulary)."""

    def __init__(self, decode: Callable[[list[int]], str], known: int, anchor: int, vocab_size: int) -> None:
        # ids past the tokenizer's (a model vocabulary padded for speed) are never written
        self.texts = token_texts(decode, known, anchor) + [None] * (vocab_size - known)
        self._cache: dict[str, TokenGrammar] = {}

    def __call__(self, slot: Slot) -> TokenGrammar:
        if slot.key not in self._cache:
            self._cache[slot.key] = slot.build(self.texts)
        return self._cache[slot.key]


def allowed_mask(layout: Scaffold, grammars: SlotGrammars, vocab_size: int) -> Tensor:
    """[n, V] bool over the generated region: inside each slot, its grammar's tokens; elsewhere everything (the
    skeleton is pinned anyway)."""
    allowed = torch.ones(len(layout.fixed), vocab_size, dtype=torch.bool)
    for slot in layout.slots:
        grammar = grammars(slot)
        if not grammar.fits(slot.length):
            raise SchemaError(f"schema at {slot.path or '/'}: the tokenizer cannot write such a value in "
                              f"{slot.length} tokens (it may lack a whitespace token for the filler)")
        allowed[slot.start:slot.start + slot.length, :grammar.table.shape[1]] = grammar.allowed_tokens(slot.length)
    return allowed


def fill(layout: Scaffold, grammars: SlotGrammars, log_probs: Tensor) -> list[int]:
    """The generated region's tokens: the skeleton, and each slot's most probable grammatical filling under
    log_probs [n, V]."""
    tokens = list(layout.fixed)
    for slot in layout.slots:
        span = log_probs[slot.start:slot.start + slot.length]
        best = grammars(slot).project(span)
        if best is None:
            raise StructuredOutputError(f"value at {slot.path or '/'}: no grammatical filling")
        tokens[slot.start:slot.start + slot.length] = best
    return tokens


def violations(schema: Mapping[str, Any], value: Any) -> list[str]:
    """JSON pointers of the values in `value` that break `schema`, with the rule, via jsonschema."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    return ["/" + "/".join(str(p) for p in error.absolute_path) + ": " + error.message
            for error in validator.iter_errors(value)]


def failing_slots(layout: Scaffold, problems: Sequence[str]) -> list[Slot]:
    """The slots whose value (or a value inside it) a problem names."""
    paths = [p.split(": ", 1)[0].rstrip("/") for p in problems]
    return [s for s in layout.slots if any(s.path == p or s.path.startswith(p + "/") for p in paths)]


@dataclass
class StructuredResult:
    value: Any                # the parsed answer
    text: str                 # its compact JSON
    forward_passes: int       # decoder passes over all rounds
    rounds: int               # denoising rounds used (1 unless a value had to be re-noised)
    tokens: int               # tokens in the canvas region the schema occupies


class JsonPlan:
    """One schema answer in rounds: the scaffold, the slots' grammars and masks, and what is pinned so far.

    A round denoises the region under `constraint()` (by `LM.generate_steps` in `generate_json`, or as a request
    of the serving engine's batch), and `judge` turns its canvases' last logits into an answer or into the pins of
    the next round (the values that broke the schema are freed, the others kept)."""

    def __init__(self, lm: Any, prompt: list[int], schema: Mapping[str, Any], budget: Budget = Budget(),
                 sampling: Mapping[str, Any] | None = None) -> None:
        self.schema, self.tokenizer = schema, lm.require_tokenizer()
        self.layout = scaffold(schema, lambda text: self.tokenizer.encode(text, add_special_tokens=False), budget)
        lm.check_length(len(prompt), len(self.layout.fixed))
        self.grammars = lm.slot_grammars()
        # the canvases the rounds decode in (`sampling`'s canvas_size): the answer is read canvas by canvas
        self.canvas = canvas_size(lm.network, lm.diffusion_settings(dict(sampling or {})))
        self.vocab, self.device = lm.network.vocab_size, lm.device
        self.size = len(self.layout.fixed)               # tokens of the region the schema occupies
        allowed = allowed_mask(self.layout, self.grammars, self.vocab).to(self.device)
        self.allowed = torch.cat([allowed, allowed.new_ones(-self.size % self.canvas, self.vocab)])  # whole canvases
        self.fixed = list(self.layout.fixed)
        self.problems: list[str] = []
        self.value: Any = None

    def constraint(self) -> Constraint:
        return Constraint(torch.tensor([self.fixed], device=self.device), self.allowed[None], keep_logits=True)

    def judge(self, last: Mapping[int, Tensor]) -> bool:
        """Read a round's answer from each canvas's last-step logits [C, V] (by canvas index): True when it
        validates (it is then `value`), False when a value broke the schema (`problems` says which; those values
        are free in the next round)."""
        # a canvas with nothing free was committed without a decoder pass: its positions are all pinned
        count = -(-self.size // self.canvas)
        spans = [last.get(i, self.allowed.new_zeros(self.canvas, self.vocab, dtype=torch.float)) for i in range(count)]
        log_probs = torch.cat(spans)[:self.size].float().log_softmax(dim=-1)
        # values pinned from an earlier round stay as they were; the others take their best grammatical filling
        filled = fill(self.layout, self.grammars, log_probs)
        tokens = [f if f >= 0 else t for f, t in zip(self.fixed, filled, strict=True)]
        text = self.tokenizer.decode(tokens)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise StructuredOutputError(f"the scaffold decoded to invalid JSON ({error}): {text!r}") from None
        self.problems = violations(self.schema, value)
        if not self.problems:
            self.value = value
            return True
        self.fixed = list(tokens)
        for slot in failing_slots(self.layout, self.problems):
            self.fixed[slot.start:slot.start + slot.length] = [-1] * slot.length
        return False

    def failed(self, rounds: int) -> StructuredOutputError:
        return StructuredOutputError(f"no answer satisfied the schema in {rounds} rounds: " + "; ".join(self.problems))

    def result(self, passes: int, rounds: int) -> StructuredResult:
        return StructuredResult(self.value, json.dumps(self.value, ensure_ascii=False), passes, rounds, self.size)


def generate_json(lm: Any, prompt: list[int], schema: Mapping[str, Any], *, seed: int | None = None,
                  rounds: int = ROUNDS, budget: Budget = Budget(), **sampling: Any) -> StructuredResult:
    """Answer `prompt` with JSON that validates against `schema` (see the module docstring), or raise
    `StructuredOutputError` after `rounds` denoising rounds."""
    plan = JsonPlan(lm, prompt, schema, budget, sampling)
    seed = seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
    passes = 0
    for attempt in range(rounds):
        last: dict[int, Tensor] = {}  # per canvas, the last step's logits: the slots are projected from them
        for event in lm.generate_steps([prompt], plan.size, seed + attempt, constraint=plan.constraint(), **sampling):
            if isinstance(event, CanvasCommitted) and event.logits is not None:
                last[event.canvas] = event.logits[0]
            result = event
        passes += int(result.forward_passes[0])
        if plan.judge(last):
            return plan.result(passes, attempt + 1)
    raise plan.failed(rounds)
