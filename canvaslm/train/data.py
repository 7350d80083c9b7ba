"""Building training examples: (prompt ids, response ids) pairs made from the sources a TOML config lists
(Magpie self-instruct with an AR teacher, local text and code files, JSONL chats), passed through the filters
(length bounds, exact and near dedup), tokenized once and written as a data directory (format and reader:
canvaslm/train/shards.py). `build` writes one directory, `build_parts` a resumable directory of parts.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import hashlib
import json
import os
import random
import shutil
import sysconfig
import time
import tomllib
import types
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, get_args, get_origin, get_type_hints

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import canvaslm
from canvaslm.engine.ar import ar_generate
from canvaslm.errors import CanvasError
from canvaslm.train.shards import (FORMAT, FORMAT_VERSION, INDEX_FILE, MANIFEST_FILE, PART_PREFIX, TOKEN_DTYPE,
                                   TOKENS_FILE, is_data_dir, vocab_hash)

if TYPE_CHECKING:
    from canvaslm.checkpoints.tokenizer import Tokenizer
    from canvaslm.engine.lm import LM

Example = tuple[list[int], list[int]]
"""(prompt ids, response ids)"""

_SENTINEL = "\u2063CANVASLM-SENTINEL\u2063"  # text no chat template rewrites and no real message contains


# ---------------------------------------------------------------------------------------------------- tokenizer


def end_of_turn_id(tokenizer: Tokenizer) -> int:
    """The id the chat template writes right after an assistant message (SmolLM2: `<|im_end|>`)."""
    text = _render(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}])
    after = tokenizer.encode(text[text.index(_SENTINEL) + len(_SENTINEL):])
    stops = tokenizer.eos_token_ids
    for token in after:
        if token in stops:
            return token
    if not stops:
        raise CanvasError(f"{tokenizer.source}: the tokenizer has no end-of-turn or EOS token")
    return stops[0]


def user_turn_prefix(tokenizer: Tokenizer, system: str | None = None) -> str:
    """The chat template's text up to where a user message's content starts (system turn and user header
    included): what a Magpie teacher continues to write a question."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    text = _render(tokenizer, [*messages, {"role": "user", "content": _SENTINEL}])
    return text[:text.index(_SENTINEL)]


