"""`cliplora serve`: Triton + gateway (+ Prometheus when installed) on this machine."""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import replace
from pathlib import Path

from cliplora.core.repository import ModelRepository
from cliplora.serve.prometheus import DEFAULT_PORT as DEFAULT_PROMETHEUS_PORT
from cliplora.serve.prometheus import LocalPrometheus, render_config
from cliplora.serve.server import serve_until_signalled
from cliplora.serve.settings import GatewaySettings
from cliplora.serve.triton_launcher import LocalTriton, TritonPorts

log = logging.getLogger(__name__)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_stack(
    settings: GatewaySettings,
    repository: Path,
    log_dir: Path,
    *,
    start_triton: bool,
    triton_ports: TritonPorts = TritonPorts(),
    prometheus_port: int = DEFAULT_PROMETHEUS_PORT,
) -> None:
    """Blocks until Ctrl-C / SIGTERM; stops everything it started."""
    triton: LocalTriton | None = None
    prometheus: LocalPrometheus | None = None
    try:
        if start_triton:
            _say(f"starting Triton on {repository} (log: {log_dir / 'triton.log'}) ...")
            triton = LocalTriton(repository, ports=triton_ports, log_path=log_dir / "triton.log").start()
            settings = replace(settings, triton_url=triton.grpc_url)
        if _wants_prometheus(settings, triton):
            config = render_config(f"{settings.host}:{settings.metrics_port}",
                                   f"{triton.host}:{triton.ports.metrics}" if triton else None)
            prometheus = LocalPrometheus(config, port=prometheus_port, log_path=log_dir / "prometheus.log").start()
        _print_endpoints(settings, repository, triton, prometheus)
        asyncio.run(serve_until_signalled(settings))
    except KeyboardInterrupt:
        pass
    finally:
        _say("stopping ...")
        if prometheus:
            prometheus.cleanup()
        if triton:
            triton.cleanup()
        _say("stopped")


def _wants_prometheus(settings: GatewaySettings, triton: LocalTriton | None) -> bool:
    """Only for the local stack: `--triton-url` promises the gateway alone (its operator
    monitors it), and with `--metrics-port -1` there is nothing of ours to scrape."""
    return triton is not None and settings.metrics_port >= 0 and LocalPrometheus.available()


def _print_endpoints(settings: GatewaySettings, repository: Path, triton: LocalTriton | None,
                     prometheus: LocalPrometheus | None) -> None:
    models = ModelRepository(repository).model_names() if triton else []
    lines = [
        "",
        "cliplora is serving:",
        f"  gateway (gRPC cliplora.v1.Classifier, health, reflection)  {settings.host}:{settings.grpc_port}",
        "  gateway metrics                                           "
        + (f"http://{settings.host}:{settings.metrics_port}/metrics" if settings.metrics_port >= 0 else "off"),
    ]
    if triton:
        lines += [f"  Triton HTTP / gRPC / metrics                              {triton.http_url} / "
                  f"{triton.grpc_url} / {triton.metrics_url}"]
    else:
        lines += [f"  Triton (existing)                                         {settings.triton_url}"]
    if prometheus:
        lines += [f"  Prometheus                                                {prometheus.url}"]
    elif triton is None:
        lines += ["  Prometheus                                                not started (gateway only)"]
    elif settings.metrics_port < 0:
        lines += ["  Prometheus                                                off (gateway metrics are off)"]
    else:
        lines += ["  Prometheus                                                not installed (apt-get install -y prometheus)"]
    if models:
        lines += [f"  models: {', '.join(models)}", "",
                  "try:", f"  .venv/bin/cliplora classify --target {settings.host}:{settings.grpc_port} "
                  f"--model {models[-1]} --top-k 3 IMAGE.jpg"]
    lines += ["", "Ctrl-C stops everything.", ""]
    _say("\n".join(lines))
