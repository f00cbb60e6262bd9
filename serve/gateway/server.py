"""The gateway process: gRPC server, the HTTP door, health, reflection, metrics, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cliplora.core.errors import InvalidArgument, Unavailable
from cliplora.serve.gateway.decode_pool import DecodePool
from cliplora.serve.gateway.health import TritonHealth
from cliplora.serve.gateway.metrics import GatewayMetrics
from cliplora.serve.gateway.security import (
    BearerTokenInterceptor,
    http_ssl_context,
    load_tokens,
    server_credentials,
)
from cliplora.serve.gateway.service import ClassifierService
from cliplora.serve.gateway.settings import GatewaySettings
from cliplora.serve.gateway.triton import Triton
from cliplora.serve.gateway.web.app import HttpDoor
from cliplora.v1 import classifier_pb2 as pb
from cliplora.v1 import classifier_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVER_CUT_AFTER_S = 2.0  # past the grace period: time for the UNAVAILABLE replies to go out


class GatewayServer:
    """Start with `start()`, stop with `stop()`; `port`, `http_port` and `metrics_port` are
    the bound ports (`http_port` 0: no HTTP door)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.metrics = GatewayMetrics()
        self.triton: Triton | None = None
        self.health: TritonHealth | None = None
        self.service: ClassifierService | None = None
        self.server: grpc.aio.Server | None = None
        self.http: HttpDoor | None = None
        self.port = 0
        self.http_port = 0
        self.metrics_port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._pool = DecodePool(settings.pool_workers, self.metrics)
        self._stopping = asyncio.Event()  # stop() began: refuse new calls
        self._stopped = asyncio.Event()  # stop() finished: in-flight calls drained, all released

    async def start(self) -> None:
        s = self.settings
        self.triton = Triton(s.triton_url, s.triton_renew_s)
        self.health = TritonHealth(self.triton, self.metrics, s.health_interval_s, s.health_timeout_s)
        self.service = ClassifierService(s, self.triton, self.metrics, self._pool)
        self.triton.on_refresh.append(self.service.catalogue.publish_model_info)
        tokens = load_tokens(s.auth_tokens_file)
        interceptors = [BearerTokenInterceptor(tokens, self.metrics.unauthenticated.inc)] if tokens else []
        self.server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ])
        pb_grpc.add_ClassifierServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.server)
        reflection.enable_server_reflection((
            pb.DESCRIPTOR.services_by_name["Classifier"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ), self.server)
        address = f"{s.host}:{s.grpc_port}"
        if s.tls_cert is not None and s.tls_key is not None:
            self.port = self.server.add_secure_port(address, server_credentials(s.tls_cert, s.tls_key, s.tls_client_ca))
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise Unavailable(f"cannot listen on {s.host}:{s.grpc_port} for gRPC: choose another --grpc-port")
        await self.health.set_serving(False)
        await self.server.start()
        if s.http_port:
            tls = http_ssl_context(s.tls_cert, s.tls_key, s.tls_client_ca) if s.tls_cert and s.tls_key else None
            self.http = HttpDoor(s, self.service, self.health, self.metrics, self._pool, tokens, tls)
            try:
                self.http_port = await self.http.start()
            except BaseException:
                await self.server.stop(0)  # not half a gateway: gRPC goes too
                raise
        if s.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(s.metrics_port, s.host)
        self._tasks = [asyncio.create_task(self.health.run(), name="health"),
                       asyncio.create_task(self._refresh_loop(), name="refresh")]
        log.info("gateway listening on %s:%d (%s%s; HTTP :%d; metrics :%d), Triton at %s", s.host, self.port,
                 "TLS" if s.tls_cert else "plaintext", ", mutual TLS" if s.tls_client_ca else "",
                 self.http_port, self.metrics_port, s.triton_url)
        if tokens:
            log.info("bearer-token auth on (%d tokens); health stays open", len(tokens))

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_interval_s)
            try:
                await self.triton.renew_if_due()
                if self.health.serving:
                    await self.triton.refresh()
            except Exception:  # one bad round must not end discovery for good
                log.exception("model discovery round failed; retrying in %.1f s", self.settings.refresh_interval_s)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish within the grace period, release all.

        A second call (a second signal) waits for the first to finish instead of cutting
        the drain short.
        """
        if self._stopping.is_set():
            await self._stopped.wait()
            return
        self._stopping.set()
        grace_s = self.settings.grace_s if grace is None else grace
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("refuse new calls", self._refuse_new), ("drain the calls", lambda: self._drain(grace_s)),
            ("close the HTTP door", self._close_http), ("stop the tasks", self._stop_tasks),
            ("close the Triton client", self._close_triton)]
        # Every step runs even if one before it failed: the process must not hang on exit.
        failure: Exception | None = None
        for name, step in steps:
            try:
                await step()
            except Exception as exc:
                log.exception("shutdown step %r failed", name)
                failure = failure or exc
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()
        self._stopped.set()
        if failure is not None:
            raise failure

    async def _refuse_new(self) -> None:
        """Health NOT_SERVING, the HTTP door's /v1/ answering 503."""
        if self.http is not None:
            self.http.refuse_new()
        if self.health is not None:
            await self.health.shutdown()

    async def _drain(self, grace_s: float) -> None:
        """gRPC refuses new calls at once; the service ends whatever is still running (of
        both doors: their calls are admission's) when the grace period is over with
        UNAVAILABLE, and gRPC's own cut (a bare CANCELLED to the caller) comes only after
        that, as a last resort."""
        if self.server is not None:
            stopping = asyncio.ensure_future(self.server.stop(grace_s + SERVER_CUT_AFTER_S))
            try:
                if self.service is not None:
                    await self.service.admission.drain(grace_s)
            finally:
                await stopping

    async def _close_http(self) -> None:
        if self.http is not None:
            await self.http.stop()

    async def _stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _close_triton(self) -> None:
        if self.triton is not None:
            await self.triton.close()

    async def wait(self) -> None:
        """Until `stop()` has *finished*: returning earlier would let ``asyncio.run`` cancel the
        drain (and with it the calls still in flight) on its way out."""
        await self._stopped.wait()