def _render(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> str:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if _SENTINEL not in text:
        raise CanvasError(f"{tokenizer.source}: the chat template does not copy message content verbatim, so "
                          "its turn boundaries cannot be found")
    return text


def _chat_prompt(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


# ---------------------------------------------------------------------------------------------------- sources


def magpie(lm: LM, n: int, max_new_tokens: int = 256, batch_size: int = 8, seed: int = 0,
           temperature: float = 1.0, top_p: float = 0.95, *, answer_temperature: float | None = 0.7,
           answer_top_p: float | None = None, max_question_tokens: int = 64, system: str | None = None,
           keep_truncated: bool = False, max_attempts: int | None = None, stats: Counter[str] | None = None,
           progress: Progress | None = None) -> Iterator[Example]:
    """Magpie self-instruct (Xu et al. 2024): the AR teacher `lm` continues the chat template's user-turn
    header to write a question, then answers it as a normal chat.

    Yields up to `n` examples: prompt = the chat prompt of [user: question], response = answer ids + the
    end-of-turn id. An answer cut by `max_new_tokens` is dropped, or with `keep_truncated` kept without the
    end-of-turn id (a true prefix, so no training target claims the answer ended there). Empty, too short,
    repetitive, truncated and repeated questions and answers are dropped and counted in `stats`; after
    `max_attempts` questions (default 4n) it stops with what it has. `answer_temperature` None = `temperature`,
    `answer_top_p` None = `top_p` (answers at temperature 1 and top_p 1 are samples of the teacher's own
    distribution: what a student distilled from them should match).
    """
    if lm.kind != "autoregressive":
        raise CanvasError(f"magpie needs an autoregressive teacher; {lm.source} is a {lm.kind} model")
    if lm.tokenizer is None:
        raise CanvasError(f"{lm.source}: magpie needs a model with a tokenizer and chat template")
    tokenizer, stats = lm.tokenizer, stats if stats is not None else Counter()
    prefix = tokenizer.encode(user_turn_prefix(tokenizer, system))
    end_of_turn = end_of_turn_id(tokenizer)
    # A question holding a special token (a stray `<|im_start|>assistant`) has left the user turn.
    special = {i for i, token in tokenizer.backend.get_added_tokens_decoder().items() if token.special}
    generator = torch.Generator(lm.device)
    generator.manual_seed(seed)
    attempts_left = max_attempts if max_attempts is not None else 4 * n
    questions_seen: set[str] = set()
    task = progress.add_task("magpie", total=n) if progress is not None else None
    made = 0
    while made < n and attempts_left > 0:
        rows = min(batch_size, attempts_left, n - made)  # the last batch only asks for what is missing
        attempts_left -= rows
        stats["questions_sampled"] += rows
        questions = []
        for ids, stopped in _sample(lm, [prefix] * rows, max_question_tokens, temperature, top_p, generator,
                                    progress, task, "questions"):
            text = tokenizer.decode(ids).strip()
            problem = ("truncated" if not stopped else "special_token" if special.intersection(ids)
                       else "duplicate" if text in questions_seen else _degenerate(text, ids, min_words=3))
            if problem:
                stats[f"question_{problem}"] += 1
            else:
                questions_seen.add(text)
                questions.append(text)
        if not questions:
            continue
        prompts = [_chat_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]
        answers = _sample(lm, prompts, max_new_tokens, temperature if answer_temperature is None
                          else answer_temperature, top_p if answer_top_p is None else answer_top_p, generator,
                          progress, task, "answers")
        for prompt, (ids, stopped) in zip(prompts, answers):  # at most n - made of them
            problem = ("special_token" if special.intersection(ids)
                       else _degenerate(tokenizer.decode(ids).strip(), ids, min_words=1)
                       or (None if stopped or keep_truncated else "truncated"))
            if problem:
                stats[f"answer_{problem}"] += 1
            else:
                if not stopped:
                    stats["answers_truncated_kept"] += 1
                made += 1
                if task is not None:
                    progress.advance(task)
                yield prompt, (ids + [end_of_turn] if stopped else ids)
    if task is not None:
        progress.update(task, description=f"magpie: {made}/{n}")


def _sample(lm: LM, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
            generator: Any, progress: Progress | None, task: Any, phase: str) -> list[tuple[list[int], bool]]:
    """Continue left-padded `prompts` with our batched AR loop; per row the new ids before the first stop
    token, and whether a stop token came."""
    width = max(map(len, prompts))
    if width + max_new_tokens > lm.max_length:
        raise CanvasError(f"magpie: a {width}-token prompt plus {max_new_tokens} new tokens exceeds "
                          f"{lm.source}'s context of {lm.max_length} tokens")
    pad = lm.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=lm.device)
    valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=lm.device)
    steps = 0

    def on_token(_: Any) -> None:
        nonlocal steps
        steps += 1
        if task is not None:
            progress.update(task, description=f"magpie: {phase} ({len(prompts)} rows) token {steps}")

    out = ar_generate(lm.network, ids, valid, max_new_tokens, temperature=temperature, top_p=top_p,
                      eos_token_ids=lm.eos_token_ids, pad_token_id=lm.pad_token_id, generator=generator,
                      on_token=on_token)
    rows = []
    for row in out.sequences[:, width:].tolist():
        stop = next((i for i, token in enumerate(row) if token in lm.eos_token_ids), None)
        rows.append((row, False) if stop is None else (row[:stop], True))
    return rows


def _degenerate(text: str, ids: Sequence[int], min_words: int, n: int = 4) -> str | None:
    """Why a generated text is unusable ("empty", "too_short", "repetitive"), or None. Repetitive: over half of
    its token n-grams repeat an earlier one (a small model stuck in a loop)."""
    if not text:
        return "empty"
    if len(text.split()) < min_words:
        return "too_short"
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    if len(grams) >= 4 * n and len(set(grams)) < len(grams) / 2:
        return "repetitive"
    return None


