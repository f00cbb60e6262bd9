"""Ports for the servers tests start, that nobody else takes before the server binds them.

The old way (bind port 0, read the number, close, hand it to a child process) left a gap
between the close and the child's bind, and the kernel fills port-0 binds *and the local end
of every outgoing connection* from the same ephemeral range (/proc/sys/net/ipv4/
ip_local_port_range). A test session makes thousands of outgoing connections (health
probes, gRPC calls, HTTP scrapes), so one of them, or another session's port-0 bind, could
take the port in that gap, and the child failed with "address already in use".
SO_REUSEADDR/SO_REUSEPORT would not help: the socket that holds the port belongs to another
process. Letting each server bind port 0 and report its port would, but Triton and
Prometheus cannot report theirs.

So ports come from outside the ephemeral range, where the kernel never picks one by itself,
in blocks of `BLOCK` held by this process through an exclusive `flock` on a file per block:
two test sessions on one machine (several engineers share it) never get the same block, and
the lock goes away with the process that held it, however it ended. Each port is still
checked free (a bind to it) before it is handed out, against anything else that listens there.
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
import tempfile
import threading
from pathlib import Path
from typing import IO

BLOCK = 64
LOCK_DIR = Path(tempfile.gettempdir()) / "cliplora-test-ports"
EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def port_range(ephemeral: tuple[int, int] | None = None) -> range:
    """The larger stretch of unprivileged ports (from 10000) below or above the ephemeral range."""
    if ephemeral is None:
        try:
            low, high = (int(n) for n in EPHEMERAL.read_text().split())
        except OSError:
            low, high = 32768, 60999  # Linux's default
    else:
        low, high = ephemeral
    below, above = range(10000, max(10000, low)), range(min(high + 1, 65536), 65536)
    return max(below, above, key=len)


class PortPool:
    """Hands out ports of `ports`, a block at a time, each at most once per process."""

    def __init__(self, ports: range, lock_dir: Path = LOCK_DIR) -> None:
        self.blocks = [ports[i:i + BLOCK] for i in range(0, len(ports) - BLOCK + 1, BLOCK)]
        self.lock_dir = lock_dir
        self._held: list[IO[bytes]] = []  # open lock files: closing one would free its block
        self._free: list[int] = []
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            while True:
                while self._free:
                    port = self._free.pop(0)
                    if bindable(port):
                        return port
                self._free = list(self._reserve_block())

    def _reserve_block(self) -> range:
        """The next block no other process holds, from a random place in the range."""
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        start = random.randrange(len(self.blocks))
        for block in self.blocks[start:] + self.blocks[:start]:
            file = open(self.lock_dir / f"{block.start}.lock", "ab")  # kept open: it holds the lock
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.close()
                continue
            self._held.append(file)
            self.blocks.remove(block)  # used once in this process
            return block
        raise RuntimeError(f"every block of test ports in {self.blocks} is taken (see {self.lock_dir})")


def bindable(port: int) -> bool:
    """Whether nothing holds `port` on any IPv4 address (a bind succeeds; TIME_WAIT counts as held)."""
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


_POOL = PortPool(port_range())


def free_port() -> int:
    """A port for a server this test starts: outside the ephemeral range, reserved for this
    process, free when handed out, never handed out twice."""
    return _POOL.take()


def _reset_after_fork() -> None:  # a forked child would share the parent's blocks
    global _POOL
    _POOL = PortPool(port_range())


os.register_at_fork(after_in_child=_reset_after_fork)
