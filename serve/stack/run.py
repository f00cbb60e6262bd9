"""The local stack of `cliplora serve`: the gateway in front of a supervised local Triton
and Prometheus (when installed) on this machine. (With an existing Triton, `cliplora serve
--triton-url` runs the gateway alone: `cliplora.serve.gateway.server.run_gateway`.)

Order: every setting, the token file and the TLS files are checked first; then the
gateway starts (its ports bound, NOT_SERVING), then Prometheus, then Triton, each under a
`Supervisor` (serve/stack/supervisor.py) that restarts it when it exits or hangs. The gateway
itself never restarts: it answers UNAVAILABLE while Triton is away and turns SERVING
again by itself. Ctrl-C / SIGTERM drains the gateway, then stops the children.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import replace
from pathlib import Path

from cliplora.core.errors import InvalidArgument, PermissionDenied
from cliplora.core.repository import ModelRepository
from cliplora.serve.gateway.server import GatewayServer, check_distinct_ports, endpoint_lines
from cliplora.serve.gateway.server import check_before_start as check_gateway
from cliplora.serve.gateway.settings import GatewaySettings
from cliplora.serve.stack.processes import GuardedChild
from cliplora.serve.stack.prometheus import DEFAULT_PORT as DEFAULT_PROMETHEUS_PORT
from cliplora.serve.stack.prometheus import LocalPrometheus, render_config
from cliplora.serve.stack.supervisor import ReadinessProbe, RestartPolicy, Supervisor
from cliplora.serve.stack.triton_launcher import LocalTriton, TritonPorts

log = logging.getLogger(__name__)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_stack(
    settings: GatewaySettings,
    repository: Path,
    log_dir: Path,
    *,
    triton_ports: TritonPorts = TritonPorts(),
    prometheus_port: int = DEFAULT_PROMETHEUS_PORT,
    restart_policy: RestartPolicy = RestartPolicy(),
    triton_probe: ReadinessProbe = ReadinessProbe(),
) -> None:
    """Blocks until Ctrl-C / SIGTERM; stops everything it started. Raises `Unavailable`
    (after stopping everything) when a child failed more often than `restart_policy` allows."""
    triton = LocalTriton(repository, ports=triton_ports, log_path=log_dir / "triton.log")
    try:
        wants_prometheus = _wants_prometheus(settings)
        check_before_start(settings, log_dir, triton, prometheus_port if wants_prometheus else None)
        asyncio.run(_serve_stack(settings, triton, log_dir, prometheus_port if wants_prometheus else None,
                                 restart_policy, triton_probe))
    except KeyboardInterrupt:
        pass
    finally:
        triton.cleanup()


def check_before_start(settings: GatewaySettings, log_dir: Path, triton: LocalTriton,
                       prometheus_port: int | None = None) -> None:
    """What can be known wrong before any child process starts: the gateway's own checks
    (`cliplora.serve.gateway.server.check_before_start`), then the repository, the Triton
    wheel, ports given twice and the log folder. (GatewaySettings, RestartPolicy and
    ReadinessProbe check themselves when built.)"""
    ports = check_gateway(settings)
    triton.prepare()
    ports |= {"Triton HTTP": triton.ports.http, "Triton gRPC": triton.ports.grpc,
              "Triton metrics": triton.ports.metrics}
    if prometheus_port is not None:
        if not 1 <= prometheus_port <= 65535:
            raise InvalidArgument(f"--prometheus-port must be in 1..65535, got {prometheus_port}")
        ports["--prometheus-port"] = prometheus_port
    check_distinct_ports(ports)
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionDenied(f"cannot create the log folder {log_dir}: {exc}") from None


async def _serve_stack(settings: GatewaySettings, triton: LocalTriton, log_dir: Path, prometheus_port: int | None,
                       policy: RestartPolicy, probe: ReadinessProbe) -> None:
    stack = _Stack(settings, triton, log_dir, policy, probe)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stack.stopping.set)
    try:
        await stack.run(prometheus_port)
    finally:
        _say("stopping ...")
        failures = await stack.shut_down()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        _say("stopped")
    if failures:
        raise failures[0]


class _Stack:
    """The gateway and the supervised children of one `cliplora serve`, so that shutting
    down finds whatever was started."""

    def __init__(self, settings: GatewaySettings, triton: LocalTriton, log_dir: Path, policy: RestartPolicy,
                 probe: ReadinessProbe) -> None:
        self.settings = replace(settings, triton_url=triton.grpc_url)
        self.gateway = GatewayServer(self.settings)
        self.triton = triton
        self.log_dir = log_dir
        self.policy = policy
        self.probe = probe
        self.stopping = asyncio.Event()  # Ctrl-C / SIGTERM
        self.supervisors: list[tuple[Supervisor, asyncio.Task[None]]] = []
        self.prometheus: LocalPrometheus | None = None
        self.gateway_started = False

    async def run(self, prometheus_port: int | None) -> None:
        """The gateway (NOT_SERVING), then Prometheus, then Triton; until a stop is asked for
        or a supervisor gives up."""
        await self.gateway.start()
        self.gateway_started = True
        if prometheus_port is not None:
            await self._start_prometheus(prometheus_port)
        if not self.stopping.is_set() and not any(task.done() for task in self._tasks()):
            await self._run_triton()

    async def _start_prometheus(self, port: int) -> None:
        """Up (or failed) before Triton starts: SERVING then means the whole stack is there."""
        config = render_config(f"{self.settings.host}:{self.gateway.metrics_port}",
                               f"{self.triton.host}:{self.triton.ports.metrics}")
        self.prometheus = LocalPrometheus(config, port=port, log_path=self.log_dir / "prometheus.log")
        settled = self._supervise(self.prometheus, replace(self.probe, hang_s=0)).settled
        await _first_of(settled.wait(), self.stopping.wait(), *self._tasks())

    async def _run_triton(self) -> None:
        _say(f"starting Triton on {self.triton.repository} (log: {self.triton.log_path}) ...")
        ready = self._supervise(self.triton, self.probe).ready
        if await _first_of(ready.wait(), self.stopping.wait(), *self._tasks()) == 0:
            shown = self.settings
            if shown.metrics_port >= 0:
                shown = replace(shown, metrics_port=self.gateway.metrics_port)
            _print_endpoints(shown, self.triton, self.prometheus)
            await _first_of(self.stopping.wait(), *self._tasks())

    def _supervise(self, child: GuardedChild, probe: ReadinessProbe) -> Supervisor:
        supervisor = Supervisor(child, self.policy, probe, self.gateway.metrics.stack_restarts)
        self.supervisors.append((supervisor, asyncio.create_task(supervisor.run(), name=f"supervise {child.name}")))
        return supervisor

    def _tasks(self) -> list[asyncio.Task[None]]:
        return [task for _, task in self.supervisors]

    async def shut_down(self) -> list[BaseException]:
        """The gateway drained, then every child stopped; every step runs even if one before
        it failed (no child may be left). Returns what failed, the supervisors' give-ups too."""
        failures: list[BaseException] = []
        if self.gateway_started:
            try:
                await self.gateway.stop()
            except Exception as exc:
                log.exception("stopping the gateway failed")
                failures.append(exc)
        for supervisor, _ in self.supervisors:
            supervisor.request_stop()
        failures += [exc for exc in await asyncio.gather(*self._tasks(), return_exceptions=True)
                     if isinstance(exc, BaseException)]
        await asyncio.gather(*(supervisor.stop_child() for supervisor, _ in self.supervisors), return_exceptions=True)
        if self.prometheus is not None:
            self.prometheus.cleanup()
        return failures


