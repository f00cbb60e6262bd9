"""Child processes of the local stack (Triton, Prometheus): starting them under a guard,
waiting until they answer, stopping them for sure, saying how they ended."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Literal

from cliplora.serve.child_guard import children_of, guarded, signal_quietly

KILL_WAIT_S = 5.0  # a guard ends its child's group at once on SIGHUP: this is only a bound


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    """True when `url` answers 200 within `timeout_s`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):  # TimeoutError is an OSError
        return False


def wait_http_ok(process: subprocess.Popen[bytes], url: str, timeout_s: float) -> Literal["ready", "exited", "timeout"]:
    """Poll `url` every 0.2 s until it answers 200, the child exits, or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return "exited"
        if http_ok(url):
            return "ready"
        time.sleep(0.2)
    return "timeout"


def stop_process(process: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
    """SIGTERM (the child drains), then SIGKILL if it is still there after `timeout_s`."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_guarded(command: list[str], log_path: Path, *, grace_s: float,
                  env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `command` under `cliplora.serve.child_guard`, output appended to `log_path`.

    The returned process is the guard; it exits as the command did (same code or signal)
    once nothing the command started is left. Its own session keeps a terminal's Ctrl-C
    away from it: the stack stops its children itself, in order.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(guarded(command, grace_s), stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def guarded_pid(guard: subprocess.Popen[bytes] | None) -> int | None:
    """The pid of the command a guard runs (None before it started or after it ended)."""
    if guard is None or guard.poll() is not None:
        return None
    children = children_of(guard.pid)
    return children[0] if len(children) == 1 else None


def stop_guarded(guard: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
    """SIGTERM to the guard (the command drains; the guard ends its group after its own
    grace period), then SIGHUP (its group SIGKILLed at once), SIGKILL only as a last resort."""
    if guard is None or guard.poll() is not None:
        return
    guard.terminate()
    try:
        guard.wait(timeout_s)
    except subprocess.TimeoutExpired:
        kill_guarded(guard)


def kill_guarded(guard: subprocess.Popen[bytes] | None) -> None:
    """The command's whole process group SIGKILLed now (SIGHUP to its guard), then waited for.

    If the guard itself is stuck, it is SIGKILLed and the command dies by PDEATHSIG, but
    what the command started (Triton's stubs) would be re-parented to init: so the
    command's process group, which it leads, is SIGKILLed from here as well.
    """
    if guard is None or guard.poll() is not None:
        return
    group = guarded_pid(guard)
    guard.send_signal(signal.SIGHUP)
    try:
        guard.wait(KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        guard.kill()
        guard.wait()
        if group is not None:
            signal_quietly(os.killpg, group, signal.SIGKILL)


def describe_exit(returncode: int) -> str:
    """'exited with status 1' or 'killed by signal 9 (SIGKILL)', from a Popen returncode."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = "unknown"
    return f"killed by signal {-returncode} ({name})"
