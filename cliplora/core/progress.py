"""Step-by-step progress on stderr for the slow commands (export, finetune, evaluate).

On a terminal each running step shows a spinner and long loops a progress bar;
everywhere each finished step prints one line with its duration and a loop prints a
line every tenth of the way, so CI logs read the same as a terminal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


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

    @contextmanager
    def bar(self, text: str, total: int, done: int = 0) -> Iterator[Callable[[int, str], None]]:
        """A loop of `total` units; yields ``update(done, status)``."""
        start = time.perf_counter()
        if self.quiet:
            yield lambda done, status="": None
            return
        if self.console.is_terminal:
            columns = (TextColumn(text), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       TextColumn("{task.fields[status]}"))
            with RichProgress(*columns, console=self.console, transient=True) as rich_bar:
                task = rich_bar.add_task(text, total=total, completed=done, status="")
                yield lambda done, status="": rich_bar.update(task, completed=done, status=status)
        else:
            tenth = max(1, total // 10)

            def update(done: int, status: str = "") -> None:
                if done % tenth == 0 or done == total:
                    self.console.print(f"  {text}: {done}/{total} {status}")

            yield update
        self.console.print(f"[green]✓[/green] {text} ({time.perf_counter() - start:.1f} s)")
