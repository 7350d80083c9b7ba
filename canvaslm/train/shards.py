"""Reading training examples: a data directory written by `canvaslm data build` (canvaslm/train/data.py), or a
directory of such parts, as a sequence of (prompt ids, response ids), memory-mapped.

A data directory holds three files (one pair of data files; no further sharding, since a memory map of one large
file costs nothing until it is read):

* `tokens.bin`  every example's prompt ids then response ids, back to back, little-endian uint32;
* `index.npy`   int64 [N, 3]: (offset into tokens.bin in tokens, prompt length, response length) per example;
* `manifest.json` format version, tokenizer (source, vocab size, vocab hash, end-of-turn id), counts per
  source, what each filter dropped, length statistics and the build configuration.

The trainer cuts responses into canvases itself, so an example is exactly a prompt and the whole response.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from canvaslm.errors import CanvasError

if TYPE_CHECKING:
    from canvaslm.checkpoints.tokenizer import Tokenizer

FORMAT = "canvaslm-examples"
FORMAT_VERSION = 1
TOKENS_FILE, INDEX_FILE, MANIFEST_FILE = "tokens.bin", "index.npy", "manifest.json"
TOKEN_DTYPE = np.dtype("<u4")
PART_PREFIX = "part-"


class Shards(Sequence[tuple[np.ndarray, np.ndarray]]):
    """A data directory written by `build`: `shards[i]` is (prompt ids, response ids), uint32 views of a
    memory map of tokens.bin (nothing is read until used). Pass `tokenizer` to check the data was made with it."""

    def __init__(self, path: str | os.PathLike[str], tokenizer: Tokenizer | None = None) -> None:
        self.path = Path(path)
        self._manifest = _read_manifest(self.path)
        tokens_path, index_path = self.path / TOKENS_FILE, self.path / INDEX_FILE
        for required in (tokens_path, index_path):
            if not required.is_file():
                raise CanvasError(f"{required}: missing; a canvaslm data directory needs {TOKENS_FILE}, "
                                  f"{INDEX_FILE} and {MANIFEST_FILE}")
        size = tokens_path.stat().st_size
        if size % TOKEN_DTYPE.itemsize or size // TOKEN_DTYPE.itemsize != self._manifest["tokens"]:
            raise CanvasError(f"{tokens_path}: {size} bytes, but {MANIFEST_FILE} says {self._manifest['tokens']} "
                              f"uint32 tokens ({self._manifest['tokens'] * TOKEN_DTYPE.itemsize} bytes); "
                              "the directory is truncated or mixes files of two builds")
        try:
            index = np.load(index_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CanvasError(f"{index_path}: not a readable .npy array ({exc})") from exc
        if index.dtype != np.int64 or index.ndim != 2 or index.shape[1] != 3:
            raise CanvasError(f"{index_path}: expected an int64 array of shape [N, 3], found {index.dtype} "
                              f"{list(index.shape)}")
        if len(index) != self._manifest["examples"]:
            raise CanvasError(f"{index_path}: {len(index)} rows, but {MANIFEST_FILE} says "
                              f"{self._manifest['examples']} examples")
        tokens = size // TOKEN_DTYPE.itemsize
        if len(index) and (int(index.min()) < 0 or int((index[:, 0] + index[:, 1] + index[:, 2]).max()) > tokens):
            bad = int(np.argmax((index < 0).any(axis=1) | (index.sum(axis=1) > tokens)))
            raise CanvasError(f"{index_path}: row {bad} {index[bad].tolist()} (offset, prompt, response) points "
                              f"outside {TOKENS_FILE} ({tokens} tokens); the index is corrupt")
        if tokenizer is not None and vocab_hash(tokenizer) != self._manifest["tokenizer"]["vocab_sha256"]:
            raise CanvasError(f"{self.path / MANIFEST_FILE}: built with tokenizer "
                              f"{self._manifest['tokenizer']['source']!r}, whose vocabulary differs from "
                              f"{tokenizer.source!r}'s")
        self.index: np.ndarray = index
        # np.memmap cannot map an empty file
        self.tokens: np.ndarray = (np.memmap(tokens_path, dtype=TOKEN_DTYPE, mode="r") if tokens
                                   else np.zeros(0, TOKEN_DTYPE))

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    @property
    def parts(self) -> list[Shards]:
        """One data directory is a dataset of one part (see `PartedShards`)."""
        return [self]

    def refresh(self) -> int:
        """A single data directory never grows: no new part (see `PartedShards.refresh`)."""
        return 0

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples in {self.path}")
        offset, prompt, response = (int(v) for v in self.index[i])
        return self.tokens[offset:offset + prompt], self.tokens[offset + prompt:offset + prompt + response]

    def __repr__(self) -> str:
        return f"Shards({str(self.path)!r}, examples={len(self)}, tokens={len(self.tokens)})"


class PartedShards(Sequence[tuple[np.ndarray, np.ndarray]]):
    """The finished parts of a `build_parts` directory read as one dataset, in part order. `refresh()` appends
    parts finished since (a trainer reading data that is still being built), whatever their numbers: two builders
    (`--first-part 12` and `--first-part 112`) finish parts out of order. Example i stays example i."""

    def __init__(self, path: str | os.PathLike[str], tokenizer: Tokenizer | None = None) -> None:
        self.path, self.tokenizer = Path(path), tokenizer
        self.parts: list[Shards] = []
        self._ends: list[int] = []
        self.refresh()
        if not self.parts:
            raise CanvasError(f"{self.path}: no finished part (no {PART_PREFIX}*/{MANIFEST_FILE}) yet")

    def refresh(self) -> int:
        """Open the parts finished since the last call, appended in part order after the open ones (so a part
        with a lower number than an open one comes after it); returns how many."""
        known = {p.path.name for p in self.parts}
        found = sorted(d for d in self.path.glob(f"{PART_PREFIX}*") if d.name not in known and is_data_dir(d))
        for directory in found:
            part = Shards(directory, self.tokenizer)
            if self.parts and part.manifest["tokenizer"]["vocab_sha256"] != self.manifest["tokenizer"]["vocab_sha256"]:
                raise CanvasError(f"{directory}: built with another tokenizer than {self.parts[0].path}")
            self.parts.append(part)
            self._ends.append((self._ends[-1] if self._ends else 0) + len(part))
        return len(found)

    @property
    def manifest(self) -> dict[str, Any]:
        """The first part's manifest (tokenizer, format) with the totals of all open parts."""
        totals = {k: sum(p.manifest[k] for p in self.parts)
                  for k in ("examples", "tokens", "prompt_tokens", "response_tokens")}
        return {**self.parts[0].manifest, **totals, "parts": [p.path.name for p in self.parts]}

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples in {self.path}")
        i %= len(self)
        k = bisect.bisect_right(self._ends, i)
        return self.parts[k][i - (self._ends[k - 1] if k else 0)]

    def __repr__(self) -> str:
        return f"PartedShards({str(self.path)!r}, parts={len(self.parts)}, examples={len(self)})"


