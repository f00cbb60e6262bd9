"""The test harness itself: the check for processes left behind at a session's end
(tests/leftovers.py), the check that a test starting a process carries the mark for it
(tests/process_marks.py), and the ports handed to the servers tests start (tests/ports.py).

The two session-wide checks are shown failing on a session run inside a test (pytester, in
a process of its own: its processes, audit hooks and environment stay apart from this one).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import psutil
import pytest

from tests import leftovers, ports, process_marks

ROOT = Path(__file__).resolve().parents[1]
INNER_CONFTEST = """
from tests import leftovers, process_marks

def pytest_configure(config):
    config.pluginmanager.register(leftovers.SessionCheck(wait_s=1.0), "cliplora-leftovers")
    config.pluginmanager.register(process_marks.ProcessWatch(), "cliplora-process-marks")
"""
INNER_INI = "[pytest]\nmarkers =\n    triton\n    subprocess\n    packaging\n"


@pytest.fixture()
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A folder for a session run inside a test, with this suite's two process checks."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makeini(INNER_INI)
    return pytester


# -- processes left behind ---------------------------------------------------------------------

LEAKING_TEST = """
import pytest, subprocess, sys
from pathlib import Path

@pytest.mark.subprocess
def test_leaks_a_child():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "{token}"])
    Path("child.pid").write_text(str(child.pid))

@pytest.mark.subprocess
def test_stops_its_child():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    child.kill()
    child.wait()
"""


def _gone(pid: int, timeout_s: float) -> bool:
    """Whether `pid` has ended (exited or a zombie) within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.subprocess
def test_a_session_that_leaves_a_process_fails_naming_it_and_kills_it(inner: pytest.Pytester) -> None:
    token = f"leaked-{os.urandom(6).hex()}"
    inner.makepyfile(LEAKING_TEST.replace("{token}", token))
    result = inner.runpytest_subprocess("-p", "no:cacheprovider")
    pid = int((inner.path / "child.pid").read_text())
    try:
        result.assert_outcomes(passed=2)  # every test passed: only the session check fails the run
        assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
        output = result.stdout.str()
        assert "leftover processes" in output and "1 process(es) started by this test session still running" in output
        assert f"pid {pid} " in output and token in output, output
        assert _gone(pid, 10), f"the leftover pid {pid} was named but not killed"
    finally:
        try:
            child = psutil.Process(pid)
            if token in " ".join(child.cmdline()):
                child.kill()
        except psutil.Error:
            pass


@pytest.mark.subprocess
def test_a_session_that_stops_its_processes_passes(inner: pytest.Pytester) -> None:
    inner.makepyfile(LEAKING_TEST)
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "-k", "stops_its_child")
    result.assert_outcomes(passed=1, deselected=1)
    assert result.ret == pytest.ExitCode.OK and "leftover processes" not in result.stdout.str()


def test_the_session_variable_is_fresh_for_every_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """A session run inside another must not take the outer session's processes for its own."""
    monkeypatch.setenv(leftovers.SESSION_VARIABLE, "outer")
    check = leftovers.SessionCheck(wait_s=0)
    assert os.environ[leftovers.SESSION_VARIABLE] == check.value != "outer"


# -- processes started without their mark ------------------------------------------------------

MARKED_TESTS = """
import pytest, subprocess

def test_starts_nothing():
    pass

def test_unmarked_process():
    subprocess.run(["true", "unmarked-{token}"], check=True)

@pytest.mark.subprocess
def test_marked_process():
    subprocess.run(["true"], check=True)

@pytest.mark.subprocess
def test_tritonserver_marked_only_subprocess():
    subprocess.run(["true", "--", "/opt/tritonserver/bin/tritonserver", "triton-{token}"], check=True)

@pytest.mark.triton
def test_tritonserver_marked_triton():
    subprocess.run(["true", "--", "/opt/tritonserver/bin/tritonserver"], check=True)

def test_quick_tool():
    subprocess.run(["git", "--version"], check=True, capture_output=True)
"""


