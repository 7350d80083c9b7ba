"""Grammar-constrained autoregressive decoding (llguidance): AR models answer `json_schema` with JSON that
validates, or an explicit error; the forced tokens are fast-forwarded without extra passes."""

from __future__ import annotations

import json
import sys

import jsonschema
import pytest
import torch

import canvaslm
from canvaslm.engine.guided import guided_generate, llg_tokenizer, regex_grammar
from canvaslm.engine.structured import SchemaError, StructuredOutputError
from canvaslm.errors import UnsupportedError
from canvaslm.models import llama

BOUNDED = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 18, "maximum": 99},
    "role": {"enum": ["admin", "user"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 2}},
    "required": ["name", "age", "role", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def ar():
    torch.manual_seed(0)
    network = llama.Model(llama.Config.from_hf({"model_type": "llama", "vocab_size": 49152, "hidden_size": 16,
                                                "intermediate_size": 32, "num_hidden_layers": 1,
                                                "num_attention_heads": 2, "num_key_value_heads": 1}, "test"))
    return canvaslm.LM(network.eval(), canvaslm.load("smol-ar").tokenizer, "tiny-ar")


@pytest.mark.parametrize("seed", range(3))
def test_an_autoregressive_model_answers_a_schema_with_valid_json(ar, seed):
    result = ar.complete("A user:", json_schema=BOUNDED, max_new_tokens=200, seed=seed, temperature=1.0)
    jsonschema.validate(json.loads(result.text), BOUNDED)
    assert result.finish_reason == "stop" and result.forward_passes >= 1


def test_forced_tokens_cost_no_forward_pass(ar):
    """The keys and punctuation are forced by the grammar: more tokens than forward passes."""
    tokenizer = ar.tokenizer
    from canvaslm.engine.guided import json_grammar

    out = guided_generate(ar.network, llg_tokenizer(tokenizer, ar.network.vocab_size), [1, 2], json_grammar(BOUNDED),
                          200)
    assert out.finished and out.forced > 0 and len(out.token_ids) > out.forward_passes
    assert len(out.token_ids) == out.forward_passes - 1 + out.forced + 1  # prefill, then one pass per sample


def test_an_unfinished_answer_and_a_bad_schema_are_explicit_errors(ar):
    with pytest.raises(StructuredOutputError, match="did not finish within max_new_tokens=3"):
        ar.complete("A user:", json_schema=BOUNDED, max_new_tokens=3, seed=0)
    with pytest.raises(SchemaError, match="not a valid JSON schema"):
        ar.complete("x", json_schema={"type": "object", "properties": {"a": {"type": "nope"}}})


def test_a_regex_grammar_limits_the_answer_to_one_line(ar):
    out = guided_generate(ar.network, llg_tokenizer(ar.tokenizer, ar.network.vocab_size), [1, 2],
                          regex_grammar(r"[a-z]{1,6}\n"), 40)
    text = ar.tokenizer.decode(out.token_ids)
    assert out.finished and text.endswith("\n") and text[:-1].isalpha() and 1 <= len(text) - 1 <= 6


def test_without_llguidance_the_error_says_how_to_install_it(ar, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now raises ImportError
    with pytest.raises(UnsupportedError, match="pip install llguidance"):
        ar.complete("x", json_schema=BOUNDED)