def open_shards(path: str | os.PathLike[str], tokenizer: Tokenizer | None = None) -> Shards | PartedShards:
    """A data directory, or a directory of parts (`build_parts`), for reading."""
    path = Path(path)
    if path.is_dir() and not (path / MANIFEST_FILE).exists() and any(path.glob(f"{PART_PREFIX}*")):
        return PartedShards(path, tokenizer)
    return Shards(path, tokenizer)


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir():
        raise CanvasError(f"{path}: not a directory; expected a canvaslm data directory (canvaslm data build)")
    if not manifest_path.is_file():
        raise CanvasError(f"{manifest_path}: missing; {path} is not a canvaslm data directory")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CanvasError(f"{manifest_path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CanvasError(f"{manifest_path}: field 'format' expected {FORMAT!r}, found {found!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CanvasError(f"{manifest_path}: field 'format_version' expected {FORMAT_VERSION}, found "
                          f"{manifest.get('format_version')!r}; rebuild the data with this canvaslm")
    for key, kind in (("examples", int), ("tokens", int), ("tokenizer", dict)):
        if not isinstance(manifest.get(key), kind):
            raise CanvasError(f"{manifest_path}: field {key!r} missing or not {kind.__name__}")
    return manifest


def is_data_dir(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def vocab_hash(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id, added tokens included): the ids in a data directory
    mean the same to any tokenizer with the same hash."""
    vocab = sorted(tokenizer.backend.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()
