"""JSON-schema output: the scaffold (skeleton fixed, one slot per value), refused schemas, and whole answers from a
tiny random diffusion model with SmolLM2's real tokenizer — a random model writes nonsense values, so every answer
validating shows that validity comes from the engine, not from the model."""

from __future__ import annotations

import json

import jsonschema
import pytest

import canvaslm
from canvaslm.engine.structured import Budget, SchemaError, StructuredOutputError, scaffold
from canvaslm.errors import UnsupportedError
from canvaslm.models import llama
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
    """A bound the grammar cannot express (a large range) is checked by jsonschema; a failing value is re-noised
    and denoised again. With one round and an unsatisfiable bound the answer is an explicit error."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10**9}}}
    with pytest.raises(StructuredOutputError, match=r"/n: .*less than the minimum"):
        canvaslm.engine.structured.generate_json(lm, [1, 2, 3], schema, seed=0, rounds=2,
                                                 budget=Budget(number_tokens=2))
    small = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 7}}}
    assert 3 <= json.loads(lm.complete("n:", json_schema=small, seed=0).text)["n"] <= 7  # an enum of 3..7


def test_an_autoregressive_model_refuses_a_schema(smol_tokenizer):
    network = llama.Model(llama.Config.from_hf({"model_type": "llama", "vocab_size": 49152, "hidden_size": 16,
                                                "intermediate_size": 32, "num_hidden_layers": 1,
                                                "num_attention_heads": 2, "num_key_value_heads": 1}, "test"))
    with pytest.raises(UnsupportedError, match="json_schema needs a diffusion model"):
        canvaslm.LM(network, smol_tokenizer, "ar").complete("x", json_schema=PERSON)