def check_before_start(settings: GatewaySettings) -> dict[str, int]:
    """What can be known wrong before the gateway starts: the token file and its tokens, the
    TLS files (for both doors), and its ports given twice. Returns its ports by flag, for the local
    stack to add its own to (`check_distinct_ports`)."""
    load_tokens(settings.auth_tokens_file)
    if settings.tls_cert is not None and settings.tls_key is not None:
        server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        if settings.http_port:
            http_ssl_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    if settings.health_timeout_s <= 0:
        raise InvalidArgument(f"health_timeout_s must be positive, got {settings.health_timeout_s}")
    ports = {"--grpc-port": settings.grpc_port, "--metrics-port": settings.metrics_port,
             "--http-port": settings.http_port}
    check_distinct_ports(ports)
    return ports


def check_distinct_ports(ports: dict[str, int]) -> None:
    """InvalidArgument naming both flags when one port is given twice (0: any free port and
    -1: off are never a clash)."""
    named: dict[int, str] = {}
    for name, port in ports.items():
        if port > 0 and port in named:
            raise InvalidArgument(f"port {port} is given twice: {named[port]} and {name}")
        named[port] = name


def endpoint_lines(settings: GatewaySettings) -> list[str]:
    """The gateway's addresses, as `cliplora serve` prints them."""
    metrics = f"http://{settings.host}:{settings.metrics_port}/metrics" if settings.metrics_port >= 0 else "off"
    lines = [f"  gateway (gRPC cliplora.v1.Classifier, health, reflection)  {settings.host}:{settings.grpc_port}"]
    if settings.http_port:
        scheme = "https" if settings.tls_cert else "http"
        door = f"{scheme}://{settings.host}:{settings.http_port}"
        lines += [f"  gateway HTTP (REST, OpenAI /v1/embeddings, /openapi.json)  {door}/v1/",
                  f"  playground                                                {door}/"]
    return [*lines, f"  gateway metrics                                           {metrics}"]


def run_gateway(settings: GatewaySettings) -> None:
    """`cliplora serve --triton-url`: the gateway alone, in front of an existing Triton (what
    the gateway image runs), until Ctrl-C / SIGTERM. It writes no files: its container's
    filesystem may be read-only."""
    check_before_start(settings)
    print("\n".join(["", "cliplora gateway:", *endpoint_lines(settings),
                     f"  Triton (existing)                                         {settings.triton_url}",
                     "", "Ctrl-C stops it.", ""]), file=sys.stderr, flush=True)
    try:
        asyncio.run(serve_until_signalled(settings))
    except KeyboardInterrupt:
        pass


async def serve_until_signalled(settings: GatewaySettings) -> None:
    """Run a gateway until SIGINT or SIGTERM, then shut it down gracefully."""
    gateway = GatewayServer(settings)
    await gateway.start()
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []  # a strong reference: the loop keeps only weak ones
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stopping.append(loop.create_task(gateway.stop())))
    await gateway.wait()
