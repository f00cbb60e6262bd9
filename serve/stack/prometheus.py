"""A local Prometheus for `cliplora serve`, when the `prometheus` binary is installed.

It runs under `cliplora.serve.stack.child_guard` like Triton: it dies with `cliplora serve`,
whatever ends that, and a restart finds its port and data folder as it left them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cliplora.core.errors import Unavailable
from cliplora.serve.stack.processes import GuardedChild

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


class LocalPrometheus(GuardedChild):
    """A prometheus child process (`GuardedChild`)."""

    name = "prometheus"
    start_timeout_s = 30.0
    grace_s = 10.0

    def __init__(self, config: str, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 log_path: Path | None = None) -> None:
        super().__init__(log_path)
        self.binary = shutil.which("prometheus")
        self.host = host
        self.port = port
        self.config_path = self._work / "prometheus.yml"
        self.config_path.write_text(config)

    @staticmethod
    def available() -> bool:
        return shutil.which("prometheus") is not None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ready_url(self) -> str:
        return f"{self.url}/-/ready"

    def prepare(self) -> None:
        if self.binary is None:
            raise Unavailable("prometheus is not installed (apt-get install -y prometheus)")

    def command(self) -> list[str]:
        assert self.binary is not None, "prepare() first"
        return [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self._work / 'data'}",
                f"--web.listen-address={self.host}:{self.port}", "--storage.tsdb.retention.time=2d"]

    def __enter__(self) -> LocalPrometheus:
        self.start()
        return self
