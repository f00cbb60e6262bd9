"""Child processes of the local stack (Triton, Prometheus): one lifecycle, `GuardedChild`,
for starting them under a guard, waiting until they answer, stopping them for sure and
saying how they ended."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import ClassVar, Literal

from cliplora.core.errors import FailedPrecondition, Unavailable
from cliplora.serve.stack.child_guard import children_of, guarded, signal_quietly

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
    """Start `command` under `cliplora.serve.stack.child_guard`, output appended to `log_path`.

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


class GuardedChild:
    """A child of the local stack (`LocalTriton`, `LocalPrometheus`), run under its guard
    (`cliplora.serve.stack.child_guard`) with a private work folder and a log file.

    Subclasses say what to run (`command`, `environment`, `prepare`) and where it answers
    when ready (`ready_url`); the lifecycle is the same for all: `launch` (return at once;
    what `Supervisor` calls) or `start` (launch and wait until ready), `stop` (SIGTERM, it
    drains, then its group SIGKILLed after `grace_s`), `kill_group` (everything it started,
    SIGKILLed now), `cleanup` (stop, then remove the work folder). `process` is the guard,
    which exits as the command did.
    """

    name: ClassVar[str]
    start_timeout_s: ClassVar[float]
    grace_s: ClassVar[float]  # SIGTERM to SIGKILL of its group, counted by the guard

    def __init__(self, log_path: Path | None = None) -> None:
        self._work = Path(tempfile.mkdtemp(prefix=f"cliplora-{self.name}-"))
        self.log_path = Path(log_path) if log_path else self._work / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ready_url(self) -> str:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """The child's environment; None: this process's own."""
        return None

    def prepare(self) -> None:
        """What must exist before the command can start (checked again at every launch)."""

    def launch(self) -> None:
        """Start the command under its guard and return at once."""
        self.prepare()
        self.process = start_guarded(self.command(), self.log_path, env=self.environment(), grace_s=self.grace_s)

    def start(self, timeout_s: float | None = None) -> GuardedChild:
        self.launch()
        self.wait_ready(self.start_timeout_s if timeout_s is None else timeout_s)
        return self

    def is_ready(self) -> bool:
        return http_ok(self.ready_url)

    def wait_ready(self, timeout_s: float) -> None:
        """Until `ready_url` answers; FailedPrecondition if the command exits first,
        Unavailable (after stopping it) if `timeout_s` passes. Both quote the log's end."""
        assert self.process is not None, "launch() first"
        outcome = wait_http_ok(self.process, self.ready_url, timeout_s)
        if outcome == "ready":
            return
        if outcome == "exited":
            raise FailedPrecondition(f"{self.name} {describe_exit(self.process.returncode)}; the end of "
                                     f"{self.log_path}:\n{self.log_tail()}")
        self.stop()
        raise Unavailable(f"{self.name} not ready after {timeout_s:.0f} s; the end of {self.log_path}:\n"
                          f"{self.log_tail()}")

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def command_pid(self) -> int | None:
        """The command itself (the guard's only child); None when not running."""
        return guarded_pid(self.process)

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM (it drains), then its whole process group SIGKILLed after the guard's grace
        period; `timeout_s` (default: that grace and the kill) bounds the wait."""
        stop_guarded(self.process, self.grace_s + KILL_WAIT_S if timeout_s is None else timeout_s)
        self.process = None

    def kill_group(self) -> None:
        """The command and everything it started SIGKILLed now (a hung child, a restart)."""
        kill_guarded(self.process)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> GuardedChild:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
