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


def test_a_grammar_request_shares_the_serving_batch_and_writes_what_guided_generate_writes(ar):
    """The serving engine's AR runner samples under the matcher's mask: greedy, the tokens equal guided_generate's
    (forced tokens are the only ones allowed), while plain requests share the same passes."""
    import queue

    from canvaslm.engine.core import Engine
    from canvaslm.engine.guided import json_grammar
    from canvaslm.engine.output import Finished, Tokens
    from canvaslm.engine.request import Request

    grammar = json_grammar(BOUNDED)
    prompts = [[1, 2, 3], [1, 5]]
    expected = [guided_generate(ar.network, llg_tokenizer(ar.tokenizer, ar.network.vocab_size), p, grammar, 200)
                for p in prompts]
    batches = []
    engine = Engine(ar, on_step=lambda batch, _: batches.append(batch)).start()
    try:
        inboxes = [queue.Queue() for _ in range(4)]
        requests = [Request(prompts[0], 200, inboxes[0].put, sampling={"temperature": 0.0}, grammar=grammar),
                    Request([1, 7, 8], 40, inboxes[1].put, sampling={"temperature": 1.0}, seed=3),
                    Request(prompts[1], 200, inboxes[2].put, sampling={"temperature": 0.0}, grammar=grammar),
                    Request([1, 9], 40, inboxes[3].put, sampling={"temperature": 1.0}, seed=4)]
        for request in requests:
            engine.submit(request)
        results = []
        for inbox in inboxes:
            events = [inbox.get(timeout=120)]
            while not isinstance(events[-1], Finished):
                events.append(inbox.get(timeout=120))
            results.append(([t for e in events if isinstance(e, Tokens) for t in e.ids], events[-1]))
    finally:
        engine.stop()
    for (tokens, finished), want in zip([results[0], results[2]], expected, strict=True):
        assert want.finished and tokens == want.token_ids and finished.reason == "stop"
        jsonschema.validate(json.loads(ar.tokenizer.decode(tokens)), BOUNDED)
        assert finished.forward_passes > want.forward_passes  # forced tokens: one pass each in the batch
    assert max(batches) >= 3  # grammar and plain requests in one pass


def test_a_grammar_on_a_diffusion_model_is_refused(tmp_path):
    from canvaslm.engine.core import Engine
    from canvaslm.engine.request import Request
    from tests.reference import tiny_checkpoint

    tiny_checkpoint(tmp_path, canvas_length=4)
    with pytest.raises(UnsupportedError, match="canvas constraint"):
        Engine(canvaslm.load(tmp_path, device="cpu")).submit(Request([1, 2], 8, print, grammar="start: \"a\""))


def test_a_sentencepiece_style_tokenizer_is_read_token_by_token(tmp_path):
    """llguidance cannot parse a Metaspace decoder from tokenizer.json: the tokens go over as bytes instead ("▁" a
    space, special tokens marked), and the diffusion model's causal pass answers a schema under the grammar."""
    from canvaslm.engine.guided import _MetaspaceTokens
    from tests.reference import tiny_checkpoint

    tiny_checkpoint(tmp_path, canvas_length=4)
    lm = canvaslm.load(tmp_path, device="cpu", dtype=torch.float32)
    tokens = _MetaspaceTokens(lm.tokenizer)
    word = next(i for i in range(lm.tokenizer.vocab_size) if lm.tokenizer.backend.id_to_token(i).startswith("\u2581")
                and len(lm.tokenizer.backend.id_to_token(i)) > 2)
    assert tokens.tokens[word] == b" " + lm.tokenizer.backend.id_to_token(word)[1:].encode()
    assert lm.tokenizer.eos_token_ids[0] in tokens.special_token_ids
    assert tokens.tokens[lm.tokenizer.eos_token_ids[0]].startswith(b"\xff")
    # the grammar forces "the " and " dog" (tokens spelled from their bytes) and samples " quick" or " lazy"
    out = guided_generate(lm.network, llg_tokenizer(lm.tokenizer, lm.network.vocab_size), lm.tokenizer.encode("x"),
                          regex_grammar("the (quick|lazy) dog"), 24)
    assert out.finished and out.forced > 0
    assert lm.tokenizer.decode(out.token_ids) in {"the quick dog", "the lazy dog"}


def test_a_tokenizer_llguidance_cannot_read_is_an_unsupported_error(monkeypatch):
    import llguidance

    def refuse(spec, **kwargs):
        raise ValueError("can't determine decoder type")

    monkeypatch.setattr(llguidance, "LLTokenizer", refuse)
    from tests.reference import tiny_tokenizer

    fresh = tiny_tokenizer(256)
    fresh.backend.decoder = __import__("tokenizers").decoders.ByteLevel()
    with pytest.raises(UnsupportedError, match="llguidance cannot read this tokenizer"):
        llg_tokenizer(fresh, 256)
