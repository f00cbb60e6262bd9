"""Start and stop the ``tritonserver`` of the nvidia-pytriton wheel for the local stack.

Recipe (verified on this project's machines; docs/architecture.md, "Local Triton"): a backend directory of our own holds the
wheel's ``python`` backend folder with the stub for this Python copied into it
(symlinks are refused: "escapes backend directory") and our ``onnxruntime/model.py``;
``LD_LIBRARY_PATH`` gets the wheel's ``nvidia_pytriton.libs``; ``PATH`` starts with
this virtual environment's ``bin`` so the stub's embedded Python finds our packages
(onnxruntime, numpy), as PyTriton itself arranges it.

Triton listens on loopback only, polls the repository (new exports appear by
themselves), keeps running when one model fails to load, and logs to a file. It runs
under `cliplora.serve.child_guard`, so its Python-backend stubs never outlive it
(docs/reliability.md, "Supervision and orphans").
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cliplora.core.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from cliplora.serve.processes import (
    KILL_WAIT_S,
    guarded_pid,
    http_ok,
    kill_guarded,
    start_guarded,
    stop_guarded,
    wait_http_ok,
)

BACKEND_SOURCE = Path(__file__).parent / "triton_backend" / "onnxruntime" / "model.py"


@dataclass(frozen=True)
class TritonPorts:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    def __post_init__(self) -> None:
        ports = (self.http, self.grpc, self.metrics)
        if not all(1 <= port <= 65535 for port in ports) or len(set(ports)) != 3:
            raise InvalidArgument(f"Triton needs three different ports in 1..65535, got {ports}")

    @classmethod
    def parse(cls, text: str) -> TritonPorts:
        """From ``HTTP,GRPC,METRICS`` (the ``--triton-ports`` flag)."""
        parts = text.split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise InvalidArgument(f"--triton-ports must be HTTP,GRPC,METRICS (three port numbers), got {text!r}")
        return cls(*(int(p) for p in parts))


def _pytriton_paths() -> tuple[Path, Path, Path, Path]:
    """(tritonserver binary, python backend folder, stub for this Python, libs folder)."""
    try:
        import pytriton
        from pytriton.utils.distribution import get_libs_path
    except ImportError:
        raise NotFound("nvidia-pytriton is not installed: run `make install`") from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    paths = (root / "bin" / "tritonserver", root / "backends" / "python",
             root / "python_backend_stubs" / version / "triton_python_backend_stub", Path(get_libs_path()))
    for path in paths:
        if not path.exists():
            raise NotFound(f"the nvidia-pytriton wheel lacks {path}")
    return paths


def build_backend_directory(target: Path) -> Path:
    """Lay out ``target/python`` (+ stub) and ``target/onnxruntime/model.py``."""
    _, python_backend, stub, _ = _pytriton_paths()
    shutil.copytree(python_backend, target / "python", dirs_exist_ok=True)
    shutil.copy2(stub, target / "python" / stub.name)
    (target / "onnxruntime").mkdir(parents=True, exist_ok=True)
    shutil.copy2(BACKEND_SOURCE, target / "onnxruntime" / "model.py")
    return target


class LocalTriton:
    """A tritonserver child process serving `repository`.

    `process` is its guard (`cliplora.serve.child_guard`), which exits as tritonserver did;
    `server_pid` is tritonserver itself.
    """

    name = "triton"
    start_timeout_s = 120.0  # every model loaded (a cold ONNX Runtime session per instance)
    EXIT_TIMEOUT_S = 10  # --exit-timeout-secs: in-flight inferences finish on SIGTERM

    def __init__(
        self,
        repository: Path,
        *,
        ports: TritonPorts = TritonPorts(),
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        poll_seconds: int = 2,
    ) -> None:
        self.repository = Path(repository).resolve()
        self.ports = ports
        self.host = host
        self.poll_seconds = poll_seconds
        self._work = Path(tempfile.mkdtemp(prefix="cliplora-triton-"))
        self.log_path = Path(log_path) if log_path else self._work / "triton.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._prepared = False

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports.metrics}/metrics"

    @property
    def ready_url(self) -> str:
        return f"{self.http_url}/v2/health/ready"

    @property
    def server_pid(self) -> int | None:
        """The tritonserver process (the guard's only child), None when not running."""
        return guarded_pid(self.process)

    def command(self) -> list[str]:
        binary = _pytriton_paths()[0]
        return [
            str(binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self._work / 'backends'}",
            f"--http-address={self.host}", f"--http-port={self.ports.http}",
            f"--grpc-address={self.host}", f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.host}", f"--metrics-port={self.ports.metrics}",
            "--model-control-mode=poll", f"--repository-poll-secs={self.poll_seconds}",
            "--exit-on-error=false", "--strict-readiness=false", f"--exit-timeout-secs={self.EXIT_TIMEOUT_S}",
            "--log-verbose=0",
        ]

    def environment(self) -> dict[str, str]:
        libs = _pytriton_paths()[3]
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        return env

    def prepare(self) -> None:
        """Check the repository and lay out the backend folder (once; every restart reuses it)."""
        if not self.repository.is_dir():
            raise NotFound(f"model repository {self.repository} does not exist")
        if not self._prepared:
            build_backend_directory(self._work / "backends")
            self._prepared = True

    def launch(self) -> None:
        """Start tritonserver (under its guard) and return at once; `start` also waits."""
        self.prepare()
        self.process = start_guarded(self.command(), self.log_path, env=self.environment(),
                                     grace_s=self.EXIT_TIMEOUT_S + KILL_WAIT_S)

    def start(self, timeout_s: float = start_timeout_s) -> LocalTriton:
        self.launch()
        self.wait_ready(timeout_s)
        return self

    def is_ready(self) -> bool:
        return http_ok(self.ready_url)

    def wait_ready(self, timeout_s: float) -> None:
        assert self.process is not None, "start() first"
        outcome = wait_http_ok(self.process, self.ready_url, timeout_s)
        if outcome == "ready":
            return
        if outcome == "exited":
            raise FailedPrecondition(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
        self.stop()
        raise Unavailable(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = EXIT_TIMEOUT_S + 2 * KILL_WAIT_S) -> None:
        """SIGTERM (Triton drains), then its whole process group SIGKILLed after the guard's
        grace period (or `timeout_s`, whichever comes first)."""
        stop_guarded(self.process, timeout_s)
        self.process = None

    def kill(self) -> None:
        """SIGKILL to tritonserver alone, as a crash would (tests of the fault handling);
        the guard then ends its stubs. Returns once all of it is gone."""
        pid = self.server_pid
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        if self.process is not None:
            try:
                self.process.wait(KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                kill_guarded(self.process)
        self.process = None

    def kill_group(self) -> None:
        """tritonserver and everything it started SIGKILLed now (a hung Triton, a restart)."""
        kill_guarded(self.process)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
