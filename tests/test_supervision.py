"""The self-healing local stack (`cliplora serve`): the restart policy's arithmetic on a fake
clock, the child guard, settings refused before anything starts, and with real processes
Triton killed, Triton hung, a Triton that cannot start, Prometheus killed, and
`cliplora serve` itself SIGKILLed. Every stack test ends with no process of it left
(`tests.serving.stack_process` checks, by the marker in their environment).

Timing: every bound asserted below is derived from the product's own settings (the gateway's
health probe, the stack's readiness probe, restart policy and kill wait, the values the test
passes) plus `tests.serving.LOADED_MARGIN_S` for each step that must get the CPU in time on
a loaded 2-core machine; each test prints what it measured.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import psutil
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter

from cliplora.cli import main
from cliplora.core.errors import InvalidArgument, Unavailable
from cliplora.serve.gateway.settings import GatewaySettings
from cliplora.serve.stack import child_guard
from cliplora.serve.stack.processes import KILL_WAIT_S, describe_exit
from cliplora.serve.stack.supervisor import (
    ReadinessProbe,
    RestartHistory,
    RestartPolicy,
    Supervisor,
)
from cliplora.serve.stack.triton_launcher import LocalTriton
from cliplora.v1 import classifier_pb2_grpc as pb_grpc
from tests import leftovers, tools
from tests.serving import (
    LOADED_MARGIN_S,
    Outcome,
    StackProcess,
    classifier_stub,
    free_port,
    listening,
    not_serving_within_s,
    small_request,
    stack_process,
    timed_call,
    triton_ports,
    until,
    wait_for_health,
)

CLIPLORA = str(Path(sys.executable).with_name("cliplora"))

# -- the restart policy, on a fake clock ----------------------------------------------------


def test_backoff_doubles_from_1_s_to_30_s() -> None:
    history = RestartHistory(RestartPolicy(max_restarts=100))
    assert [history.failed(now=float(t)) for t in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]


def test_backoff_resets_after_a_run_ready_for_60_s() -> None:
    history = RestartHistory(RestartPolicy(max_restarts=100))
    assert [history.failed(t) for t in (0.0, 10.0, 20.0)] == [1, 2, 4]
    history.became_ready(30.0)
    assert history.failed(89.9) == 8  # ready 59.9 s: still the same streak
    history.became_ready(100.0)
    history.became_ready(120.0)  # the first ready answer of a run counts, not the latest
    assert history.failed(160.0) == 1  # ready 60 s: a fresh streak
    assert history.failed(161.0) == 2  # never ready since: the streak goes on


def test_gives_up_after_max_restarts_within_the_window() -> None:
    history = RestartHistory(RestartPolicy(max_restarts=5, window_s=300))
    assert all(history.failed(t) is not None for t in (0.0, 10.0, 20.0, 30.0, 40.0))
    assert history.failed(50.0) is None  # a sixth failure within 300 s: give up
    spread = RestartHistory(RestartPolicy(max_restarts=2, window_s=300))
    assert spread.failed(0.0) is not None and spread.failed(100.0) is not None
    assert spread.failed(300.0) is not None  # the failure at 0 s has left the window
    assert spread.failed(301.0) is None  # 100, 300, 301: three within 300 s
    assert RestartHistory(RestartPolicy(max_restarts=0)).failed(0.0) is None


@pytest.mark.parametrize("bad", [dict(max_restarts=-1), dict(window_s=0), dict(first_delay_s=0),
                                 dict(first_delay_s=40.0, max_delay_s=30.0), dict(reset_after_s=-1)])
def test_policy_refuses_bad_values(bad: dict) -> None:
    with pytest.raises(InvalidArgument):
        RestartPolicy(**bad)


@pytest.mark.parametrize("bad", [dict(hang_s=-1), dict(hang_s=1.0), dict(timeout_s=0), dict(interval_s=0)])
def test_probe_refuses_bad_values(bad: dict) -> None:
    with pytest.raises(InvalidArgument):
        ReadinessProbe(**bad)
    assert ReadinessProbe(hang_s=0).hang_s == 0  # off


def test_exit_descriptions() -> None:
    assert describe_exit(1) == "exited with status 1"
    assert describe_exit(-9) == "killed by signal 9 (SIGKILL)"
    assert describe_exit(-15) == "killed by signal 15 (SIGTERM)"


class _ExitingChild:
    """A child that exits with status 3 at once and never gets ready: the supervisor's loop
    without Triton."""

    name = "fake"
    start_timeout_s = 10.0

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_url = f"http://127.0.0.1:{free_port()}/ready"
        self.launches = 0

    def launch(self) -> None:
        self.launches += 1
        self.process = subprocess.Popen(["sh", "-c", "exit 3"])

    def kill_group(self) -> None:
        assert self.process is not None
        self.process.wait()

    def stop(self) -> None:
        pass


@pytest.mark.subprocess
async def test_supervisor_restarts_counts_and_gives_up_naming_the_log(tmp_path: Path, caplog) -> None:
    registry = CollectorRegistry()
    restarts = PromCounter("restarts", "", ["component"], registry=registry)
    child = _ExitingChild(tmp_path / "fake.log")
    policy = RestartPolicy(max_restarts=2, first_delay_s=0.05, max_delay_s=0.1)
    supervisor = Supervisor(child, policy, ReadinessProbe(interval_s=0.05, timeout_s=0.2, hang_s=0), restarts)
    started = time.monotonic()
    with pytest.raises(Unavailable, match=r"fake failed 3 times within 300 s \(last: exited with status 3\)") as info:
        await asyncio.wait_for(supervisor.run(), 10)
    assert str(child.log_path) in str(info.value)
    assert child.launches == 3 and registry.get_sample_value("restarts_total", {"component": "fake"}) == 2
    assert time.monotonic() - started >= policy.delay_s(1) + policy.delay_s(2)  # the back-off was waited
    assert sum("exited with status 3; restarting it in" in r.getMessage() for r in caplog.records) == 2


# -- the child guard --------------------------------------------------------------------------


def _guarded(command: list[str], marker: str, grace_s: float = 2.0) -> subprocess.Popen[bytes]:
    return subprocess.Popen(child_guard.guarded(command, grace_s), start_new_session=True,
                            env={**os.environ, leftovers.CASE_VARIABLE: marker})


@pytest.mark.parametrize(("command", "returncode"), [
    (["sh", "-c", "exit 3"], 3),
    (["sh", "-c", "kill -9 $$"], -9),
    (["/nonexistent/binary"], 127),
])
@pytest.mark.subprocess
def test_guard_exits_as_its_child_did(command: list[str], returncode: int) -> None:
    guard = _guarded(command, os.urandom(8).hex())
    assert guard.wait(10) == returncode


@pytest.mark.subprocess
def test_guard_ends_the_childs_group_and_orphans_when_the_child_exits() -> None:
    """What tritonserver does to its stubs when it dies: children left behind, one of them in
    a session of its own. The guard ends them all before it exits."""
    marker = os.urandom(8).hex()
    guard = _guarded(["sh", "-c", "sleep 300 & setsid sleep 300 & sleep 0.3; exit 0"], marker)
    assert guard.wait(10) == 0
    left = leftovers.marked(leftovers.CASE_VARIABLE, marker)
    assert not left, leftovers.describe(left)


@pytest.mark.subprocess
def test_guard_ends_everything_when_its_parent_is_sigkilled() -> None:
    marker = os.urandom(8).hex()
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         f"sys.path.insert(0, {str(Path(child_guard.__file__).parent)!r})\n"
         "import child_guard\n"
         "subprocess.Popen(child_guard.guarded(['sh', '-c', 'sleep 300 & sleep 300'], 5), start_new_session=True)\n"
         "time.sleep(300)\n"],
        env={**os.environ, leftovers.CASE_VARIABLE: marker})
    try:
        deadline = time.monotonic() + 10
        while sum(p.name() == "sleep" for p in leftovers.marked(leftovers.CASE_VARIABLE, marker)) < 2:
            assert time.monotonic() < deadline, "the guarded sleeps did not start"
            time.sleep(0.05)
        parent.kill()
        parent.wait()
        killed = time.monotonic()
        left = leftovers.still_running(leftovers.CASE_VARIABLE, marker, 5)
        print(f"\nguard: everything gone {time.monotonic() - killed:.2f} s after its parent was SIGKILLed")
        assert not left, leftovers.describe(left)
    finally:
        leftovers.kill(leftovers.marked(leftovers.CASE_VARIABLE, marker))


@pytest.mark.subprocess
def test_a_stuck_guard_is_killed_and_its_childs_group_with_it(monkeypatch) -> None:
    """A guard that cannot answer SIGHUP (here SIGSTOPped): kill_guarded SIGKILLs it, its
    child dies by PDEATHSIG, and what the child started (re-parented to init, as a stub
    would be) dies with the child's process group instead of living on."""
    from cliplora.serve.stack import processes

    monkeypatch.setattr(processes, "KILL_WAIT_S", 0.5)
    marker = os.urandom(8).hex()
    guard = _guarded(["sh", "-c", "sleep 300 & sleep 300"], marker)
    try:
        deadline = time.monotonic() + 10
        while sum(p.name() == "sleep" for p in leftovers.marked(leftovers.CASE_VARIABLE, marker)) < 2:
            assert time.monotonic() < deadline, "the guarded sleeps did not start"
            time.sleep(0.05)
        guard.send_signal(signal.SIGSTOP)
        processes.kill_guarded(guard)
        assert guard.returncode == -signal.SIGKILL
        left = leftovers.still_running(leftovers.CASE_VARIABLE, marker, 5)
        assert not left, leftovers.describe(left)
    finally:
        leftovers.kill(leftovers.marked(leftovers.CASE_VARIABLE, marker))