def text_files(globs: Sequence[str], tokenizer: Tokenizer, context_tokens: int = 256, response_tokens: int = 128,
               *, max_examples: int | None = None, max_file_bytes: int = 1_000_000, seed: int | None = 0,
               base_dir: str | os.PathLike[str] | None = None, stats: Counter[str] | None = None,
               progress: Progress | None = None) -> Iterator[Example]:
    """Windows of local text and code files: each file is tokenized whole (no special tokens) and cut into
    consecutive, non-overlapping windows of `context_tokens + response_tokens` ids; prompt = the first
    `context_tokens`, response = the rest (shorter at a file's end). Non-overlapping, so no token is a
    response target twice; the prompt gives the trainer's canvases realistic left context.

    Globs may use `**` and `{stdlib}` (the Python standard library); relative ones start at `base_dir`.
    Files are visited in an order shuffled by `seed` (None: sorted); binary (a NUL byte), non-UTF-8, larger
    than `max_file_bytes` and shorter than `context_tokens + 1` tokens are skipped and counted in `stats`.
    """
    stats = stats if stats is not None else Counter()
    paths = expand_globs(globs, base_dir)
    if seed is not None:
        random.Random(seed).shuffle(paths)
    task = progress.add_task("files", total=max_examples or len(paths)) if progress is not None else None
    made = 0
    for done, path in enumerate(paths, start=1):
        if max_examples is not None and made >= max_examples:
            break
        skip, text = _read_text(path, max_file_bytes)
        ids = tokenizer.encode(text) if skip is None else []
        if skip is None and len(ids) <= context_tokens:
            skip = "too_short"
        if skip:
            stats[f"files_{skip}"] += 1
        else:
            stats["files_used"] += 1
            for start in range(0, len(ids) - context_tokens, context_tokens + response_tokens):
                if max_examples is not None and made >= max_examples:
                    break
                made += 1
                cut = start + context_tokens
                yield ids[start:cut], ids[cut:cut + response_tokens]
        if task is not None:
            progress.update(task, completed=made if max_examples else done)
    if task is not None and max_examples:  # the files ran out before max_examples
        progress.update(task, total=made, completed=made)


def _read_text(path: Path, max_bytes: int) -> tuple[str | None, str]:
    """(why the file is skipped or None, its text)."""
    try:
        if path.stat().st_size > max_bytes:
            return "too_large", ""
        data = path.read_bytes()
    except OSError:
        return "unreadable", ""
    if b"\0" in data:
        return "binary", ""
    try:
        return None, data.decode("utf-8")
    except UnicodeDecodeError:
        return "undecodable", ""


