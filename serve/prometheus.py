"""A local Prometheus for `cliplora serve`, when the `prometheus` binary is installed.

It runs under `cliplora.serve.child_guard` like Triton: it dies with `cliplora serve`,
whatever ends that, and a restart finds its port and data folder as it left them.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from cliplora.core.errors import Unavailable
from cliplora.serve.processes import (
    KILL_WAIT_S,
    kill_guarded,
    start_guarded,
    stop_guarded,
    wait_http_ok,
)

SCRAPE_INTERVAL = "5s"
DEFAULT_PORT = 9090


def render_config(gateway_metrics: str, triton_metrics: str | None, interval: str = SCRAPE_INTERVAL) -> str:
    """Scrape the gateway (and the local Triton) every `interval` (5 s by default)."""
    jobs = [("cliplora-gateway", gateway_metrics)]
    if triton_metrics:
        jobs.append(("triton", triton_metrics))
    lines = ["global:", f"  scrape_interval: {interval}", f"  evaluation_interval: {interval}",
             "scrape_configs:"]
    for job, target in jobs:
        lines += [f"  - job_name: {job}", "    static_configs:", f"      - targets: ['{target}']"]
    return "\n".join(lines) + "\n"


class LocalPrometheus:
    """A prometheus child process; `process` is its guard (`cliplora.serve.child_guard`)."""

    name = "prometheus"
    start_timeout_s = 30.0
    GRACE_S = 10.0

    def __init__(self, config: str, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 log_path: Path | None = None) -> None:
        self.binary = shutil.which("prometheus")
        self.host = host
        self.port = port
        self._work = Path(tempfile.mkdtemp(prefix="cliplora-prometheus-"))
        self.config_path = self._work / "prometheus.yml"
        self.config_path.write_text(config)
        self.log_path = log_path or self._work / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("prometheus") is not None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ready_url(self) -> str:
        return f"{self.url}/-/ready"

    def launch(self) -> None:
        """Start prometheus (under its guard) and return at once; `start` also waits."""
        if self.binary is None:
            raise Unavailable("prometheus is not installed (apt-get install -y prometheus)")
        self.process = start_guarded(
            [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self._work / 'data'}",
             f"--web.listen-address={self.host}:{self.port}", "--storage.tsdb.retention.time=2d"],
            self.log_path, grace_s=self.GRACE_S)

    def start(self, timeout_s: float = start_timeout_s) -> LocalPrometheus:
        self.launch()
        assert self.process is not None
        outcome = wait_http_ok(self.process, self.ready_url, timeout_s)
        if outcome == "ready":
            return self
        if outcome == "exited":
            raise Unavailable(f"prometheus exited with {self.process.returncode}; see {self.log_path}")
        self.stop()
        raise Unavailable(f"prometheus not ready after {timeout_s:.0f} s; see {self.log_path}")

    def stop(self, timeout_s: float = GRACE_S + KILL_WAIT_S) -> None:
        stop_guarded(self.process, timeout_s)
        self.process = None

    def kill_group(self) -> None:
        kill_guarded(self.process)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._work, ignore_errors=True)
