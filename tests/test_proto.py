"""The committed gRPC stubs are what `make proto` generates from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["classifier_pb2.py", "classifier_pb2.pyi", "classifier_pb2_grpc.py"]


@pytest.mark.subprocess
def test_stubs_are_up_to_date(tmp_path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "proto"), f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(ROOT / "proto/cliplora/v1/classifier.proto")],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "cliplora" / "v1" / name).read_text()
        committed = (ROOT / "cliplora" / "v1" / name).read_text()
        assert fresh == committed, f"cliplora/v1/{name} is stale: run `make proto`"
