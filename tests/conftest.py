from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import factories, leftovers, process_marks

pytest_plugins = ["pytester"]  # tests/test_harness.py runs sessions inside its tests

# Made at import, before any test runs: every process the session starts inherits its variable.
# 15 s: processes stopped in the last teardown may still be exiting.
LEFTOVERS = leftovers.SessionCheck(wait_s=15.0)


def pytest_configure(config: pytest.Config) -> None:
    """The session-end check for leftover processes (tests/leftovers.py) and the check that a
    test starting a process carries the mark for it (tests/process_marks.py)."""
    config.pluginmanager.register(LEFTOVERS, "cliplora-leftovers")
    config.pluginmanager.register(process_marks.ProcessWatch(), "cliplora-process-marks")


@pytest.fixture(scope="session", autouse=True)
def _deterministic() -> None:
    torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Each test draws its random tensors from the same seed, whatever ran before it
    (loading a model no longer reseeds the process: cliplora.model.base_model)."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return factories.write_config(tmp_path_factory.mktemp("configs"))


@pytest.fixture(scope="session")
def tiny_base(tiny_config: Path):
    from cliplora.model.base_model import load_base_model

    return load_base_model(str(tiny_config), None, allow_random_weights=True)


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path) -> Path:
    """`base` and `lora` published once for every serving test (tests add, never keep, models)."""
    from tests.serving import publish_tiny_models

    return publish_tiny_models(tmp_path_factory.mktemp("tiny-repository"), tiny_config)


@pytest.fixture(scope="session")
def tiny_triton(tiny_repository: Path):
    """One real tritonserver on `tiny_repository` for every test that only reads it (a test
    that adds a model takes it out again; tests that kill or stall Triton start their own)."""
    from cliplora.serve.stack.triton_launcher import LocalTriton
    from tests.serving import triton_ports

    with LocalTriton(tiny_repository, ports=triton_ports()) as server:
        yield server


@pytest.fixture()
def classes_file(tmp_path: Path) -> Path:
    return factories.write_classes(tmp_path / "classes.txt")