def expand_globs(globs: Sequence[str], base_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The sorted files the globs match (`{stdlib}` = the standard library, relative globs from `base_dir`);
    a glob that matches no file is a CanvasError, since it is almost always a typo."""
    stdlib = sysconfig.get_paths()["stdlib"]
    found: set[Path] = set()
    for pattern in globs:
        expanded = os.path.expanduser(pattern.replace("{stdlib}", stdlib))
        if base_dir is not None and not os.path.isabs(expanded):
            expanded = os.path.join(base_dir, expanded)
        matches = [Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p)]
        if not matches:
            raise CanvasError(f"files source: glob {pattern!r} (as {expanded!r}) matches no file")
        found.update(matches)
    return sorted(found)


def jsonl_chats(paths: Sequence[str | os.PathLike[str]], tokenizer: Tokenizer, *, skip_malformed: bool = False,
                base_dir: str | os.PathLike[str] | None = None, stats: Counter[str] | None = None,
                progress: Progress | None = None) -> Iterator[Example]:
    """Chats from JSON-lines files: `{"messages": [{"role", "content"}, ...]}` ending with the assistant's
    reply, or `{"prompt": ..., "completion": ...}` (strings: one user turn and its reply; or TRL's
    conversational form, lists of messages). prompt = the chat template of the messages before the last
    (with the generation prompt), response = the last assistant content + the end-of-turn id.

    A malformed line is a CanvasError naming file:line, or with `skip_malformed` is skipped and counted."""
    stats = stats if stats is not None else Counter()
    end_of_turn = end_of_turn_id(tokenizer)
    files = [_resolve(p, base_dir) for p in paths]
    for path in files:
        if not path.is_file():
            raise CanvasError(f"{path}: jsonl source file not found")
    task = progress.add_task("jsonl", total=len(files)) if progress is not None else None
    for path in files:
        with path.open("rb") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                    messages = _chat_messages(json.loads(line.decode("utf-8")))
                    prompt = _chat_prompt(tokenizer, messages[:-1])
                except (ValueError, CanvasError) as exc:
                    if not skip_malformed:
                        raise CanvasError(f"{path}:{number}: {exc}") from exc
                    stats["malformed_lines"] += 1
                    continue
                yield prompt, tokenizer.encode(messages[-1]["content"]) + [end_of_turn]
        if task is not None:
            progress.advance(task)


def _chat_messages(record: Any) -> list[dict[str, str]]:
    """The messages of one JSONL record, last the assistant's reply; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, found {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        elif isinstance(prompt, list) and isinstance(completion, list):
            messages = prompt + completion
        else:
            raise ValueError("'prompt' and 'completion' must both be strings or both lists of messages")
    else:
        raise ValueError(f"expected a 'messages' list or 'prompt' and 'completion', found keys {sorted(record)}")
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError("expected at least two messages (a prompt and the assistant's reply)")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError(f"message {i} must be an object with string 'role' and 'content', found {message!r}")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"the last message must be the assistant's reply, found role {messages[-1]['role']!r}")
    return messages


def _resolve(path: str | os.PathLike[str], base_dir: str | os.PathLike[str] | None) -> Path:
    resolved = Path(path).expanduser()
    return resolved if resolved.is_absolute() or base_dir is None else Path(base_dir) / resolved


# ---------------------------------------------------------------------------------------------------- filters


class _NearDuplicates:
    """MinHash over token 5-grams of prompt+response, with LSH buckets to find candidates: an example whose
    estimated Jaccard similarity to a kept one reaches `threshold` is a near duplicate."""

    PERMUTATIONS, BANDS, SHINGLE = 64, 16, 5  # 16 bands of 4 rows: candidates from J ~ 0.5, then checked

    def __init__(self, threshold: float) -> None:
        rng = np.random.default_rng(0)
        self.threshold = threshold
        self.multipliers = rng.integers(1, 2**63, self.PERMUTATIONS, dtype=np.uint64) | np.uint64(1)
        self.offsets = rng.integers(0, 2**63, self.PERMUTATIONS, dtype=np.uint64)
        self.signatures: list[np.ndarray] = []
        self.buckets: dict[tuple[int, bytes], list[int]] = {}

    def seen(self, ids: np.ndarray) -> bool:
        """Whether `ids` is a near duplicate of an example seen before; if not, remember it."""
        signature = self._signature(ids)
        keys = [(band, part.tobytes()) for band, part in enumerate(np.split(signature, self.BANDS))]
        candidates = {j for key in keys for j in self.buckets.get(key, ())}
        if any(np.mean(self.signatures[j] == signature) >= self.threshold for j in candidates):
            return True
        for key in keys:
            self.buckets.setdefault(key, []).append(len(self.signatures))
        self.signatures.append(signature)
        return False

    def _signature(self, ids: np.ndarray) -> np.ndarray:
        ids = ids.astype(np.uint64)
        k = min(self.SHINGLE, len(ids))
        shingles = np.zeros(len(ids) - k + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):  # uint64 arithmetic wraps on purpose (hashing mod 2**64)
            for j in range(k):
                shingles = shingles * np.uint64(1_000_003) + ids[j:len(ids) - k + 1 + j]
            hashed = shingles[None, :] * self.multipliers[:, None] + self.offsets[:, None]
        return (hashed >> np.uint64(32)).min(axis=1)  # multiply-shift hashing, one min per permutation


