from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import factories


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


@pytest.fixture()
def classes_file(tmp_path: Path) -> Path:
    return factories.write_classes(tmp_path / "classes.txt")


def tree_snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its content (None for folders), to prove nothing changed."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }
