"""Step-by-step progress on stderr for the slow commands (export, predict).

On a terminal each running step shows a spinner; everywhere each finished step prints
one line with its duration, so CI logs read the same as a terminal.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console


class Progress:
    """Prints `step` lines to stderr; `quiet=True` silences everything but warnings."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.quiet = quiet

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        start = time.perf_counter()
        if self.quiet:
            yield
            return
        if self.console.is_terminal:
            with self.console.status(f"{text} ..."):
                yield
        else:
            yield
        self.console.print(f"[green]✓[/green] {text} ({time.perf_counter() - start:.1f} s)")

    def info(self, text: str) -> None:
        if not self.quiet:
            self.console.print(f"  {text}")

    def warn(self, text: str) -> None:
        self.console.print(f"[bold yellow]WARNING[/bold yellow] {text}")