class _Filters:
    """Length bounds, then exact dedup (hash of prompt + response ids), then optional near dedup; `dropped`
    counts each reason."""

    def __init__(self, config: FilterConfig) -> None:
        self.config = config
        self.hashes: set[bytes] = set()
        self.near = _NearDuplicates(config.near_dedup_threshold) if config.near_dedup else None
        self.dropped: Counter[str] = Counter()

    def keep(self, prompt: np.ndarray, response: np.ndarray) -> bool:
        reason = self._reason(prompt, response)
        if reason:
            self.dropped[reason] += 1
        return reason is None

    def _reason(self, prompt: np.ndarray, response: np.ndarray) -> str | None:
        c = self.config
        for name, length, low, high in (("prompt", len(prompt), c.min_prompt_tokens, c.max_prompt_tokens),
                                        ("response", len(response), c.min_response_tokens, c.max_response_tokens)):
            if length < low:
                return f"{name}_too_short"
            if high is not None and length > high:
                return f"{name}_too_long"
        if c.dedup:
            digest = hashlib.blake2b(np.int64(len(prompt)).tobytes() + prompt.tobytes() + response.tobytes(),
                                     digest_size=16).digest()
            if digest in self.hashes:
                return "duplicate"
            self.hashes.add(digest)
        if self.near is not None and self.near.seen(np.concatenate([prompt, response])):
            return "near_duplicate"
        return None


# ---------------------------------------------------------------------------------------------------- config


@dataclass
class TokenizerConfig:
    """`[tokenizer]`: the model whose tokenizer encodes everything, and the Magpie teacher."""
    model: str = "smol-ar"
    device: str | None = None
    dtype: str = "auto"
    """The teacher's weights: "auto" = bfloat16 where it is fast (CUDA, CPUs with AMX / AVX-512 BF16), else
    float32; or "float32" / "bfloat16"."""


@dataclass
class FilterConfig:
    """`[filters]`: every example must pass these; lengths are in tokens, bounds inclusive, None = no bound."""
    dedup: bool = True
    near_dedup: bool = False
    near_dedup_threshold: float = 0.8
    min_prompt_tokens: int = 1
    max_prompt_tokens: int | None = None
    min_response_tokens: int = 1
    max_response_tokens: int | None = None


@dataclass
class MagpieSource:
    """`kind = "magpie"`: see `magpie`."""
    kind: ClassVar[str] = "magpie"
    n: int
    max_new_tokens: int = 256
    batch_size: int = 8
    seed: int = 0
    temperature: float = 1.0
    top_p: float = 0.95
    answer_temperature: float | None = 0.7
    answer_top_p: float | None = None
    max_question_tokens: int = 64
    system: str | None = None
    keep_truncated: bool = False
    max_attempts: int | None = None
    name: str | None = None


@dataclass
class FilesSource:
    """`kind = "files"`: see `text_files`."""
    kind: ClassVar[str] = "files"
    globs: list[str]
    context_tokens: int = 256
    response_tokens: int = 128
    max_examples: int | None = None
    max_file_bytes: int = 1_000_000
    seed: int | None = 0
    name: str | None = None


@dataclass
class JsonlSource:
    """`kind = "jsonl"`: see `jsonl_chats`."""
    kind: ClassVar[str] = "jsonl"
    paths: list[str]
    skip_malformed: bool = False
    name: str | None = None


SourceConfig = MagpieSource | FilesSource | JsonlSource
_SOURCE_KINDS: dict[str, type] = {cls.kind: cls for cls in (MagpieSource, FilesSource, JsonlSource)}
# Numeric options must be >= 0, these >= 1, and these in (0, 1].
_POSITIVE = {"n", "max_new_tokens", "batch_size", "max_question_tokens", "max_attempts", "context_tokens",
             "response_tokens", "max_examples", "max_file_bytes"}
_FRACTIONS = {"top_p", "answer_top_p", "near_dedup_threshold"}


