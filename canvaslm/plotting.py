"""The one plotting helper of every report (benchmarks, Sudoku, structured output, training curves).

It uses matplotlib's `Figure` without pyplot, so there is no global backend and it is safe in threads and servers.
Nothing is drawn when matplotlib is not installed (it comes with the `train` extra): callers then return False and
write their JSON alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def new_figure(width: float, height: float) -> Any | None:
    """A constrained-layout figure of width x height inches, or None when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(figsize=(width, height), layout="constrained")


def save(figure: Any, png: str | Path, dpi: int = 120) -> bool:
    """Write `figure` to `png`; True (so that a plot function can end with `return save(...)`)."""
    figure.savefig(png, dpi=dpi)
    return True
