"""`--show-canvas`: watch a canvas being denoised in the terminal.

Committed text is shown plainly; the canvas being denoised shows its current best guess, tokens the sampler
accepted this step in bold green and still-noisy ones dimmed, under a step counter. When stdout is not a
terminal, one plain progress line per step is printed instead.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from canvaslm.diffusion.generate import CanvasCommitted, DenoisingStep, DiffusionResult


def show(events: Iterable, decode_token, prompt_length: int, console: Console | None = None) -> DiffusionResult:
    """Drain generation `events` (of batch row 0) while drawing them; returns the final result."""
    console = console or Console(file=sys.stderr)
    committed = Text()
    result = None
    live = Live(console=console, refresh_per_second=20, transient=False) if console.is_terminal else None
    if live is not None:
        live.start()
    try:
        for event in events:
            if isinstance(event, DenoisingStep):
                canvas = Text()
                for token, ok in zip(event.draft[0].tolist(), event.accepted[0].tolist()):
                    canvas.append(decode_token(token), style="bold green" if ok else "dim")
                status = Text(f"canvas {event.canvas + 1} · step {event.step}/{event.max_steps} · "
                              f"accepted {int(event.accepted[0].sum())}/{event.draft.shape[1]}", style="cyan")
                if live is not None:
                    live.update(Group(status, committed + canvas))
                else:
                    console.print(status.plain)
            elif isinstance(event, CanvasCommitted):
                kept = event.tokens.shape[1] if event.kept is None else int(event.kept[0])
                for token in event.tokens[0, :kept].tolist():
                    committed.append(decode_token(token))
            elif isinstance(event, DiffusionResult):
                result = event
    finally:
        if live is not None:
            live.stop()
    return result
