"""Errors canvaslm raises for bad input: each says which file, which field, what was expected and what was found."""

from __future__ import annotations


class CanvasError(Exception):
    """Base class of every error canvaslm raises on purpose (bad input, unsupported feature)."""


class CheckpointError(CanvasError):
    """A model file or directory cannot be used as it is."""

    def __init__(self, path: object, problem: str, *, field: str | None = None,
                 expected: object = None, found: object = None) -> None:
        parts = [f"{path}: {problem}"]
        if field is not None:
            parts.append(f"field {field!r}")
        if expected is not None:
            parts.append(f"expected {expected}")
        if found is not None:
            parts.append(f"found {found}")
        super().__init__("; ".join(parts))
        self.path, self.field, self.expected, self.found = path, field, expected, found


class UnsupportedError(CanvasError):
    """A feature that exists upstream but that canvaslm does not support yet (images, video, ...)."""


class GenerationError(CanvasError):
    """Invalid generation arguments (unknown sampling key, out-of-range value, wrong model kind)."""


class TrainingError(CanvasError):
    """Invalid training input: a malformed batch, mismatched shapes or bad objective options."""