@pytest.mark.subprocess
def test_a_test_that_starts_a_process_without_its_mark_fails_naming_it(inner: pytest.Pytester) -> None:
    token = os.urandom(6).hex()
    inner.makepyfile(MARKED_TESTS.replace("{token}", token))
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=6, errors=2)
    output = result.stdout.str()
    errors = {line.split(" - ")[0] for line in output.splitlines() if line.startswith("ERROR ")}
    assert errors == {"ERROR test_a_test_that_starts_a_process_without_its_mark_fails_naming_it.py::test_unmarked_process",
                      "ERROR test_a_test_that_starts_a_process_without_its_mark_fails_naming_it.py::"
                      "test_tritonserver_marked_only_subprocess"}, output
    assert f"started a process without one of the marks triton, subprocess, packaging: true unmarked-{token}" in output
    assert f"started a tritonserver without @pytest.mark.triton: true -- /opt/tritonserver/bin/tritonserver triton-{token}" \
        in output


@pytest.mark.parametrize(("argv", "starts"), [
    (["/venv/lib/pytriton/tritonserver/bin/tritonserver", "--model-repository=/r"], True),
    (["/venv/bin/python", "-I", "child_guard.py", "1", "25", "--", "/x/tritonserver", "--grpc-port=1"], True),
    (["/venv/bin/cliplora", "serve", "--repository", "r"], True),
    (["/venv/bin/cliplora", "serve", "--triton-url", "127.0.0.1:8001"], False),
    (["/venv/bin/cliplora", "serve", "--triton-url=127.0.0.1:8001"], False),
    (["/venv/bin/cliplora", "export", "--name", "serve"], False),
    (["/usr/bin/prometheus", "--config.file=p.yml"], False),
])
def test_what_starts_a_tritonserver(argv: list[str], starts: bool) -> None:
    assert process_marks.starts_triton(argv) is starts


def test_the_marks_each_start_needs() -> None:
    started = process_marks.Started([["git", "ls-files"], ["/usr/bin/openssl", "req"]])
    assert process_marks.missing_marks(started, []) == []  # quick tools need no mark
    started.commands.append(["kubectl", "kustomize", "deploy"])
    assert process_marks.missing_marks(started, ["parametrize"]) == [
        "started a process without one of the marks triton, subprocess, packaging: kubectl kustomize deploy"]
    for mark in process_marks.PROCESS_MARKS:
        assert process_marks.missing_marks(started, [mark]) == []
    started.commands.append(["tritonserver"])
    assert process_marks.missing_marks(started, ["subprocess"]) == [
        "started a tritonserver without @pytest.mark.triton: tritonserver"]
    assert process_marks.missing_marks(started, ["triton"]) == []


# -- ports ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("ephemeral", "expected"), [
    ((32768, 60999), range(10000, 32768)),  # Linux's default: the stretch below is the larger
    ((1024, 50000), range(50001, 65536)),
    ((10000, 65535), range(10000, 10000)),  # nothing left: PortPool then has no block to give
])
def test_the_ports_lie_outside_the_ephemeral_range(ephemeral: tuple[int, int], expected: range) -> None:
    assert ports.port_range(ephemeral) == expected


def test_the_ports_of_this_machine_are_outside_its_ephemeral_range() -> None:
    low, high = (int(n) for n in ports.EPHEMERAL.read_text().split())
    port = ports.free_port()
    assert not low <= port <= high and port >= 10000
    assert port != ports.free_port()


def test_two_sessions_never_share_a_block_and_a_port_in_use_is_skipped(tmp_path: Path) -> None:
    """Two pools on one lock folder stand for two test sessions on one machine."""
    span = range(20000, 20000 + 4 * ports.BLOCK)
    first, second = ports.PortPool(span, tmp_path), ports.PortPool(span, tmp_path)
    taken_first = {first.take() for _ in range(2 * ports.BLOCK)}
    taken_second = {second.take() for _ in range(2 * ports.BLOCK)}
    assert len(taken_first) == len(taken_second) == 2 * ports.BLOCK
    assert not taken_first & taken_second
    assert {(p - span.start) // ports.BLOCK for p in taken_first}.isdisjoint(
        {(p - span.start) // ports.BLOCK for p in taken_second})
    with pytest.raises(RuntimeError, match="every block of test ports"):
        first.take()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        busy = squatter.getsockname()[1]
        squatter.listen()
        third = ports.PortPool(range(busy, busy + ports.BLOCK), tmp_path / "other")
        assert third.take() == busy + 1


@pytest.mark.subprocess  # a fork
def test_a_forked_child_reserves_its_own_ports() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.write(write, str(ports.free_port()).encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    child_port = int(os.read(read, 16))
    os.close(read)
    assert status == 0
    assert child_port // ports.BLOCK != ports.free_port() // ports.BLOCK

