"""Helpers for serving tests: ports, tiny published models, a deliberately slow model,
images, and gateways (in this process or as a child process) that always get stopped."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from cliplora.export.pipeline import ExportOptions, run_export
from cliplora.serve.gateway.server import GatewayServer
from cliplora.serve.gateway.settings import GatewaySettings
from cliplora.serve.stack.processes import stop_process
from cliplora.serve.stack.triton_launcher import TritonPorts
from cliplora.v1 import classifier_pb2 as pb
from cliplora.v1 import classifier_pb2_grpc as pb_grpc
from tests import factories, leftovers
from tests.images import encoded, png_header  # noqa: F401  (re-exported for the serving tests)
from tests.ports import free_port

T = TypeVar("T")

CLASSES = ["cat", "dog", "red_panda", "golden_retriever", "tabby"]


def publish_tiny_models(root: Path, config: Path) -> Path:
    """`base` and `lora` (same classes) in `root/repo`; returns the repository."""
    classes = factories.write_classes(root / "classes.txt", CLASSES)
    lora = factories.write_paper_checkpoint(root / "lora.pt", encoder="both", position="all", params=("q", "v"))
    common = dict(model=str(config), pretrained=None, classes=classes, templates=("a photo of a {}.",),
                  repository=root / "repo", allow_random_weights=True, probes=4)
    run_export(ExportOptions(lora="none", name="base", **common))
    run_export(ExportOptions(lora=str(lora), name="lora", **common))
    return root / "repo"


def metrics_text(url_or_port: str | int) -> str:
    """A /metrics page: the gateway's on this port, or the page at this URL."""
    url = url_or_port if isinstance(url_or_port, str) else f"http://127.0.0.1:{url_or_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def triton_counts(metrics_url: str, model: str) -> tuple[int, int]:
    """(successful requests, executions) Triton counted for `model`, all its versions, from
    its /metrics page."""
    text = metrics_text(metrics_url)

    def total(metric: str) -> int:
        pattern = rf'^{metric}{{model="{re.escape(model)}",version="\d+"}} (\S+)'
        return sum(int(float(v)) for v in re.findall(pattern, text, re.M))

    return total("nv_inference_request_success"), total("nv_inference_exec_count")


def triton_ports() -> TritonPorts:
    return TritonPorts(free_port(), free_port(), free_port())


def smooth_png(width: int, height: int, seed: int = 0) -> bytes:
    """A gradient PNG: a few tens of KiB on the wire, width x height x 3 bytes once decoded.

    What overload tests need: requests cheap to send whose decoding would be expensive.
    """
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 40 * seed % 256)], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(buffer, "PNG")
    return buffer.getvalue()


SLOW_MODEL = '''"""Test-only Triton model: the cliplora tensor contract, answered after `delay_s` seconds.

The gateway's label probe (an all-zero image) is answered at once, so discovery stays quick.
"""
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.delay_s = float(config["parameters"]["delay_s"]["string_value"])
        self.classes = int(config["output"][0]["dims"][0])

    def execute(self, requests):
        images = [pb_utils.get_input_tensor_by_name(r, "image").as_numpy() for r in requests]
        if any(i.any() for i in images):
            time.sleep(self.delay_s)
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("logits", np.zeros((len(i), self.classes), dtype=np.float32))]) for i in images]
'''


def add_slow_model(repository: Path, delay_s: float, name: str = "slow") -> None:
    """A model that takes `delay_s` per batch (Triton's Python backend; the labels of `base`).

    Dynamic batching gathers the requests that arrive during one delay into the next batch,
    so n concurrent calls take at most about 2 x `delay_s`.
    """
    folder = repository / name
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.py").write_text(SLOW_MODEL)
    (folder / "labels.txt").write_text((repository / "base" / "labels.txt").read_text())
    size = factories.IMAGE_SIZE
    (folder / "config.pbtxt").write_text(f"""name: "{name}"
backend: "python"
max_batch_size: 32
input [ {{ name: "image" data_type: TYPE_UINT8 dims: [ {size}, {size}, 3 ] }} ]
output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ {len(CLASSES)} ] label_filename: "labels.txt" }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
dynamic_batching {{ max_queue_delay_microseconds: 100000 }}
parameters {{ key: "delay_s" value: {{ string_value: "{delay_s}" }} }}
""")


