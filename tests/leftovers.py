"""Processes a test run left behind.

Every process a test starts inherits the environment, so a variable set in this pytest
process marks all of them, their children and grandchildren (tritonserver, its Python-backend
stubs, prometheus, the guards): the live processes that carry the variable with this run's
value are the ones the run left behind. tests/conftest.py checks the whole session at its
end; a test can mark its own children with a value of its own and check them the same way.
"""

from __future__ import annotations

import os
import time

import psutil

SESSION_VARIABLE = "CLIPLORA_TEST_SESSION"
CASE_VARIABLE = "CLIPLORA_TEST_CASE"


def marked(variable: str, value: str) -> list[psutil.Process]:
    """The live processes (not this one, no zombies) whose environment has `variable`=`value`."""
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            if process.status() != psutil.STATUS_ZOMBIE and process.environ().get(variable) == value:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def still_running(variable: str, value: str, timeout_s: float) -> list[psutil.Process]:
    """The marked processes still there after up to `timeout_s` (they may be exiting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = marked(variable, value)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)


def describe(processes: list[psutil.Process]) -> str:
    lines = []
    for process in processes:
        try:
            lines.append(f"pid {process.pid} (parent {process.ppid()}): {' '.join(process.cmdline())[:300]}")
        except psutil.Error:
            lines.append(f"pid {process.pid}: (gone while reading it)")
    return "\n".join(lines)


def kill(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass
