"""The marks of the slow tests, and a check that every test which starts a process carries one.

`make test-fast` runs the suite without the slow kinds, chosen by mark (registered in
pyproject.toml):

- ``triton``: starts a real tritonserver (`LocalTriton`, the session's `tiny_triton`, a
  `cliplora serve` stack);
- ``subprocess``: starts any other process (a gateway or CLI process, a child guard,
  kubectl, promtool, hadolint, a Python interpreter);
- ``packaging``: builds the wheel;
- ``slow``: heavy model work in this process (a finetune run, several exports).

The first three say that a test starts processes. A test that started one without its
mark would slow the fast run down unseen, and with a tritonserver make it depend on Triton.
So every process a test starts is seen here, through Python's audit hooks
(``subprocess.Popen``, which asyncio's subprocesses use too, ``os.system``, ``os.fork``),
from its setup to its teardown, and a test that started one without its mark fails at its
teardown, naming the command and the mark. This holds in every run, `make test` included,
so a missing mark is found where it was made. (`slow` is chosen by measured durations.)

Quick tools that answer in milliseconds and leave nothing behind (`QUICK_TOOLS`) need no
mark: they cost the fast run nothing.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pytest

TRITON, SUBPROCESS, PACKAGING = "triton", "subprocess", "packaging"
PROCESS_MARKS = (TRITON, SUBPROCESS, PACKAGING)
# (numpy.testing runs lscpu once, at its first import, in whichever test that is.)
QUICK_TOOLS = frozenset({"git", "openssl", "lscpu"})
# The fixtures that serve a real tritonserver to the tests that use them (directly or through
# another fixture): the session's `tiny_triton`, and by convention every fixture called
# `triton`. Such tests get the `triton` mark without writing it.
TRITON_FIXTURES = frozenset({"tiny_triton", "triton"})


def starts_triton(argv: list[str]) -> bool:
    """Whether a command line starts a tritonserver: the binary itself (also under a child
    guard, which names it after ``--``), or `cliplora serve` without ``--triton-url`` (the local
    stack, whose Triton is the serve process's child and so invisible to this process's hooks)."""
    names = [os.path.basename(arg) for arg in argv]
    if "tritonserver" in names:
        return True
    return names[:1] == ["cliplora"] and argv[1:2] == ["serve"] and not any(
        arg == "--triton-url" or arg.startswith("--triton-url=") for arg in argv)


def _argv(args: object) -> list[str]:
    if isinstance(args, (str, bytes, os.PathLike)):
        return [os.fsdecode(args)]
    try:
        return [os.fsdecode(a) for a in args]  # type: ignore[union-attr]
    except TypeError:
        return [str(args)]


@dataclass
class Started:
    """The processes one test started, as command lines ("fork" for a bare fork)."""

    commands: list[list[str]] = field(default_factory=list)

    def needs(self) -> dict[str, list[str]]:
        """mark -> the commands that need it (quick tools need none)."""
        needed: dict[str, list[str]] = {}
        for argv in self.commands:
            if starts_triton(argv):
                needed.setdefault(TRITON, []).append(" ".join(argv))
            elif not argv or os.path.basename(argv[0]) not in QUICK_TOOLS:
                needed.setdefault("any slow", []).append(" ".join(argv) or "fork")
        return needed


class ProcessWatch:
    """A pytest plugin: records, per test, the processes started from this Python process,
    and fails at its teardown a test that started one without the mark for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: Started | None = None
        sys.addaudithook(self._audit)  # for good: audit hooks cannot be removed

    def _audit(self, event: str, args: tuple) -> None:
        if self._current is None:
            return
        if event == "subprocess.Popen":  # (executable, args, cwd, env)
            argv = _argv(args[1]) if args[1] is not None else _argv(args[0])
        elif event == "os.system":  # (command,)
            argv = os.fsdecode(args[0]).split()
        elif event in ("os.fork", "os.forkpty"):  # multiprocessing; subprocess forks in C, unannounced
            argv = ["fork"]
        else:  # os.posix_spawn: subprocess has announced itself first
            return
        with self._lock:
            if self._current is not None:
                self._current.commands.append(argv)

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        add_implied_marks(items)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        with self._lock:
            self._current = Started()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
        report = yield
        if call.when == "teardown":
            with self._lock:
                started, self._current = self._current or Started(), None
            problems = missing_marks(started, (mark.name for mark in item.iter_markers()))
            if problems and not report.failed:
                report.outcome = "failed"
                report.longrepr = "\n".join(problems)
        return report


def missing_marks(started: Started, marks: Iterable[str]) -> list[str]:
    """What a test with `marks` started without the mark for it, one line per command."""
    marks = set(marks)
    problems = []
    for need, commands in started.needs().items():
        if need == TRITON and TRITON not in marks:
            problems += [f"started a tritonserver without @pytest.mark.triton: {c[:300]}" for c in commands]
        elif need != TRITON and not marks & set(PROCESS_MARKS):
            problems += [f"started a process without one of the marks {', '.join(PROCESS_MARKS)}: {c[:300]}"
                         for c in commands]
    return problems


def add_implied_marks(items: list[pytest.Item]) -> None:
    """`triton` on every test that uses a fixture of `TRITON_FIXTURES`."""
    for item in items:
        if TRITON_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(TRITON)