async def health(port: int) -> str:
    """The gateway's health status name; raises grpc.aio.AioRpcError when nothing answers."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="cliplora.v1.Classifier"), timeout=2)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def wait_for_health(port: int, status: str, timeout_s: float, poll_s: float = 0.05) -> float:
    """Poll until health is `status` (an unreachable gateway counts as "UNREACHABLE");
    returns the seconds it took, fails the test after `timeout_s`."""
    started = time.monotonic()
    while True:
        now = await _health_or_none(port) or "UNREACHABLE"
        elapsed = time.monotonic() - started
        if now == status:
            return elapsed
        assert elapsed < timeout_s, f"health still {now} after {elapsed:.1f} s, expected {status}"
        await asyncio.sleep(poll_s)


# What a bound on a loaded 2-core machine allows for getting the CPU in time (Triton, its
# stubs, the gateway, Prometheus, a test's client streams and other test sessions share the
# cores). A process that wakes waits for a core a few scheduler periods (milliseconds) and for
# its interpreter's lock (5 ms switches): tens of milliseconds, hundreds when swamped; 1 s
# leaves room for that several times over, and stays below every figure it is added to.
LOADED_MARGIN_S = 1.0


def not_serving_within_s(settings: GatewaySettings | None = None) -> float:
    """The bound on health turning NOT_SERVING after Triton dies or hangs, from the gateway's
    own settings (the defaults unless given): its health loop sleeps `health_interval_s`
    between probes and cuts each at `health_timeout_s`, so the first probe that misses
    Triton starts within one interval and ends within one timeout; plus `LOADED_MARGIN_S`."""
    settings = settings or GatewaySettings()
    return settings.health_interval_s + settings.health_timeout_s + LOADED_MARGIN_S


def small_request(model: str = "base") -> pb.ClassifyRequest:
    return pb.ClassifyRequest(model=model, images=[pb.Image(encoded=encoded(factories.make_image(64, 48), "JPEG"))])


@dataclass(frozen=True)
class Outcome:
    code: str  # status code name, "OK" included
    started: float  # time.monotonic()
    finished: float
    results: int = 0  # classifications in the reply
    details: str = ""  # the status message, for failures
    deadline: float = 0.0  # the deadline the call was given, in seconds

    @property
    def seconds(self) -> float:
        return self.finished - self.started


async def timed_call(stub: pb_grpc.ClassifierStub, request: pb.ClassifyRequest, timeout: float) -> Outcome:
    started = time.monotonic()
    try:
        reply = await stub.Classify(request, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return Outcome(exc.code().name, started, time.monotonic(), details=exc.details() or "", deadline=timeout)
    return Outcome("OK", started, time.monotonic(), len(reply.results), deadline=timeout)


async def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `condition` every 0.05 s; fail the test naming `what` after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(0.05)


async def until_answer(call: Callable[[], Awaitable[T]], done: Callable[[T], bool], what: str,
                       timeout_s: float = 60.0) -> T:
    """Repeat `call` every 0.2 s until its answer is `done` (errors count as not yet, as
    while a new version loads); fail the test naming `what` and the last error after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            answer = await call()
            if done(answer):
                return answer
        except Exception as exc:  # noqa: BLE001 - not there yet
            last = exc
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what}: not as expected after {timeout_s:.0f} s: {last!r}")


async def probed(gateway: GatewayServer, times: int = 2, timeout_s: float = 10.0) -> None:
    """Until the gateway's health loop has finished `times` more readiness probes of Triton.

    Each probe's verdict is set before the next probe starts, so after two the health status
    is the one a probe gave (not only the NOT_SERVING the gateway starts with). An event,
    not a sleep: the wait is as long as the probes take, on any machine.
    """
    health = gateway.health
    assert health is not None, "start() the gateway first"
    finished = 0
    enough = asyncio.Event()
    probe = health.probe

    async def counted() -> bool:
        nonlocal finished
        try:
            return await probe()
        finally:
            finished += 1
            if finished >= times:
                enough.set()

    health.probe = counted  # type: ignore[method-assign]
    try:
        await asyncio.wait_for(enough.wait(), timeout_s)
    finally:
        del health.probe  # the class's own again