# -- settings refused before anything starts --------------------------------------------------


@pytest.mark.triton
def test_a_short_token_is_refused_before_any_child_starts(tiny_repository: Path, tmp_path: Path) -> None:
    """The bug: Triton and Prometheus started, "cliplora is serving" printed, and only then
    INVALID_ARGUMENT. Now nothing starts: no child log is even created."""
    tokens = tmp_path / "tokens"
    tokens.write_text("too-short\n")
    ports = triton_ports()
    started = time.monotonic()
    done = subprocess.run([CLIPLORA, "serve", "--repository", str(tiny_repository), "--auth-tokens-file", str(tokens),
                           "--grpc-port", str(free_port()), "--metrics-port", str(free_port()),
                           "--http-port", "0", "--triton-ports", f"{ports.http},{ports.grpc},{ports.metrics}",
                           "--prometheus-port", str(free_port()), "--log-dir", str(tmp_path / "logs")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "INVALID_ARGUMENT" in done.stderr and "16 characters" in done.stderr
    for sign in ("starting Triton", "cliplora is serving", "gateway listening", "prometheus ready"):
        assert sign not in done.stderr, done.stderr
    assert not (tmp_path / "logs" / "triton.log").exists() and not (tmp_path / "logs" / "prometheus.log").exists()
    print(f"\nshort token: refused after {time.monotonic() - started:.1f} s, nothing started")


@pytest.mark.parametrize(("flags", "code", "says"), [
    (["--triton-ports", "8000,8001"], "INVALID_ARGUMENT", "--triton-ports"),
    (["--triton-ports", "9000,9000,9001"], "INVALID_ARGUMENT", "three different ports"),
    (["--grpc-port", "51234", "--triton-ports", "51234,51235,51236"], "INVALID_ARGUMENT", "given twice"),
    (["--max-restarts", "-1"], "INVALID_ARGUMENT", "max_restarts"),
    (["--restart-window-s", "0"], "INVALID_ARGUMENT", "window_s"),
    (["--triton-hang-s", "-1"], "INVALID_ARGUMENT", "triton_hang_s"),
    (["--triton-hang-s", "0.5"], "INVALID_ARGUMENT", "at least one probe"),
    (["--health-timeout-s", "0"], "INVALID_ARGUMENT", "health_timeout_s"),
    (["--repository", "/nonexistent/repository"], "NOT_FOUND", "does not exist"),
    (["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"], "NOT_FOUND", "TLS file"),
])
def test_bad_settings_are_refused_before_anything_starts(flags: list[str], code: str, says: str, tmp_path: Path,
                                                         monkeypatch, capsys) -> None:
    import cliplora.serve.gateway.server as gateway_server
    import cliplora.serve.stack.run as stack

    async def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("the stack started despite a bad setting")

    monkeypatch.setattr(stack, "_serve_stack", started)
    monkeypatch.setattr(gateway_server, "serve_until_signalled", started)
    (tmp_path / "repository").mkdir()  # empty: nothing may be loaded from it anyway
    repository = [] if "--repository" in flags else ["--repository", str(tmp_path / "repository")]
    assert main(["serve", *repository, "--log-dir", str(tmp_path / "logs"), *flags]) == 1
    err = capsys.readouterr().err
    assert code in err and says in err, err


# -- with real processes ----------------------------------------------------------------------

WORKERS = 4
# SERVING again after Triton was killed or found hung: the first restart's back-off, Triton's
# own start limit (every model loaded; past it the stack counts a failure), then one gateway
# probe. Measured 4-7 s on the 2-core machine.
RECOVERY_LIMIT_S = RestartPolicy().delay_s(1) + LocalTriton.start_timeout_s + not_serving_within_s()


async def _stream(stub: pb_grpc.ClassifierStub, deadline_s: float, stop: asyncio.Event, outcomes: list[Outcome]) -> None:
    while not stop.is_set():
        outcomes.append(await timed_call(stub, small_request(), deadline_s))
        await asyncio.sleep(0.05)


def _shm_of(process: psutil.Process) -> set[str]:
    """The /dev/shm files a process maps (Triton's Python backend: one per model instance)."""
    return {m.path for m in process.memory_maps(grouped=False) if m.path.startswith("/dev/shm/")}


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _only(stack: StackProcess, name: str) -> psutil.Process:
    found = stack.descendants(name)
    assert len(found) == 1, (name, found)
    return found[0]


@pytest.mark.triton
async def test_triton_sigkilled_under_load_is_restarted_then_the_stack_sigkilled_leaves_nothing(
        tiny_repository: Path, tmp_path: Path) -> None:
    """Without --host every port of the stack listens on loopback only. kill -9 of tritonserver
    under load: NOT_SERVING within one gateway probe, only UNAVAILABLE meanwhile, SERVING again
    with nobody's help; its stubs gone. Then kill -9 of `cliplora serve` itself: no
    tritonserver, stub, prometheus or guard of it survives."""
    async with stack_process(tiny_repository, tmp_path) as stack:
        _assert_loopback_only(stack)
        channel, stub = classifier_stub(stack.port)
        async with channel:
            outcomes: list[Outcome] = []
            stop = asyncio.Event()
            workers = [asyncio.create_task(_stream(stub, 30, stop, outcomes)) for _ in range(WORKERS)]
            await until(lambda: sum(o.code == "OK" for o in outcomes) >= 10, 30, "calls before the kill")
            server = _only(stack, "tritonserver")
            stubs = stack.descendants("triton_python_backend_stub")
            regions = _shm_of(server)
            killed = time.monotonic()
            server.kill()
            not_serving_s = await wait_for_health(stack.port, "NOT_SERVING", timeout_s=10)
            serving_s = await wait_for_health(stack.port, "SERVING", timeout_s=RECOVERY_LIMIT_S)
            back = time.monotonic()
            await until(lambda: sum(o.code == "OK" and o.started > back for o in outcomes) >= 10, 30,
                        "calls after the restart")
            stop.set()
            await asyncio.gather(*workers)
            _, stubs_alive = psutil.wait_procs(stubs, timeout=5)
            restarts = stack.metric("cliplora_stack_restarts_total", component="triton")
            replacement = _only(stack, "tritonserver")
            regions_left = {r for r in regions if Path(r).exists()}
            new_regions = _shm_of(replacement)

        serve_killed = time.monotonic()
        stack.process.kill()
        stack.process.wait()
        left = stack.leftovers(10)
        gone_s = time.monotonic() - serve_killed
    failed = Counter(o.code for o in outcomes if o.code != "OK")
    outage = [o for o in outcomes if killed < o.started < back]
    print(f"\nkill -9 tritonserver: NOT_SERVING after {not_serving_s:.2f} s, SERVING again {serving_s + not_serving_s:.1f} s "
          f"after the kill; {len(outcomes)} calls, failures {dict(failed)}; kill -9 of cliplora serve: "
          f"everything gone within {gone_s:.2f} s")
    assert not_serving_s < not_serving_within_s(), not_serving_s
    assert outage and set(failed) <= {"UNAVAILABLE"}, failed
    assert stubs and not stubs_alive, stubs_alive
    assert restarts == 1 and replacement.pid != server.pid
    assert "triton killed by signal 9 (SIGKILL); restarting it in 1 s" in stack.log_path.read_text()
    assert not left, leftovers.describe(left)
    # What a killed Triton leaves in /dev/shm (1 MiB per model instance) is removed by its guard.
    assert regions and not regions_left, regions_left
    assert new_regions and not any(Path(r).exists() for r in new_regions)


def _assert_loopback_only(stack: StackProcess) -> None:
    """No --host: the gateway, its metrics, Triton's three ports and Prometheus (when installed)
    listen on 127.0.0.1 only. (Checked here, in a test that runs with or without Prometheus.)"""
    sockets = listening(stack.pid)
    ports = [stack.port, stack.metrics_port, stack.triton.http, stack.triton.grpc, stack.triton.metrics]
    if stack.descendants("prometheus"):
        ports.append(stack.prometheus_port)
    for port in ports:
        assert sockets.get(port) == {"127.0.0.1"}, (port, sockets)


HANG_S = float(os.environ.get("CLIPLORA_TEST_HANG_S", "3"))  # 15 (the default) for the docs' figure
# The supervisor's probe as `cliplora serve` builds it from the gateway's defaults (serve/cli.py).
PROBE = ReadinessProbe(interval_s=GatewaySettings.health_interval_s, timeout_s=GatewaySettings.health_timeout_s,
                       hang_s=HANG_S)
SHORT_DEADLINE_S, LONG_DEADLINE_S = 2.0, 30.0
# A call ends at its deadline in the client library itself (gRPC enforces it on both sides),
# so a call's measured length exceeds its deadline only by how late this test's event loop
# runs again to record the end: `LOADED_MARGIN_S`.
SLACK_S = LOADED_MARGIN_S
# Killed as hung: the last ready answer came at most one probe (interval + timeout) before the
# stop, the stack notices at most one probe after `HANG_S` has passed, and its kill of the group
# takes at most `KILL_WAIT_S` (the guard's bound; milliseconds in practice).
FOUND_HUNG_LOW_S = HANG_S - PROBE.interval_s - PROBE.timeout_s
FOUND_HUNG_HIGH_S = HANG_S + PROBE.interval_s + PROBE.timeout_s + KILL_WAIT_S + LOADED_MARGIN_S
# The long calls caught by the hang end when the gateway's connection to the killed Triton
# breaks, at once: a margin, far below the 30 s deadline this tells apart.
CAUGHT_END_S = 2 * LOADED_MARGIN_S
# An answer Triton sent just before the stop reaches the caller just after it (CI saw one
# 12 ms after): a call that ends this soon after the stop was not caught by the hang.
ANSWERED_AT_STOP_S = 0.5
assert ANSWERED_AT_STOP_S < FOUND_HUNG_LOW_S  # the caught calls end later, at the kill


@pytest.mark.triton
async def test_triton_sigstopped_under_load_is_found_hung_and_restarted(tiny_repository: Path, tmp_path: Path) -> None:
    """kill -STOP of tritonserver under load (calls with 2 s and 30 s deadlines): no call
    outlives its deadline, those in flight end UNAVAILABLE or DEADLINE_EXCEEDED, health goes
    NOT_SERVING at the first probe timeout, the stack finds it hung after --triton-hang-s,
    kills it with its stubs and starts another; SERVING returns; SIGTERM then exits 0."""
    async with stack_process(tiny_repository, tmp_path, "--triton-hang-s", str(HANG_S)) as stack:
        channel, stub = classifier_stub(stack.port)
        async with channel:
            outcomes: list[Outcome] = []
            stop = asyncio.Event()
            workers = [asyncio.create_task(_stream(stub, deadline, stop, outcomes))
                       for deadline in (SHORT_DEADLINE_S, LONG_DEADLINE_S) * (WORKERS // 2)]
            await until(lambda: sum(o.code == "OK" for o in outcomes) >= 10, 30, "calls before the hang")
            server = _only(stack, "tritonserver")
            stubs = stack.descendants("triton_python_backend_stub")
            stopped = time.monotonic()
            server.suspend()
            not_serving_s = await wait_for_health(stack.port, "NOT_SERVING", timeout_s=10)
            await until(lambda: _gone(server), FOUND_HUNG_HIGH_S + LOADED_MARGIN_S, "the hung tritonserver being killed")
            found_hung_s = time.monotonic() - stopped
            serving_s = await wait_for_health(stack.port, "SERVING", timeout_s=RECOVERY_LIMIT_S)
            back = time.monotonic()
            await until(lambda: sum(o.code == "OK" and o.started > back for o in outcomes) >= 10, 30,
                        "calls after the restart")
            stop.set()
            await asyncio.gather(*workers)
            await until(lambda: stack.metric("cliplora_gateway_in_flight_requests") == 0, 5, "the gateway letting go")
            _, stubs_alive = psutil.wait_procs(stubs, timeout=5)
            restarts = stack.metric("cliplora_stack_restarts_total", component="triton")
        stack.process.send_signal(signal.SIGTERM)
        status = await asyncio.get_running_loop().run_in_executor(None, stack.process.wait, 60)
    during = [o for o in outcomes if o.finished > stopped and o.started < back]
    print(f"\nkill -STOP tritonserver: NOT_SERVING after {not_serving_s:.2f} s, killed as hung after {found_hung_s:.1f} s "
          f"(--triton-hang-s {HANG_S:g}), SERVING again {found_hung_s + serving_s:.1f} s after the stop; calls during: "
          f"{dict(Counter((o.deadline, o.code) for o in during))}; longest {max(o.seconds for o in during):.2f} s")
    assert not_serving_s < not_serving_within_s()  # the first gateway probe that times out
    assert all(o.seconds <= o.deadline + SLACK_S for o in outcomes), max(o.seconds - o.deadline for o in outcomes)
    assert during and {o.code for o in during} <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"}
    assert any(o.code == "DEADLINE_EXCEEDED" and o.deadline == SHORT_DEADLINE_S for o in during)
    # The long calls caught by the hang did not wait for their 30 s: they ended when it was killed.
    # (A call whose answer Triton sent just before the stop may arrive just after it, as OK:
    # not caught. The caught ones end at the kill, seconds later.)
    caught = [o for o in during if o.deadline == LONG_DEADLINE_S and o.started < stopped + 1
              and o.finished > stopped + ANSWERED_AT_STOP_S]
    assert caught and all(o.code == "UNAVAILABLE" and o.finished < stopped + found_hung_s + CAUGHT_END_S
                          for o in caught), caught
    assert FOUND_HUNG_LOW_S <= found_hung_s < FOUND_HUNG_HIGH_S, (found_hung_s, FOUND_HUNG_LOW_S, FOUND_HUNG_HIGH_S)
    assert stubs and not stubs_alive and restarts == 1
    assert "triton hung: no answer from" in stack.log_path.read_text()
    assert status == 0, stack.log_tail()


@pytest.mark.triton
async def test_a_triton_that_cannot_start_hits_the_restart_limit(tiny_repository: Path, tmp_path: Path) -> None:
    """Triton's gRPC port taken by another process: every start fails, the back-off is
    waited, and past --max-restarts `cliplora serve` exits non-zero naming the log."""
    ports = triton_ports()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports.grpc))
        squatter.listen()
        started = time.monotonic()
        async with stack_process(tiny_repository, tmp_path, "--max-restarts", "1", wait_serving=False,
                                 triton=ports) as stack:
            status = await asyncio.get_running_loop().run_in_executor(None, stack.process.wait, 120)
        took = time.monotonic() - started
    log = stack.log_path.read_text()
    print(f"\nTriton's port taken: cliplora serve exited {status} after {took:.1f} s")
    assert status == 1, log
    assert "cliplora serve: UNAVAILABLE: triton failed 2 times within 300 s" in log, log
    assert f"gave up after 1 restarts. See {tmp_path / f'logs-{stack.port}' / 'triton.log'}" in log, log
    assert log.count("restarting triton") == 1 and "cliplora is serving" not in log
    assert "already in use" in (tmp_path / f"logs-{stack.port}" / "triton.log").read_text()


def _scraped_since(prometheus_port: int, since: float) -> set[str]:
    """The jobs whose target Prometheus scraped up (`up == 1`) after `since` (epoch seconds)."""
    query = urllib.parse.urlencode({"query": "timestamp(up == 1)"})
    with urllib.request.urlopen(f"http://127.0.0.1:{prometheus_port}/api/v1/query?{query}", timeout=5) as response:
        result = json.load(response)["data"]["result"]
    return {r["metric"]["job"] for r in result if float(r["value"][1]) > since}


@pytest.mark.triton
async def test_prometheus_killed_is_restarted_and_scrapes_again(tiny_repository: Path, tmp_path: Path) -> None:
    tools.require("prometheus")
    async with stack_process(tiny_repository, tmp_path) as stack:
        _assert_loopback_only(stack)
        old = _only(stack, "prometheus")
        killed, killed_wall = time.monotonic(), time.time()
        old.kill()
        await until(lambda: stack.metric("cliplora_stack_restarts_total", component="prometheus") == 1, 30,
                    "prometheus restarted")
        restarted_s = time.monotonic() - killed
        scraped: set[str] = set()

        def scraping() -> bool:
            nonlocal scraped
            try:
                scraped = _scraped_since(stack.prometheus_port, killed_wall)
            except OSError:
                return False
            return scraped == {"cliplora-gateway", "triton"}

        await until(scraping, 30, "the new prometheus scraping the gateway and Triton")
        scraping_s = time.monotonic() - killed
        assert _only(stack, "prometheus").pid != old.pid
        assert "prometheus killed by signal 9 (SIGKILL)" in stack.log_path.read_text()
        stack.process.send_signal(signal.SIGTERM)
        status = await asyncio.get_running_loop().run_in_executor(None, stack.process.wait, 60)
    print(f"\nprometheus SIGKILLed: restarted after {restarted_s:.1f} s, scraping both targets again after "
          f"{scraping_s:.1f} s")
    assert status == 0
