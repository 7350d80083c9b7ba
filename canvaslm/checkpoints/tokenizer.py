"""Tokenizers: a `tokenizers.Tokenizer` plus the special tokens and chat template a model ships with.

Two sources: a Hugging Face directory (`tokenizer.json` + `tokenizer_config.json`) and the metadata of a
GGUF file. The GGUF path rebuilds the tokenizer the way transformers' GGUF converter does, so that both
give the same ids for the same text.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from os import PathLike
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from canvaslm.errors import CheckpointError, GenerationError, UnsupportedError

# llama.cpp's token_type values (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4

# Tokens that end a turn or a document: llama.cpp stops on these when the file marks them as special, even
# when they are not the file's eos (SmolLM2's `<|endoftext|>`, Llama 3's `<|eot_id|>` next to `<|end_of_text|>`).
_END_OF_GENERATION = (
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "<end_of_utterance>", "<｜end▁of▁sentence｜>",
)

# `tokenizer.ggml.pre` -> the split regex the vocabulary's merges were learned with. Same table as
# transformers' GGUF converter; any other value keeps GPT-2's byte-level regex, as it does there.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


class Tokenizer:
    """Text <-> ids for one model, with its special tokens and chat template.

    The constructor takes over `backend`: it adds the named special tokens it lacks and, when the add_*_token
    flags are given, sets its post-processor from them.
    """

    def __init__(self, backend: Backend, *, source: str | PathLike[str], bos_token: str | None = None,
                 eos_token: str | None = None, unk_token: str | None = None, pad_token: str | None = None,
                 chat_template: str | None = None, add_bos_token: bool | None = None,
                 add_eos_token: bool | None = None) -> None:
        self.backend = backend
        self.source = str(source)
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.chat_template = chat_template
        self.add_bos_token = bool(add_bos_token) and bos_token is not None
        self.add_eos_token = bool(add_eos_token) and eos_token is not None
        # Like transformers: named special tokens the backend does not know yet become special added tokens.
        known = {token.content for token in backend.get_added_tokens_decoder().values()}
        missing = [token for token in (bos_token, eos_token, unk_token, pad_token)
                   if token is not None and token not in known]
        if missing:
            backend.add_tokens([AddedToken(token, special=True, normalized=False) for token in dict.fromkeys(missing)])
        # Explicit flags (or no post-processor at all) mean the flags decide what `add_special_tokens` adds;
        # otherwise the post-processor of tokenizer.json does, as in transformers.
        if add_bos_token is not None or add_eos_token is not None or backend.post_processor is None:
            backend.post_processor = self._template_processor()

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_dir(cls, path: str | PathLike[str]) -> Tokenizer:
        """Read a Hugging Face tokenizer directory: tokenizer.json, tokenizer_config.json, chat_template.jinja."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(tokenizer_file, "missing; a tokenizer directory needs a tokenizer.json")
        try:
            backend = Backend.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception for bad JSON or an unknown schema
            raise CheckpointError(tokenizer_file, f"cannot be read as a tokenizers file ({exc})") from exc

        config: dict[str, Any] = {}
        config_file = folder / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointError(config_file, f"is not valid JSON ({exc})") from exc
            if not isinstance(config, dict):
                raise CheckpointError(config_file, "is not a JSON object", found=type(config).__name__)

        template_file = folder / "chat_template.jinja"
        if template_file.is_file():
            chat_template: str | None = template_file.read_text(encoding="utf-8")
        else:
            chat_template = _default_template(config.get("chat_template"), config_file)

        return cls(
            backend, source=folder, chat_template=chat_template,
            bos_token=_token_content(config.get("bos_token")), eos_token=_token_content(config.get("eos_token")),
            unk_token=_token_content(config.get("unk_token")), pad_token=_token_content(config.get("pad_token")),
            add_bos_token=config.get("add_bos_token"), add_eos_token=config.get("add_eos_token"),
        )

    @classmethod
    def from_gguf_fields(cls, path: str | PathLike[str], fields: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer a GGUF file describes from its `tokenizer.*` metadata (already decoded).

        Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is supported; it is built exactly as
        transformers' GGUF converter builds it (vocabulary, merges, pre-tokenizer, decoder, added tokens).
        """
        model = fields.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise UnsupportedError(f"{path}: tokenizer model {model!r} (field 'tokenizer.ggml.model') is not "
                                   "supported; expected 'gpt2' (byte-level BPE)")
        tokens = _required(path, fields, "tokenizer.ggml.tokens")
        merges = _required(path, fields, "tokenizer.ggml.merges")
        token_types = fields.get("tokenizer.ggml.token_type") or []

        # Tokens are stored as text; byte-level BPE needs them spelled in its byte alphabet.
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab = {token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
                 for index, token in enumerate(tokens)}
        pairs = [tuple(merge.split(" ")) for merge in merges]
        if any(len(pair) != 2 for pair in pairs):
            bad = next(merge for merge, pair in zip(merges, pairs) if len(pair) != 2)
            raise CheckpointError(path, "malformed merge", field="tokenizer.ggml.merges",
                                  expected="two tokens separated by one space", found=repr(bad))
        try:
            backend = Backend(BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                                  end_of_word_suffix="", fuse_unk=False))
        except Exception as exc:  # tokenizers raises a bare Exception, e.g. for a merge of unknown tokens
            raise CheckpointError(path, f"vocabulary and merges do not fit together ({exc})",
                                  field="tokenizer.ggml.merges") from exc
        split = _PRE_TOKENIZER_SPLITS.get(fields.get("tokenizer.ggml.pre"))
        if split is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        backend.decoder = decoders.ByteLevel()

        # Control tokens stay whole and are special. One spelled outside the byte alphabet is a llama.cpp
        # mislabel that transformers skips, and so do we (adding it would grow the vocabulary).
        control = [AddedToken(token, normalized=False, special=True)
                   for token, kind in zip(tokens, token_types) if kind == _CONTROL and set(token) <= alphabet]
        backend.add_special_tokens(control)
        # User-defined tokens (`<think>`) are matched whole by llama.cpp but are not special.
        known = backend.get_vocab()
        backend.add_tokens([AddedToken(token, normalized=False, special=False)
                            for token, kind in zip(tokens, token_types) if kind == _USER_DEFINED and token in known])

        def token_at(key: str) -> str | None:
            index = fields.get(key)
            if index is None:
                return None
            if not 0 <= index < len(tokens):
                raise CheckpointError(path, "token id out of range", field=key,
                                      expected=f"0..{len(tokens) - 1}", found=index)
            return tokens[index]

        return cls(
            backend, source=path, chat_template=fields.get("tokenizer.chat_template"),
            bos_token=token_at("tokenizer.ggml.bos_token_id"), eos_token=token_at("tokenizer.ggml.eos_token_id"),
            unk_token=token_at("tokenizer.ggml.unknown_token_id"),
            pad_token=token_at("tokenizer.ggml.padding_token_id"),
            add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
            add_eos_token=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
        )

    def to_dir(self, path: str | PathLike[str]) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) so `from_dir` reads them back."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            "unk_token": self.unk_token, "pad_token": self.pad_token,
            "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
            "chat_template": self.chat_template,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")

    # ---------------------------------------------------------------- text <-> ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`, without the special tokens unless `skip_special_tokens` is False."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: eos first, then every special end-of-turn/end-of-text token the vocabulary
        has (`<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`, ...), as llama.cpp does."""
        special = {token.content: index for index, token in self.backend.get_added_tokens_decoder().items()
                   if token.special}
        ids = [self._id(self.eos_token)] + [special.get(token) for token in _END_OF_GENERATION]
        return list(dict.fromkeys(index for index in ids if index is not None))

    # ---------------------------------------------------------------- chat

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> str:
        """Render `messages` with the model's chat template, as transformers' `apply_chat_template(tokenize=False)`."""
        if self.chat_template is None:
            raise CheckpointError(self.source, "has no chat template; use plain completion instead",
                                  field="chat_template")
        if isinstance(messages, (str, bytes)) or not all(isinstance(m, Mapping) for m in messages):
            raise GenerationError("messages must be a list of {'role': ..., 'content': ...} dicts")
        try:
            template = _compile_template(self.chat_template)
        except jinja2.TemplateError as exc:
            raise CheckpointError(self.source, f"chat template does not compile ({exc})",
                                  field="chat_template") from exc
        special = {name: value for name, value in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                                   ("unk_token", self.unk_token), ("pad_token", self.pad_token))
                   if value is not None}
        variables = {"tools": None, "documents": None, **special, **template_kwargs}
        try:
            return template.render(messages=[dict(m) for m in messages],
                                   add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as exc:
            raise GenerationError(f"{self.source}: the chat template rejected these messages: {exc}") from exc

    # ---------------------------------------------------------------- helpers

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def _template_processor(self) -> processors.TemplateProcessing:
        """What `add_special_tokens=True` adds, built from the flags as transformers' `update_post_processor`."""
        bos, eos = self.bos_token, self.eos_token
        single = f"{f'{bos}:0 ' if self.add_bos_token else ''}$A:0{f' {eos}:0' if self.add_eos_token else ''}"
        pair = (f"{single}{f' {bos}:1' if self.add_bos_token else ''} $B:1"
                f"{f' {eos}:1' if self.add_eos_token else ''}")
        special = []
        if self.add_bos_token:
            special.append((bos, self._id(bos)))
        if self.add_eos_token:
            special.append((eos, self._id(eos)))
        return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"


def _required(path: str | PathLike[str], fields: Mapping[str, Any], key: str) -> Any:
    if key not in fields:
        raise CheckpointError(path, "missing required tokenizer metadata", field=key)
    return fields[key]


def _token_content(value: object) -> str | None:
    """A special token from tokenizer_config.json: a string, or a serialized AddedToken {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _default_template(value: object, config_file: Path) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named templates (we use "default")."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, Mapping)}
        return named.get("default")
    raise CheckpointError(config_file, "bad chat template", field="chat_template",
                          expected="a string or a list of {name, template}", found=type(value).__name__)


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' override: Jinja's own tojson HTML-escapes, which chat templates must not do.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    # The same environment transformers renders chat templates in; templates are untrusted, hence the sandbox.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)
