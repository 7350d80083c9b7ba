"""canvaslm's Tokenizer against transformers' tokenizer built from the same SmolLM2 GGUF."""

from __future__ import annotations

import json
import os

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers.models import WordLevel

from canvaslm.checkpoints.gguf import load_gguf_tokenizer
from canvaslm.checkpoints.tokenizer import Tokenizer
from canvaslm.errors import CheckpointError, GenerationError, UnsupportedError
from canvaslm.loading.registry import smollm2_gguf

TEXTS = {
    "prose": "The quick brown fox doesn't jump over the lazy dog; it's 12345 meters away, isn't it? I'll see.",
    "code": (
        "def fib(n: int) -> int:\n"
        "    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
        "    if n < 2:\n"
        "\treturn n  # tab-indented\n"
        "    return fib(n - 1) + fib(n - 2)\n\n\n"
        "class  Foo :  \n\t\tpass   \r\n"
    ),
    "chinese": "我们在北京的天安门广场上拍照。机器学习很有趣！",
    "russian": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "arabic": "مرحبا بالعالم! هذه جملة عربية للاختبار.",
    "emoji": "Good job 👍🏽! Family: 👨‍👩‍👧‍👦, flags 🇫🇷🇯🇵, mixed 😀text😀",
    "specials": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|endoftext|><file_sep>x",
    "whitespace": "  leading spaces\n\n\ttrailing  \n   ",
    "empty": "",
}

CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3? 答えて 🙂"},
]


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return str(smollm2_gguf())


@pytest.fixture(scope="module")
def ours(gguf_path: str) -> Tokenizer:
    tokenizer = load_gguf_tokenizer(gguf_path)
    assert tokenizer is not None
    return tokenizer


@pytest.fixture(scope="module")
def reference(gguf_path: str):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                                      gguf_file=os.path.basename(gguf_path))


@pytest.mark.parametrize("name", TEXTS)
def test_encode_matches_transformers(ours: Tokenizer, reference, name: str) -> None:
    text = TEXTS[name]
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False)
    assert ours.encode(text, add_special_tokens=True) == reference.encode(text, add_special_tokens=True)


@pytest.mark.parametrize("name", TEXTS)
def test_decode_round_trips(ours: Tokenizer, reference, name: str) -> None:
    text = TEXTS[name]
    ids = ours.encode(text)
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    if name != "specials":
        assert ours.decode(ids) == text


def test_special_tokens(ours: Tokenizer, reference) -> None:
    assert ours.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    assert ours.bos_token_id == reference.bos_token_id == 1
    assert ours.pad_token_id == reference.pad_token_id == 2
    # eos (<|im_end|>, which also ends a chat turn) first, then <|endoftext|>, which ends a document
    assert ours.eos_token_ids == [reference.eos_token_id, 0] == [2, 0]
    assert ours.vocab_size == len(reference) == 49152
    assert ours.decode([1, 19556, 2]) == "Hello"


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours: Tokenizer, reference, add_generation_prompt: bool) -> None:
    expected = reference.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt) == expected
    # without a system message the template inserts its default one
    expected = reference.apply_chat_template(CHAT[1:], tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(CHAT[1:], add_generation_prompt=add_generation_prompt) == expected
    assert expected.count("<|im_start|>system\n") == 1


def test_to_dir_round_trip(ours: Tokenizer, reference, tmp_path) -> None:
    ours.to_dir(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    as_transformers = type(reference).from_pretrained(tmp_path)  # transformers reads what we wrote, too
    for text in TEXTS.values():
        assert again.encode(text) == ours.encode(text) == as_transformers.encode(text, add_special_tokens=False)
        assert again.encode(text, add_special_tokens=True) == ours.encode(text, add_special_tokens=True)
    assert again.apply_chat_template(CHAT) == ours.apply_chat_template(CHAT) \
        == as_transformers.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert (again.bos_token_id, again.pad_token_id, again.eos_token_ids) == (1, 2, [2, 0])


def test_from_dir_reads_transformers_save(ours: Tokenizer, reference, tmp_path) -> None:
    reference.save_pretrained(tmp_path)
    saved = Tokenizer.from_dir(tmp_path)
    for text in TEXTS.values():
        assert saved.encode(text) == ours.encode(text)
    assert saved.apply_chat_template(CHAT) == ours.apply_chat_template(CHAT)
    assert (saved.bos_token_id, saved.eos_token_ids) == (1, [2, 0])


def test_chat_template_kwargs_and_helpers(tmp_path) -> None:
    template = ("{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}"
                "{% if extra %}{{ extra }}{% endif %}{{ strftime_now('%Y') | length }}")
    tokenizer = _word_tokenizer(tmp_path, chat_template=template)
    out = tokenizer.apply_chat_template([{"role": "user", "content": "é<b>"}], extra="X")
    assert out == '<s>{"role": "user", "content": "é<b>"}X4'


# ---------------------------------------------------------------- bad input


def test_missing_tokenizer_json(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="tokenizer.json") as info:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_corrupt_tokenizer_json(tmp_path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": [1, 2')
    with pytest.raises(CheckpointError) as info:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)


def test_corrupt_tokenizer_config(tmp_path) -> None:
    _word_tokenizer(tmp_path).to_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


def test_chat_without_template(tmp_path) -> None:
    tokenizer = _word_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="chat_template") as info:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert str(tmp_path) in str(info.value)


def test_chat_template_errors_are_canvas_errors(tmp_path) -> None:
    raising = _word_tokenizer(tmp_path, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(GenerationError, match="roles must alternate"):
        raising.apply_chat_template([{"role": "user", "content": "hi"}])
    broken = _word_tokenizer(tmp_path, chat_template="{% for m in messages %}")
    with pytest.raises(CheckpointError, match="chat_template"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(GenerationError):
        raising.apply_chat_template("hi")  # type: ignore[arg-type]


def test_unsupported_gguf_tokenizer_model(tmp_path) -> None:
    with pytest.raises(UnsupportedError, match="tokenizer.ggml.model") as info:
        Tokenizer.from_gguf_fields(tmp_path / "m.gguf", {"tokenizer.ggml.model": "llama"})
    assert "m.gguf" in str(info.value)


def test_gguf_tokenizer_missing_merges(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="tokenizer.ggml.merges"):
        Tokenizer.from_gguf_fields(tmp_path / "m.gguf", {"tokenizer.ggml.model": "gpt2",
                                                         "tokenizer.ggml.tokens": ["a", "b"]})


def _word_tokenizer(tmp_path, chat_template: str | None = None) -> Tokenizer:
    backend = Backend(WordLevel({"<s>": 0, "</s>": 1, "hi": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tokenizer = Tokenizer(backend, source=tmp_path, bos_token="<s>", eos_token="</s>", chat_template=chat_template)
    assert json.loads(backend.to_str())["added_tokens"]  # bos/eos became special added tokens
    return tokenizer
