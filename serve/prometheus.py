"""A local Prometheus for `cliplora serve`, when the `prometheus` binary is installed."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from cliplora.core.errors import Unavailable
from cliplora.serve.processes import stop_process, wait_http_ok

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

    def start(self, timeout_s: float = 30.0) -> LocalPrometheus:
        if self.binary is None:
            raise Unavailable("prometheus is not installed (apt-get install -y prometheus)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self._work / 'data'}",
                 f"--web.listen-address={self.host}:{self.port}", "--storage.tsdb.retention.time=2d"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        outcome = wait_http_ok(self.process, f"{self.url}/-/ready", timeout_s)
        if outcome == "ready":
            return self
        if outcome == "exited":
            raise Unavailable(f"prometheus exited with {self.process.returncode}; see {self.log_path}")
        self.stop()
        raise Unavailable(f"prometheus not ready after {timeout_s:.0f} s; see {self.log_path}")

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_process(self.process, timeout_s)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._work, ignore_errors=True)
