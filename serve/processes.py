"""Child processes of the local stack (Triton, Prometheus): waiting until they answer,
stopping them for sure."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from typing import Literal


def http_ok(url: str) -> bool:
    """True when `url` answers 200 within a second."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
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
