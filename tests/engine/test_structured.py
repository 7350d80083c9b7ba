"""JSON-schema output: the scaffold (skeleton fixed, one slot per value), refused schemas, and whole answers from a
tiny random diffusion model with SmolLM2's real tokenizer — a random model writes nonsense values, so every answer
validating shows that validity comes from the engine, not from the model."""

from __future__ import annotations

import json

import jsonschema
import pytest

import canvaslm
from canvaslm.engine.structured import Budget, SchemaError, StructuredOutputError, scaffold
from tests.reference import tiny_smol_diffusion

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "height": {"type": "number"},
    "role": {"enum": ["admin", "user", 3, None]},
    "active": {"type": "boolean"},
    "kind": {"const": "person"},
    "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2},
    "address": {"type": "object", "properties": {"zip": {"type": "integer"}, "none": {"type": "null"}}},
}, "required": ["name"]}


@pytest.fixture(scope="module")
def smol_tokenizer():
    return canvaslm.load("smol-ar").tokenizer


@pytest.fixture(scope="module")
def lm():
    return tiny_smol_diffusion(32)


def test_scaffold_fixes_the_skeleton_and_leaves_a_slot_per_value(smol_tokenizer):
    encode = lambda text: smol_tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    layout = scaffold(PERSON, encode, Budget(string_tokens=4, number_tokens=3, array_items=3))
    paths = [s.path for s in layout.slots]
    # age spans 121 integers (> 64): a number grammar; the array is clamped to maxItems = 2
    assert paths == ["/name", "/age", "/height", "/role", "/active", "/tags/0", "/tags/1", "/address/zip"]
    skeleton = "".join("#" if t < 0 else smol_tokenizer.decode([t]) for t in layout.fixed)
    assert skeleton.startswith('{"name": "#####, "age": ###, "height": ###, "role": ')
    assert skeleton.endswith('"kind": "person", "tags": ["#####, "#####], "address": {"zip": ###, "none": null}}')


@pytest.mark.parametrize("schema, message", [
    ({"type": "string", "pattern": "^a"}, r"at /: unsupported keyword\(s\) \['pattern'\]"),
    ({"type": "object", "properties": {"x": {"anyOf": [{"type": "string"}]}}}, r"at /x: unsupported keyword\(s\) \['anyOf'\]"),
    ({"type": ["string", "null"]}, "unsupported or missing type"),
    ({"type": "array"}, "needs an 'items' schema"),
    ({"type": "array", "items": {"type": "null"}, "minItems": 3, "maxItems": 1}, "0 <= min <= max"),
    ({"enum": []}, "non-empty list"),
    ({"type": "array", "items": {"type": "null"}, "minItems": 10**9}, "above the supported 256"),
    ({"type": "string", "minLength": 10**9}, "above the supported 64"),
    ({"type": "integer", "minimum": "zero"}, "at /minimum: not a valid JSON schema"),
])
def test_unsupported_schemas_are_refused_with_their_path(smol_tokenizer, schema, message):
    with pytest.raises(SchemaError, match=message):
        scaffold(schema, lambda text: smol_tokenizer.encode(text), Budget())


def test_answers_always_validate(lm):
    for seed in range(3):
        result = lm.complete("Describe a person as JSON:", json_schema=PERSON, seed=seed)
        value = json.loads(result.text)
        jsonschema.validate(value, PERSON)
        assert value["kind"] == "person" and len(value["tags"]) == 2 and value["address"]["none"] is None
        assert result.finish_reason == "stop" and result.forward_passes >= 1 and result.tokens_per_forward > 0


def test_bounds_are_met_by_re_noising_or_refused_explicitly(lm):
    """A bound the grammar cannot express (no integer inside a number range) is checked by jsonschema; a failing
    value is re-noised and denoised again, and an unsatisfiable one ends in an explicit error. A value that cannot
    fit its slot is refused before any denoising."""
    never = {"type": "object", "properties": {"x": {"type": "number", "exclusiveMinimum": 0.5, "exclusiveMaximum": 0.5}}}
    with pytest.raises(StructuredOutputError, match=r"no answer satisfied the schema in 2 rounds: /x: "):
        canvaslm.engine.structured.generate_json(lm, [1, 2, 3], never, seed=0, rounds=2)
    huge = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10**9}}}
    with pytest.raises(SchemaError, match=r"/n: the tokenizer cannot write such a value in 2 tokens"):
        canvaslm.engine.structured.generate_json(lm, [1, 2, 3], huge, seed=0, budget=Budget(number_tokens=2))
    small = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 7}}}
    assert 3 <= json.loads(lm.complete("n:", json_schema=small, seed=0).text)["n"] <= 7  # an enum of 3..7


@pytest.mark.parametrize("seed", range(3))
def test_wide_ranges_are_enforced_by_the_grammar_in_one_round(lm, seed):
    schema = {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "year": {"type": "integer", "minimum": 1900, "exclusiveMaximum": 2031},
        "delta": {"type": "integer", "minimum": -500, "maximum": -100},
        "price": {"type": "number", "minimum": 0.5, "maximum": 1000}}}
    answer = canvaslm.engine.structured.generate_json(lm, [1, 2, 3], schema, seed=seed, rounds=1)
    value = answer.value
    assert 18 <= value["age"] <= 99 and 1900 <= value["year"] <= 2030 and -500 <= value["delta"] <= -100
    assert 0.5 <= value["price"] <= 1000 and answer.rounds == 1
