"""What `pip install` puts on a machine: one import name, `cliplora`, in layers that
import-linter keeps honest (docs/architecture.md).

The wheel is built once from the working tree (no build isolation: the virtual
environment's setuptools, no network) and unpacked; import-linter then reads the
package as it is installed, where `cliplora/export/...` is a real folder. Both checks are
shown to fail on a planted defect, so they cannot pass by accident.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
pytestmark = pytest.mark.packaging


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # A copy of the sources: building in place would leave build/ and *.egg-info behind.
    source = build / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                                ".pytest_cache", "model_repository", "logs", "bench",
                                                                "docs", "deploy"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "--wheel-dir", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("cliplora-*.whl")
    return path


def top_level_names(wheel: Path) -> set[str]:
    """The import names a wheel installs: its top-level folders and modules, metadata aside."""
    with zipfile.ZipFile(wheel) as archive:
        names = {name.split("/", 1)[0] for name in archive.namelist()}
    return {n.removesuffix(".py") for n in names if not n.endswith((".dist-info", ".data"))}


def test_the_wheel_installs_one_namespace(wheel: Path) -> None:
    assert top_level_names(wheel) == {"cliplora"}
    with zipfile.ZipFile(wheel) as archive:
        files = set(archive.namelist())
    for module in ("cliplora/export/pipeline.py", "cliplora/serve/gateway/service.py", "cliplora/loadtest/runner.py",
                   "cliplora/finetune/train.py", "cliplora/core/contract.py", "cliplora/model/merge.py",
                   "cliplora/serve/stack/triton_backend/onnxruntime/model.py", "cliplora/v1/classifier_pb2.py",
                   "cliplora/core/data/bpe_simple_vocab_16e6.txt.gz"):  # the tokenizer's vocabulary
        assert module in files, module
    entry_points = next(n for n in files if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as archive:
        assert "cliplora = cliplora.cli:main" in archive.read(entry_points).decode()


def test_the_check_sees_a_second_top_level_name(tmp_path: Path, wheel: Path) -> None:
    """What the old layout shipped (`serve/` beside `cliplora/`) is caught."""
    planted = tmp_path / wheel.name
    shutil.copy(wheel, planted)
    with zipfile.ZipFile(planted, "a") as archive:
        archive.writestr("serve/__init__.py", "")
    assert top_level_names(planted) == {"cliplora", "serve"}


def _unpacked(wheel: Path, folder: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(folder)
    return folder


def lint_imports(site: Path) -> subprocess.CompletedProcess[str]:
    """import-linter with the contracts of pyproject.toml on the package unpacked at `site`."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([str(LINT_IMPORTS), str(ROOT / "pyproject.toml"), "--no-cache"],
                          capture_output=True, text=True, env=env, cwd=site, timeout=300)


def test_layers_hold(tmp_path: Path, wheel: Path) -> None:
    done = lint_imports(_unpacked(wheel, tmp_path / "site"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 4 kept, 0 broken" in done.stdout, done.stdout


@pytest.mark.parametrize(("module", "planted"), [
    ("cliplora/core/contract.py", "import cliplora.model.head\n"),  # the core importing upwards
    ("cliplora/export/pipeline.py", "import cliplora.serve.gateway.service\n"),  # one stage importing another
    ("cliplora/serve/gateway/service.py", "import torch\n"),  # torch in the gateway image
    ("cliplora/serve/gateway/server.py", "import cliplora.serve.stack.supervisor\n"),  # the stack in the gateway image
    ("cliplora/loadtest/runner.py", "import serve\n"),  # a bare stage name
])
def test_layers_catch_a_wrong_import(tmp_path: Path, wheel: Path, module: str, planted: str) -> None:
    site = _unpacked(wheel, tmp_path / "site")
    path = site / module
    path.write_text(path.read_text() + planted)
    done = lint_imports(site)
    assert done.returncode != 0 and "BROKEN" in done.stdout, done.stdout
