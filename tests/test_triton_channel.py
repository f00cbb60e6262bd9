"""The gateway's Triton channel: round-robin over replicas, and renewal that loses no call."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import numpy as np
import pytest
from grpc.aio import UsageError

from cliplora.core.errors import InvalidArgument
from cliplora.serve.gateway.settings import GatewaySettings
from cliplora.serve.gateway.triton import Triton
from cliplora.serve.stack.triton_launcher import LocalTriton
from tests.serving import gateway_process, metrics_text, triton_ports, until


@pytest.fixture(scope="module")
def repository(tiny_repository) -> Path:
    return tiny_repository


@pytest.fixture(scope="module")
def triton(tiny_triton):
    return tiny_triton


def _inferences(server: LocalTriton, model: str) -> int:
    text = metrics_text(server.metrics_url)
    counts = re.findall(rf'^nv_inference_request_success{{model="{model}",version="1"}} (\d+)', text, re.M)
    return int(counts[0]) if counts else 0


async def test_calls_are_spread_over_every_resolved_replica(repository, triton) -> None:
    """Two Tritons behind one target (as a headless Service resolves to each pod)."""
    first = triton
    with LocalTriton(repository, ports=triton_ports()) as second:
        client = Triton(f"ipv4:127.0.0.1:{first.ports.grpc},127.0.0.1:{second.ports.grpc}")
        try:
            entry = (await client.refresh())["base"]
            before = (_inferences(first, "base"), _inferences(second, "base"))
            batch = np.zeros((1, entry.image_size, entry.image_size, 3), dtype=np.uint8)
            answered = {(await client.infer_images(entry.route(i % 2, text=False), batch, timeout_s=30))[1]
                        for i in range(20)}
            # Triton counts a request just after its reply: on a loaded machine the last may lag.
            deadline = time.monotonic() + 10
            while True:
                after = (_inferences(first, "base"), _inferences(second, "base"))
                if sum(after) - sum(before) >= 20 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
        finally:
            await client.close()
    served = (after[0] - before[0], after[1] - before[1])
    assert sum(served) == 20 and min(served) >= 6, served  # round robin: 10 and 10; pick-first: 20 and 0
    assert answered == {1}  # version 0 (latest) is answered by, and reported as, the replica's latest


async def test_renewal_waits_for_the_calls_on_the_old_channel(triton) -> None:
    client = Triton(triton.grpc_url, renew_s=1e-6)
    try:
        assert await client.ready()
        old = client.client
        async with client._channel() as in_use:  # a call in flight across the renewal
            assert await client.renew_if_due()
            assert client.client is not old and old in client._retired
            assert await in_use.is_server_ready()  # the old channel still works for it
        assert old not in client._retired and not client._calls
        with pytest.raises(UsageError, match="Channel is closed"):  # closed: the call fails
            await old.is_server_ready(client_timeout=2)
        assert await client.ready()  # the new channel serves
        idle = client.client
        assert await client.renew_if_due() and client.client is not idle  # an idle one closes at once
    finally:
        await client.close()
    never = Triton("127.0.0.1:1")
    assert not await never.renew_if_due()  # renew_s 0: never
    await never.close()


def test_renew_setting() -> None:
    assert GatewaySettings.from_sources({"triton_renew_s": "60"}).triton_renew_s == 60.0
    with pytest.raises(InvalidArgument, match="triton_renew_s"):
        GatewaySettings(triton_renew_s=-1)


async def test_triton_url_from_the_environment_means_gateway_only(triton, tmp_path) -> None:
    """CLIPLORA_TRITON_URL alone (as containers set it) must not start a local Triton."""
    import os

    env = {**os.environ, "CLIPLORA_TRITON_URL": triton.grpc_url}
    async with gateway_process(None, tmp_path, "--log-dir", str(tmp_path / "logs"), env=env) as gateway:
        pass  # SERVING, through the Triton named in the environment
    text = gateway.log_path.read_text()
    assert "Triton (existing)" in text and triton.grpc_url in text, text
    assert not (tmp_path / "logs" / "triton.log").exists()


async def test_discovery_survives_a_failing_round_and_stop_always_finishes() -> None:
    import asyncio

    from cliplora.serve.gateway.server import GatewayServer

    gateway = GatewayServer(GatewaySettings(grpc_port=0, metrics_port=-1, triton_url="127.0.0.1:1",
                                            refresh_interval_s=0.05, health_interval_s=0.05))
    await gateway.start()
    rounds: list[int] = []

    async def flaky_renewal() -> bool:
        rounds.append(1)
        if len(rounds) == 1:
            raise RuntimeError("a bug in one round")
        return False

    gateway.triton.renew_if_due = flaky_renewal
    await until(lambda: len(rounds) >= 3, 10, "discovery rounds after the failing one")  # the loop went on

    async def broken_shutdown() -> None:
        raise RuntimeError("health shutdown failed")

    gateway.health.shutdown = broken_shutdown
    with pytest.raises(RuntimeError, match="health shutdown failed"):
        await gateway.stop(0)
    await asyncio.wait_for(gateway.wait(), timeout=5)  # released anyway: no hang on exit


async def test_stop_after_a_start_that_failed_early_or_late() -> None:
    """stop() of a gateway whose start() never got far (nothing but the settings exist),
    or failed after health was set up (an address it cannot bind), returns and releases."""
    import asyncio

    from cliplora.serve.gateway.server import GatewayServer

    never_started = GatewayServer(GatewaySettings(grpc_port=0, metrics_port=-1, triton_url="127.0.0.1:1"))
    await never_started.stop(0)
    await asyncio.wait_for(never_started.wait(), timeout=5)

    unbindable = GatewayServer(GatewaySettings(host="256.0.0.1", grpc_port=0, metrics_port=-1,
                                               triton_url="127.0.0.1:1"))
    with pytest.raises(RuntimeError, match="256.0.0.1"):
        await unbindable.start()
    assert unbindable.health is not None
    await unbindable.stop(0)
    await asyncio.wait_for(unbindable.wait(), timeout=5)
