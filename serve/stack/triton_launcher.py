"""Start and stop the ``tritonserver`` of the nvidia-pytriton wheel for the local stack.

Recipe (verified on this project's machines; docs/architecture.md, "Local Triton"): a backend directory of our own holds the
wheel's ``python`` backend folder with the stub for this Python copied into it
(symlinks are refused: "escapes backend directory") and our ``onnxruntime/model.py``;
``LD_LIBRARY_PATH`` gets the wheel's ``nvidia_pytriton.libs``; ``PATH`` starts with
this virtual environment's ``bin`` so the stub's embedded Python finds our packages
(onnxruntime, numpy), as PyTriton itself arranges it.

Triton listens on loopback only, polls the repository (new exports appear by
themselves), keeps running when one model fails to load, and logs to a file. It runs
under `cliplora.serve.stack.child_guard`, so its Python-backend stubs never outlive it
(docs/reliability.md, "Supervision and orphans").
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cliplora.core.errors import InvalidArgument, NotFound
from cliplora.serve.stack.processes import KILL_WAIT_S, GuardedChild, kill_guarded

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


class LocalTriton(GuardedChild):
    """A tritonserver child process serving `repository` (`GuardedChild`: `process` is its
    guard, which exits as tritonserver did; `server_pid` is tritonserver itself)."""

    name = "triton"
    start_timeout_s = 120.0  # every model loaded (a cold ONNX Runtime session per instance)
    EXIT_TIMEOUT_S = 10  # --exit-timeout-secs: in-flight inferences finish on SIGTERM
    grace_s = EXIT_TIMEOUT_S + KILL_WAIT_S

    def __init__(
        self,
        repository: Path,
        *,
        ports: TritonPorts = TritonPorts(),
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        poll_seconds: int = 2,
    ) -> None:
        super().__init__(log_path)
        self.repository = Path(repository).resolve()
        self.ports = ports
        self.host = host
        self.poll_seconds = poll_seconds
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
        """The tritonserver process, None when not running."""
        return self.command_pid

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

    def __enter__(self) -> LocalTriton:
        self.start()
        return self
