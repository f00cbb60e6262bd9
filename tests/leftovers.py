"""Processes a test run left behind.

Every process a test starts inherits the environment, so a variable set in this pytest
process marks all of them, their children and grandchildren (tritonserver, its Python-backend
stubs, prometheus, the guards): the live processes that carry the variable with this run's
value are the ones the run left behind. `SessionCheck` (registered by tests/conftest.py)
checks the whole session at its end; a test can mark its own children with a value of its
own and check them the same way.
"""

from __future__ import annotations

import os
import time
import uuid

import psutil
import pytest

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


class SessionCheck:
    """A pytest plugin: marks every process the session starts (a fresh value of
    `SESSION_VARIABLE`, set when the plugin is made, before any test runs), and at the
    session's end fails the run, naming each one, if any is still running `wait_s` later
    (processes stopped in the last teardown may still be exiting); then kills them."""

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        # Fresh, never inherited: a session run inside a test must not take its parent's processes for its own.
        self.value = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        os.environ[SESSION_VARIABLE] = self.value

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        left = still_running(SESSION_VARIABLE, self.value, self.wait_s)
        if not left:
            return
        report = (f"{len(left)} process(es) started by this test session still running "
                  f"{self.wait_s:g} s after its end (killed now):\n{describe(left)}")
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.section("leftover processes", sep="=", red=True, bold=True)
            reporter.line(report, red=True)
        else:
            print(report)
        kill(left)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