def classifier_stub(port: int) -> tuple[grpc.aio.Channel, pb_grpc.ClassifierStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return channel, pb_grpc.ClassifierStub(channel)


@asynccontextmanager
async def in_process_gateway(triton_url: str, repository: Path | None = None, *, wait_serving: bool = True,
                             **overrides: object) -> AsyncIterator[tuple[GatewayServer, pb_grpc.ClassifierStub]]:
    """A gateway in this event loop (free ports, 0.2 s health probes) and a stub on it;
    both closed on the way out, whatever the test did."""
    options = {"health_interval_s": 0.2, "metrics_port": 0, **overrides}
    settings = GatewaySettings(grpc_port=0, triton_url=triton_url, repository=repository, **options)
    gateway = GatewayServer(settings)
    await gateway.start()
    channel, stub = classifier_stub(gateway.port)
    try:
        if wait_serving:
            await wait_for_health(gateway.port, "SERVING", timeout_s=30)
        yield gateway, stub
    finally:
        await channel.close()
        await gateway.stop(1)


@dataclass
class GatewayProcess:
    """A `cliplora serve --triton-url ...` child process: the gateway alone, as operators run it."""

    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int  # -1: metrics off
    log_path: Path
    http_port: int  # the HTTP door

    @property
    def pid(self) -> int:
        return self.process.pid

    def memory_mib(self, field: str) -> float:
        """``VmRSS`` (now) or ``VmHWM`` (peak since start or `reset_peak`) from /proc, in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no {field} in /proc/{self.pid}/status")

    def reset_peak(self) -> None:
        """Make VmHWM start afresh from the current RSS (``5`` to clear_refs, Linux >= 4.0)."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels`, from /metrics."""
        return sum(sample.value for family in text_string_to_metric_families(metrics_text(self.metrics_port)) for sample in family.samples
                   if sample.name == name and labels.items() <= sample.labels.items())

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@asynccontextmanager
async def gateway_process(triton_url: str | None, log_dir: Path, *flags: str, metrics: bool = False,
                          env: dict[str, str] | None = None) -> AsyncIterator[GatewayProcess]:
    """Start `cliplora serve` as its own OS process (given `triton_url`, the gateway alone),
    wait until SERVING, stop it on the way out (SIGTERM, then SIGKILL) unless the test
    already did. `env` replaces the child's environment."""
    port, metrics_port, http_port = free_port(), free_port() if metrics else -1, free_port()
    log_path = log_dir / f"gateway-{port}.log"
    command = [str(Path(sys.executable).with_name("cliplora")), "serve",
               *(["--triton-url", triton_url] if triton_url else []),
               "--grpc-port", str(port), "--metrics-port", str(metrics_port), "--http-port", str(http_port), *flags]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    gateway = GatewayProcess(process, port, metrics_port, log_path, http_port)
    try:
        started = time.monotonic()
        while (await _health_or_none(port)) != "SERVING":
            assert process.poll() is None, f"gateway exited with {process.returncode}:\n{gateway.log_tail()}"
            assert time.monotonic() - started < 60, f"gateway not SERVING after 60 s:\n{gateway.log_tail()}"
            await asyncio.sleep(0.1)
        yield gateway
    finally:
        stop_process(process, 20)


async def _health_or_none(port: int) -> str | None:
    try:
        return await health(port)
    except grpc.aio.AioRpcError:
        return None


def listening(pid: int) -> dict[int, set[str]]:
    """port -> the addresses a process and its children listen on (TCP)."""
    found: dict[int, set[str]] = {}
    root = psutil.Process(pid)
    for process in (root, *root.children(recursive=True)):
        for connection in process.net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN:
                address = ipaddress.ip_address(connection.laddr.ip)
                mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is still loopback only
                found.setdefault(connection.laddr.port, set()).add(str(mapped or address))
    return found


@dataclass
class StackProcess(GatewayProcess):
    """A whole `cliplora serve` stack (gateway, supervised Triton and Prometheus) as a child
    process; everything it starts carries `marker` in its environment."""

    marker: str
    triton: TritonPorts
    prometheus_port: int

    def descendants(self, name: str) -> list[psutil.Process]:
        """Its live descendants called `name` ("tritonserver", "prometheus", "triton_python_backend_stub")."""
        found = []
        for child in psutil.Process(self.pid).children(recursive=True):
            try:
                if child.name() == name and child.status() != psutil.STATUS_ZOMBIE:
                    found.append(child)
            except psutil.NoSuchProcess:
                continue
        return found

    def leftovers(self, timeout_s: float) -> list[psutil.Process]:
        """Processes of this stack (the serve process included) still running after `timeout_s`."""
        return leftovers.still_running(leftovers.CASE_VARIABLE, self.marker, timeout_s)


@asynccontextmanager
async def stack_process(repository: Path, log_dir: Path, *flags: str, wait_serving: bool = True,
                        triton: TritonPorts | None = None) -> AsyncIterator[StackProcess]:
    """`cliplora serve --repository ...` on free ports (gateway, metrics, Triton, Prometheus).
    On the way out: SIGTERM unless the test ended it, then a check that nothing it started
    is still running (named, killed, and the test failed if something is)."""
    port, metrics_port, prometheus_port, http_port = free_port(), free_port(), free_port(), free_port()
    ports = triton or triton_ports()
    marker = os.urandom(8).hex()
    log_path = log_dir / f"stack-{port}.log"
    command = [str(Path(sys.executable).with_name("cliplora")), "serve", "--repository", str(repository),
               "--grpc-port", str(port), "--metrics-port", str(metrics_port), "--http-port", str(http_port),
               "--triton-ports", f"{ports.http},{ports.grpc},{ports.metrics}", "--prometheus-port", str(prometheus_port),
               "--log-dir", str(log_dir / f"logs-{port}"), *flags]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, leftovers.CASE_VARIABLE: marker})
    stack = StackProcess(process, port, metrics_port, log_path, http_port, marker, ports, prometheus_port)
    failed = False
    try:
        started = time.monotonic()
        while wait_serving and (await _health_or_none(port)) != "SERVING":
            assert process.poll() is None, f"stack exited with {process.returncode}:\n{stack.log_tail()}"
            assert time.monotonic() - started < 90, f"stack not SERVING after 90 s:\n{stack.log_tail()}"
            await asyncio.sleep(0.1)
        yield stack
    except BaseException:
        failed = True
        raise
    finally:
        stop_process(process, 30)
        left = stack.leftovers(10)
        if left:
            report = leftovers.describe(left)
            leftovers.kill(left)
            if not failed:
                raise AssertionError(f"processes of the stack still running after it ended:\n{report}")
