"""The guard between `cliplora serve` and each child it starts (tritonserver, prometheus).

Whatever ends the child or its parent, nothing the child started may outlive it. Measured
(docs/reliability.md): a Python-backend stub busy with a request when its tritonserver is
SIGKILLed deadlocks in its own exit and lives on for good, ~85 MB each, and a stub whose
tritonserver is a zombie nobody reaps never notices at all. So each child runs under this
small process, started as a script (``python -I child_guard.py PARENT_PID GRACE_S --
COMMAND...``, standard library only):

- the child gets a process group of its own (its stubs inherit it) and ``PR_SET_PDEATHSIG``
  SIGKILL, so it dies with the guard even if the guard is SIGKILLed;
- the guard is a child subreaper (``PR_SET_CHILD_SUBREAPER``): whatever the child leaves
  behind is re-parented to the guard, not to init, so the guard can find and end it;
- once the child has exited, the guard SIGKILLs its process group and every process
  re-parented to the guard, reaps them all, removes the ``/dev/shm`` files the child had
  mapped (Triton's Python backend leaves 1 MiB per model instance when it is killed), and
  exits with the child's status (the same signal, or the same exit code);
- it checks every ``POLL_S`` that the parent that started it is still its parent (a parent
  death signal would follow the parent's *thread*, not the process), and on the parent's
  death, or on SIGHUP, SIGKILLs the child's group at once;
- SIGTERM or SIGINT is passed on to the child (tritonserver drains), and its group is
  SIGKILLed if it is still there `GRACE_S` later.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
POLL_S = 0.1
MAPS_EVERY = 10  # polls between two reads of the child's memory maps
SHM = "/dev/shm/"
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def guarded(command: list[str], grace_s: float) -> list[str]:
    """The command line that runs `command` under a guard whose parent is this process."""
    return [sys.executable, "-I", str(Path(__file__).resolve()), str(os.getpid()), f"{grace_s:g}", "--", *command]


def _processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every process, from /proc (no psutil in the image)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat_file:
                stat = stat_file.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields resume after the last ")".
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2:
            found.append((int(entry), int(fields[1]), int(fields[2])))
    return found


def children_of(pid: int) -> list[int]:
    """The pids whose parent is `pid`."""
    return [child for child, parent, _ in _processes() if parent == pid]


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}): {os.strerror(errno)}")


def _backend_region(path: str) -> bool:
    """A Python-based backend's own region (``triton_<backend>_backend_shm_region_<uuid>``),
    not one a client registered through Triton's shared-memory API: only those are ours to remove."""
    name = path.removeprefix(SHM)
    return name.startswith("triton_") and "_backend_shm_region_" in name


def _mapped_shm(pid: int) -> set[str]:
    """The Python backend's /dev/shm regions `pid` has mapped (the path is the sixth field of a maps line)."""
    found = set()
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith(SHM) and _backend_region(parts[5]):
                    found.add(parts[5].strip())
    except OSError:
        pass
    return found


def _say(text: str) -> None:
    os.write(2, f"child_guard: {text}\n".encode())


def signal_quietly(kill: object, target: int, signum: int) -> None:
    """`kill(target, signum)` (os.kill or os.killpg), ignoring a target already gone."""
    try:
        kill(target, signum)  # type: ignore[operator]
    except (ProcessLookupError, PermissionError):
        pass


class _Guard:
    def __init__(self, parent: int, grace_s: float, command: list[str]) -> None:
        self.parent = parent
        self.grace_s = grace_s
        self.command = command
        self.child = 0
        self.kill_at: float | None = None  # time.monotonic() at which the child's group gets SIGKILL
        self.status: int | None = None  # the child's wait status, once it has exited
        self.shm: set[str] = set()
        self.group_gone = False

    def _on_terminate(self, signum: int, frame: object) -> None:
        if self.kill_at is None and self.child > 0:
            signal_quietly(os.kill, self.child, signal.SIGTERM)
            self.kill_at = time.monotonic() + self.grace_s

    def _on_hangup(self, signum: int, frame: object) -> None:
        self.kill_at = time.monotonic()

    def _spawn(self) -> None:
        """Fork and exec the command. The stop signals stay blocked until the guard's handlers
        are in place (a SIGTERM in between is delivered to them, not lost), and the child
        unblocks them just before exec (the mask would survive it)."""
        guard = os.getpid()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:  # the child: own group, dies with the guard, then becomes the command
            try:
                os.setpgid(0, 0)
                _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != guard:  # the guard died before the prctl above
                    os._exit(1)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
                os.execvp(self.command[0], self.command)
            except BaseException as exc:  # noqa: BLE001 - nothing may return into the guard's code
                _say(f"cannot run {self.command[0]}: {exc}")
            os._exit(127)
        self.child = pid
        try:
            os.setpgid(pid, pid)  # also here, so that killpg works before the child got that far
        except OSError:
            pass
        signal.signal(signal.SIGTERM, self._on_terminate)
        signal.signal(signal.SIGINT, self._on_terminate)
        signal.signal(signal.SIGHUP, self._on_hangup)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def _end_everything(self) -> None:
        me = os.getpid()
        processes = _processes()
        # Once the child is reaped and its group empty, its number may be reused: leave it be.
        if self.status is not None and not any(group == self.child for _, _, group in processes):
            self.group_gone = True
        # The child's group, and whatever left it and was re-parented to us (the subreaper).
        doomed = [pid for pid, parent, group in processes
                  if pid != me and (parent == me or (group == self.child and not self.group_gone))]
        for pid in doomed:  # a stub still maps the shared memory its dead tritonserver made
            self.shm |= _mapped_shm(pid)
        if not self.group_gone:
            signal_quietly(os.killpg, self.child, signal.SIGKILL)
        for pid in doomed:
            signal_quietly(os.kill, pid, signal.SIGKILL)

    def _reap(self) -> bool:
        """Reap what has exited; True once no child of ours is left."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return True
            if pid == 0:
                return False
            if pid == self.child:
                self.status = status

    def run(self) -> int:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        if os.getppid() != self.parent:  # the parent is gone already: start nothing
            return 1
        self._spawn()
        polls = 0
        while True:
            if os.getppid() != self.parent and (self.kill_at is None or self.kill_at > time.monotonic()):
                _say(f"parent {self.parent} is gone: ending {self.command[0]} and everything it started")
                self.kill_at = time.monotonic()
            if self.status is None and polls % MAPS_EVERY == 0:
                self.shm |= _mapped_shm(self.child)
            if self.status is not None or (self.kill_at is not None and time.monotonic() >= self.kill_at):
                self._end_everything()
            if self._reap() and self.status is not None:
                break
            polls += 1
            time.sleep(POLL_S)
        for path in self.shm:
            try:
                os.unlink(path)
            except OSError:
                pass
        return self.status

    def exit_like_the_child(self, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        if code >= 0:
            sys.exit(code)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the child dumped core already, if it did
        try:
            signal.signal(-code, signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL and SIGSTOP have no handler to reset
            pass
        os.kill(os.getpid(), -code)
        sys.exit(128 - code)  # a signal that does not end a process


def main(argv: list[str]) -> None:
    if len(argv) < 5 or argv[3] != "--":
        sys.exit("usage: child_guard.py PARENT_PID GRACE_S -- COMMAND...")
    guard = _Guard(int(argv[1]), float(argv[2]), argv[4:])
    status = guard.run()
    if not guard.child:
        sys.exit(status)
    guard.exit_like_the_child(status)


if __name__ == "__main__":
    main(sys.argv)