@dataclass
class BuildConfig:
    """A whole `canvaslm data build` config; relative paths in sources start at `base_dir`."""
    sources: list[SourceConfig]
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    base_dir: str = "."

    def to_dict(self) -> dict[str, Any]:
        """The config as TOML would spell it (`[[source]]` with `kind`), for the manifest."""
        sources = [{"kind": s.kind, **{k: v for k, v in asdict(s).items() if v is not None}} for s in self.sources]
        return {"tokenizer": {k: v for k, v in asdict(self.tokenizer).items() if v is not None},
                "source": sources, "filters": {k: v for k, v in asdict(self.filters).items() if v is not None},
                "base_dir": self.base_dir}


def load_config(path: str | os.PathLike[str]) -> BuildConfig:
    """Read and check a TOML build config; relative paths in it are relative to the file's directory."""
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CanvasError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CanvasError(f"{path}: not a readable TOML file ({exc})") from exc
    return parse_config(table, where=str(path), base_dir=str(path.resolve().parent))


def parse_config(table: Mapping[str, Any], where: str = "config", base_dir: str = ".") -> BuildConfig:
    """Check a parsed config (sections `[tokenizer]`, `[[source]]`, `[filters]`): unknown keys, types and
    ranges are CanvasErrors naming `where`, the section and the key (with a did-you-mean hint)."""
    _check_keys(table, {"tokenizer", "source", "filters"}, f"{where}: top level")
    sources = table.get("source", [])
    if not isinstance(sources, list) or not sources or not all(isinstance(s, dict) for s in sources):
        raise CanvasError(f"{where}: expected at least one [[source]] table")
    parsed = []
    for i, source in enumerate(sources, start=1):
        section = f"{where}: [[source]] #{i}"
        kind = source.get("kind")
        if kind not in _SOURCE_KINDS:
            raise CanvasError(f"{section}: key 'kind' must be one of {sorted(_SOURCE_KINDS)}, found {kind!r}"
                              + _hint(str(kind), _SOURCE_KINDS))
        parsed.append(_dataclass_from(_SOURCE_KINDS[kind], {k: v for k, v in source.items() if k != "kind"},
                                      f"{section} (kind = {kind!r})"))
    tokenizer = _dataclass_from(TokenizerConfig, _table(table, "tokenizer", where), f"{where}: [tokenizer]")
    filters = _dataclass_from(FilterConfig, _table(table, "filters", where), f"{where}: [filters]")
    return BuildConfig(parsed, tokenizer, filters, base_dir)


def _table(table: Mapping[str, Any], name: str, where: str) -> dict[str, Any]:
    value = table.get(name, {})
    if not isinstance(value, dict):
        raise CanvasError(f"{where}: [{name}] must be a table, found {type(value).__name__}")
    return value


def _check_keys(table: Mapping[str, Any], allowed: Iterable[str], section: str) -> None:
    allowed = set(allowed)
    for key in table:
        if key not in allowed:
            raise CanvasError(f"{section}: unknown key {key!r}{_hint(key, allowed)}; known keys: {sorted(allowed)}")