async def _first_of(*awaitables: object) -> int:
    """Wait for the first of `awaitables` to finish; its index. The others are left running
    if they are tasks, cancelled otherwise."""
    futures = [a if isinstance(a, asyncio.Future) else asyncio.ensure_future(a) for a in awaitables]  # type: ignore[arg-type]
    done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    for future, awaitable in zip(futures, awaitables, strict=True):
        if future is not awaitable:
            future.cancel()
    return min(futures.index(f) for f in done)


def _wants_prometheus(settings: GatewaySettings) -> bool:
    """Only for the local stack: `--triton-url` promises the gateway alone (its operator
    monitors it), and with `--metrics-port -1` there is nothing of ours to scrape."""
    return settings.metrics_port >= 0 and LocalPrometheus.available()


def _print_endpoints(settings: GatewaySettings, triton: LocalTriton, prometheus: LocalPrometheus | None) -> None:
    found = ModelRepository(triton.repository)  # classifiers only: text encoders are named by their model
    models = [m for m in found.model_names() if found.text_encoder_of(m) is None]
    lines = ["", "cliplora is serving:", *endpoint_lines(settings),
             f"  Triton HTTP / gRPC / metrics                              {triton.http_url} / "
             f"{triton.grpc_url} / {triton.metrics_url}"]
    if prometheus:
        lines += [f"  Prometheus                                                {prometheus.url}"]
    elif settings.metrics_port < 0:
        lines += ["  Prometheus                                                off (gateway metrics are off)"]
    else:
        lines += ["  Prometheus                                                not installed (apt-get install -y prometheus)"]
    lines += ["  supervised: Triton and Prometheus restart when they exit or hang (logs in "
              f"{triton.log_path.parent})"]
    if models:
        lines += [f"  models: {', '.join(models)}", "",
                  "try:", f"  .venv/bin/cliplora classify --target {settings.host}:{settings.grpc_port} "
                  f"--model {models[-1]} --top-k 3 IMAGE.jpg"]
    lines += ["", "Ctrl-C stops everything.", ""]
    _say("\n".join(lines))
