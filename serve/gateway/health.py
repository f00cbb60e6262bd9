"""grpc.health.v1 status that follows Triton's readiness.

SERVING while Triton answers ready, NOT_SERVING otherwise and during shutdown; probed
every `interval_s` (0.5 s by default: a dead Triton shows within a second), each probe cut
at `timeout_s` (1 s by default: a hung Triton, which accepts connections but never
answers, shows within 1.5 s instead of the Triton client's 5 s control timeout).
"""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health, health_pb2

from cliplora.core.errors import InvalidArgument
from cliplora.serve.gateway.metrics import GatewayMetrics
from cliplora.serve.gateway.triton import Triton

log = logging.getLogger(__name__)
SERVICE = "cliplora.v1.Classifier"


class TritonHealth:
    def __init__(self, triton: Triton, metrics: GatewayMetrics, interval_s: float, timeout_s: float = 1.0) -> None:
        if timeout_s <= 0:
            raise InvalidArgument(f"health_timeout_s must be positive, got {timeout_s}")
        self.servicer = health.aio.HealthServicer()
        self.triton = triton
        self.metrics = metrics
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.serving: bool | None = None
        self.shutting_down = False

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE):
            await self.servicer.set(service, status)
        self.metrics.triton_ready.set(1 if serving else 0)
        if serving != self.serving:
            log.info("health: %s (Triton at %s)", "SERVING" if serving else "NOT_SERVING", self.triton.url)
        self.serving = serving

    async def run(self) -> None:
        """Probe forever; refresh the model list whenever Triton comes (back) up."""
        while not self.shutting_down:
            ready = await self.probe()
            if ready and not self.serving:
                await self.triton.refresh()
            if not self.shutting_down:
                await self.set_serving(ready)
            await asyncio.sleep(self.interval_s)

    async def probe(self) -> bool:
        """One readiness probe; False when Triton does not answer within `timeout_s`.

        `asyncio.timeout`, not `wait_for`: Python 3.11's `wait_for` swallows a cancellation that
        arrives just as the probe finishes, and a cancelled health task then probes on and
        `GatewayServer.stop` waits for it forever.
        """
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self.triton.ready()
        except TimeoutError:
            return False

    async def shutdown(self) -> None:
        self.shutting_down = True
        await self.set_serving(False)