def _hint(key: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _dataclass_from(cls: type, table: Mapping[str, Any], section: str) -> Any:
    hints = get_type_hints(cls)
    options = fields(cls)
    _check_keys(table, [f.name for f in options], section)
    for option in options:
        if option.name not in table:
            if option.default is MISSING and option.default_factory is MISSING:
                raise CanvasError(f"{section}: missing required key {option.name!r}")
            continue
        value, hint = table[option.name], hints[option.name]
        if not _matches(value, hint):
            raise CanvasError(f"{section}: key {option.name!r} expected {_spell(hint)}, found {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_range(option.name, value, section)
    return cls(**table)


def _check_range(name: str, value: float, section: str) -> None:
    if name in _FRACTIONS:
        ok, bound = 0 < value <= 1, "in (0, 1]"
    else:
        low = 1 if name in _POSITIVE else 0
        ok, bound = value >= low, f">= {low}"
    if not ok:
        raise CanvasError(f"{section}: key {name!r} must be {bound}, found {value!r}")


def _matches(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if origin is types.UnionType:
        return any(_matches(value, arg) for arg in get_args(hint))
    if origin is list:
        return isinstance(value, list) and all(_matches(v, get_args(hint)[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _spell(hint: Any) -> str:
    args = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) is types.UnionType:
        return " or ".join(_spell(a) for a in args)
    if get_origin(hint) is list:
        return f"a list of {_spell(args[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


# ---------------------------------------------------------------------------------------------------- build


def build(config: BuildConfig | Mapping[str, Any] | str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
          overwrite: bool = False, progress: bool = True, lm: LM | None = None) -> dict[str, Any]:
    """Run every source of `config` (a BuildConfig, a parsed TOML mapping, or a TOML path) through the
    filters into a new data directory `out_dir`, written atomically; returns the manifest.

    The config, the source files and `out_dir` are checked before any model is loaded. `lm` (optional) is
    an already loaded model to use instead of loading `[tokenizer] model`. Examples keep source order."""
    if isinstance(config, (str, os.PathLike)):
        config_path: str | None = str(config)
        config = load_config(config)
    else:
        config_path = None
        config = config if isinstance(config, BuildConfig) else parse_config(config)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CanvasError(f"{out}: already exists; choose a new directory or overwrite it (--force)")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or is_data_dir(out))):
        raise CanvasError(f"{out}: refusing to replace it, it is not a canvaslm data directory")
    for source in config.sources:  # fail on a missing input now, not after an hour of Magpie
        if isinstance(source, FilesSource):
            expand_globs(source.globs, config.base_dir)
        elif isinstance(source, JsonlSource):
            for p in source.paths:
                if not _resolve(p, config.base_dir).is_file():
                    raise CanvasError(f"{_resolve(p, config.base_dir)}: jsonl source file not found")
    if lm is None:
        lm = load_teacher(config.tokenizer)
    if lm.tokenizer is None:
        raise CanvasError(f"{lm.source}: has no tokenizer; [tokenizer] model must name a model with one")

    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        filters = _Filters(config.filters)
        index, source_counts = array("q"), []
        with _progress(progress) as bar, open(staging / TOKENS_FILE, "wb") as tokens_file:
            for i, source in enumerate(config.sources, start=1):
                stats: Counter[str] = Counter()
                before, dropped_before = len(index) // 3, sum(filters.dropped.values())
                for prompt, response in _run_source(source, lm, config.base_dir, stats, bar):
                    p, r = np.asarray(prompt, TOKEN_DTYPE), np.asarray(response, TOKEN_DTYPE)
                    if filters.keep(p, r):
                        index.extend((tokens_file.tell() // TOKEN_DTYPE.itemsize, len(p), len(r)))
                        tokens_file.write(p.tobytes() + r.tobytes())
                kept = len(index) // 3 - before
                source_counts.append({"name": source.name or f"{source.kind}#{i}", "kind": source.kind,
                                      "produced": kept + sum(filters.dropped.values()) - dropped_before,
                                      "kept": kept, "source_drops": dict(sorted(stats.items()))})
        rows = np.frombuffer(index, dtype=np.int64).reshape(-1, 3)
        if not len(rows):
            raise CanvasError(f"no example survived: sources {source_counts}, filters dropped "
                              f"{dict(filters.dropped)}; loosen [filters] or check the sources")
        np.save(staging / INDEX_FILE, rows, allow_pickle=False)
        manifest = _manifest(config, config_path, out, lm, rows, source_counts, filters,
                             time.perf_counter() - start)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
        _replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def load_teacher(config: TokenizerConfig) -> LM:
    """The `[tokenizer]` model, in the dtype its `dtype` asks for on its device."""
    from canvaslm.hardware import resolve_dtype

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dtype = resolve_dtype(config.dtype, device)
    except ValueError as exc:
        raise CanvasError(f"[tokenizer] dtype: {exc}") from None
    return canvaslm.load(config.model, device=device, dtype=dtype)


def build_parts(config: BuildConfig | str | os.PathLike[str], out_dir: str | os.PathLike[str], parts: int, *,
                first: int = 0, progress: bool = True, lm: LM | None = None) -> list[dict[str, Any]]:
    """Build data in parts `out_dir/part-<i>` for i = first .. first + parts - 1, each a whole data directory
    written atomically; part i runs every seeded source with its seed + i (the jsonl sources only in part 0).
    Parts that already exist are kept, so a build cut off (by the end of a session) resumes where it stopped,
    losing at most the part in progress; `open_shards(out_dir)` reads all finished parts as one dataset, and a
    trainer can read them while later parts are still being written. Returns the manifests of the new parts."""
    if isinstance(config, (str, os.PathLike)):
        config_path: str | None = str(config)
        config = load_config(config)
    else:
        config_path = None
    if parts < 1 or first < 0:
        raise CanvasError(f"--parts must be >= 1 and --first-part >= 0, got {parts} and {first}")
    out = Path(out_dir)
    if out.exists() and (is_data_dir(out) or not out.is_dir()):
        raise CanvasError(f"{out}: is a single data directory (or a file), not a directory of parts")
    manifests = []
    for i in range(first, first + parts):
        part = out / f"{PART_PREFIX}{i:05d}"
        if is_data_dir(part):
            continue
        sources = [dataclasses.replace(s, seed=s.seed + i) if getattr(s, "seed", None) is not None else s
                   for s in config.sources if i == 0 or not isinstance(s, JsonlSource)]
        if lm is None:
            lm = load_teacher(config.tokenizer)
        manifest = build(dataclasses.replace(config, sources=sources), part, overwrite=True, progress=progress,
                         lm=lm)
        manifest["build"]["config_path"] = config_path
        manifest["build"]["part"] = i
        (part / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
        manifests.append(manifest)
    return manifests


def _run_source(source: SourceConfig, lm: LM, base_dir: str, stats: Counter[str],
                progress: Progress | None) -> Iterator[Example]:
    options = {k: v for k, v in asdict(source).items() if k != "name"}
    if isinstance(source, MagpieSource):
        return magpie(lm, stats=stats, progress=progress, **options)
    if isinstance(source, FilesSource):
        return text_files(tokenizer=lm.tokenizer, base_dir=base_dir, stats=stats, progress=progress, **options)
    return jsonl_chats(tokenizer=lm.tokenizer, base_dir=base_dir, stats=stats, progress=progress, **options)


def _progress(enabled: bool) -> Any:
    if not enabled:
        return nullcontext(None)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True))


def _replace_dir(staging: Path, out: Path) -> None:
    """Move the finished directory into place; an existing one is swapped out first, then deleted."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def _manifest(config: BuildConfig, config_path: str | None, out: Path, lm: LM, rows: np.ndarray,
              source_counts: list[dict[str, Any]], filters: _Filters, seconds: float) -> dict[str, Any]:
    tokenizer = lm.tokenizer
    dropped = dict(sorted(filters.dropped.items()))
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": {"tokens": TOKENS_FILE, "token_dtype": "uint32 little-endian", "index": INDEX_FILE,
                  "index_columns": ["offset", "prompt_len", "response_len"]},
        "examples": len(rows),
        "tokens": int(rows[:, 1:].sum()),
        "prompt_tokens": int(rows[:, 1].sum()),
        "response_tokens": int(rows[:, 2].sum()),
        "tokenizer": {"source": lm.source, "path": tokenizer.source, "vocab_size": tokenizer.vocab_size,
                      "vocab_sha256": vocab_hash(tokenizer), "end_of_turn_id": end_of_turn_id(tokenizer)},
        "sources": source_counts,
        "filters": {**asdict(config.filters), "dropped": dropped},
        "duplicates_dropped": dropped.get("duplicate", 0) + dropped.get("near_duplicate", 0),
        "lengths": {"prompt": _length_stats(rows[:, 1]), "response": _length_stats(rows[:, 2])},
        "build": {"config": config.to_dict(), "config_path": config_path, "out_dir": str(out),
                  "canvaslm_version": canvaslm.__version__, "seconds": round(seconds, 2)},
    }


def _length_stats(lengths: np.ndarray) -> dict[str, float]:
    return {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 2),
            "p50": int(np.percentile(lengths, 50, method="lower")),
            "p95": int(np.percentile(lengths, 95, method="lower")), "max": int(lengths.max())}
