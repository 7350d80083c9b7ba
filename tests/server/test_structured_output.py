"""response_format through the real `openai` client, on a served tiny random diffusion model with SmolLM2's
tokenizer: json_schema answers validate (whole or streamed), bad schemas are 400s naming the sub-schema, and a
json_object the model cannot write is an explicit 422, never invalid JSON."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.reference import tiny_smol_diffusion
from tests.server.conftest import MODEL, start_server, stop_server

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "population": {"type": "integer", "minimum": 0},
                                           "capital": {"type": "boolean"}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("json-model")
    tiny_smol_diffusion(16, layers=1, max_positions=512).save(path)
    server = start_server(path)
    yield path, server
    stop_server(server)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1].base_url, api_key="unused", max_retries=0, timeout=300)


def ask(client, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A city?"}], **kw)


def test_json_schema_answers_validate_whole_and_streamed(client):
    r = ask(client, response_format=FORMAT, seed=0, n=2)
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        assert choice.finish_reason == "stop"
    assert r.usage.completion_tokens > 0
    chunks = list(ask(client, response_format=FORMAT, seed=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == r.choices[0].message.content  # same seed, same answer


def _passes_with_company(metrics: str) -> float:
    """Decoder passes that held more than one sequence, from the forward batch-size histogram."""
    def bucket(le: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("canvaslm:forward_batch_size_bucket") and f'le="{le}"' in line)
    return bucket("+Inf") - bucket("1.0")


def test_a_json_schema_answer_joins_the_batch_and_equals_generate_json(served, client):
    """json_schema requests run inside the continuous batch: the answer is LM.generate_json's for the same seed,
    and it shares decoder passes with a plain request sent at the same time."""
    import threading

    import httpx

    import canvaslm

    path, server = served
    lm = canvaslm.load(path, device="cpu")
    expected = lm.generate_json(lm.chat_prompt_ids([{"role": "user", "content": "A city?"}]), SCHEMA, seed=7)
    before = _passes_with_company(httpx.get(server.url + "/metrics").text)
    plain = threading.Thread(target=ask, args=(client,), kwargs={"max_tokens": 160, "seed": 1, "extra_body": {
        "ignore_eos": True, "max_denoising_steps": 24, "stability_threshold": 64}})
    plain.start()
    r = ask(client, response_format=FORMAT, seed=7)
    plain.join()
    assert r.choices[0].message.content == expected.text
    assert _passes_with_company(httpx.get(server.url + "/metrics").text) > before


def test_a_json_schema_answer_in_smaller_canvases_is_generate_jsons_and_a_canvas_too_large_is_a_400(served, client):
    """`canvas_size` reaches the schema's rounds: the served answer is LM.generate_json's in the same canvases, read
    back canvas by canvas; a canvas larger than the trained one is refused before any work, naming the limit."""
    import canvaslm

    lm = canvaslm.load(served[0], device="cpu")
    prompt = lm.chat_prompt_ids([{"role": "user", "content": "A city?"}])
    expected = lm.generate_json(prompt, SCHEMA, seed=3, canvas_size=4)
    r = ask(client, response_format=FORMAT, seed=3, extra_body={"canvas_size": 4})
    assert r.choices[0].message.content == expected.text
    jsonschema.validate(json.loads(expected.text), SCHEMA)
    with pytest.raises(openai.BadRequestError, match="at most this model's trained canvas of 16"):
        ask(client, response_format=FORMAT, seed=3, extra_body={"canvas_size": 32})
    with pytest.raises(openai.BadRequestError, match="at most this model's trained canvas of 16"):
        ask(client, max_tokens=8, extra_body={"canvas_size": 17})


def test_bad_schema_is_a_400_naming_the_sub_schema(client):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "^x"}}}}}
    with pytest.raises(openai.BadRequestError, match="at /a: unsupported keyword"):
        ask(client, response_format=bad)
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        ask(client, response_format={"type": "json_schema"})


def test_json_object_the_model_cannot_write_is_an_explicit_error(client):
    with pytest.raises(openai.UnprocessableEntityError, match="no JSON object in 3 tries"):
        ask(client, response_format={"type": "json_object"}, max_tokens=8, seed=0)


BOUNDED = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "population": {"type": "integer", "minimum": 0, "maximum": 10**7},
                                            "capital": {"type": "boolean"}},
           "required": ["city", "population", "capital"], "additionalProperties": False}


def test_an_autoregressive_model_answers_json_schema_through_llguidance(tmp_path):
    import torch

    import canvaslm
    from canvaslm.models import llama

    torch.manual_seed(0)
    network = llama.Model(llama.Config.from_hf({"model_type": "llama", "vocab_size": 49152, "hidden_size": 16,
                                                "intermediate_size": 32, "num_hidden_layers": 1,
                                                "num_attention_heads": 2, "num_key_value_heads": 1,
                                                "max_position_embeddings": 512}, "test"))
    canvaslm.LM(network.eval(), canvaslm.load("smol-ar").tokenizer, "tiny-ar").save(tmp_path)
    server = start_server(tmp_path)
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)
        fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": BOUNDED}}
        r = ask(client, response_format=fmt, seed=0, max_tokens=200, temperature=1.0)
        jsonschema.validate(json.loads(r.choices[0].message.content), BOUNDED)
        # json_object goes through llguidance too (any object): this random model's key never ends, so it is the
        # grammar decoder's explicit error, not the 3 unconstrained tries
        with pytest.raises(openai.UnprocessableEntityError, match="did not finish within max_new_tokens=20"):
            ask(client, response_format={"type": "json_object"}, seed=1, max_tokens=20)
        with pytest.raises(openai.UnprocessableEntityError) as failed:  # 3 tokens cannot hold the object
            ask(client, response_format=fmt, seed=0, max_tokens=3)
        assert failed.value.code == "structured_output_failed" and "did not finish" in failed.value.message
    finally:
        stop_server(server)
