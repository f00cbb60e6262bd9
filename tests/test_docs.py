"""The repository stands on its own: its docs and docstrings cite its own files."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"DESIGN\.md|STYLE\.md|\.\./shared|\.\./\.library")


def tracked_text_files() -> list[Path]:
    """Every tracked file that is text (binary files, e.g. images, hold a NUL byte)."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    paths = [ROOT / n for n in names if n and (ROOT / n).is_file()]
    return [p for p in paths if b"\0" not in p.read_bytes()[:8192]]


def test_nothing_cites_files_outside_the_repository() -> None:
    files = tracked_text_files()
    assert len(files) > 50
    found = [f"{path.relative_to(ROOT)}:{number}" for path in files if path.name != "test_docs.py"
             for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert found == []


def test_the_check_finds_a_citation() -> None:
    assert OUTSIDE.search('"""The error table (DESIGN.md §4)."""') and not OUTSIDE.search("docs/architecture.md")


# `python -m serve.x` and friends: the module paths from before the single namespace.
BARE_MODULE = re.compile(r"-m\s+(export|serve|loadtest|finetune)\.")


def test_commands_name_modules_by_their_installed_path() -> None:
    found = [f"{path.relative_to(ROOT)}:{number}" for path in tracked_text_files() if path.name != "test_docs.py"
             for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if BARE_MODULE.search(line)]
    assert found == []
    assert BARE_MODULE.search("python -m loadtest.paths") and not BARE_MODULE.search("python -m cliplora.loadtest.paths")


# A path of this repository named in a doc, a comment or a docstring (`export/verify.py`,
# `tests/test_faults.py::test_x`, `tests/test_deploy_*.py`).
REPOSITORY_PATH = re.compile(r"(?<![\w./-])((?:cliplora|export|serve|loadtest|finetune|tests|docs|deploy|proto|\.ci)/"
                             r"[\w./*-]*[\w*])")
# Paths that are not this tree's: inside the built wheel, the proto's import path in its
# generated stubs, the schema ids of vendored JSON schemas; this file's own examples.
NOT_TREE_PATHS = ("tests/test_packaging.py", "tests/test_docs.py", "cliplora/v1/", "deploy/k8s/schemas/")


def missing_paths(text: str, base: Path) -> list[str]:
    missing = []
    for match in REPOSITORY_PATH.finditer(text):
        reference = match.group(1).split("::")[0].rstrip(".")
        if "*" in reference:
            if not any(ROOT.glob(reference)):
                missing.append(reference)
        elif not (ROOT / reference).exists() and not (base / reference).exists():
            missing.append(reference)
    return missing


def test_every_repository_path_named_exists() -> None:
    found = [f"{path.relative_to(ROOT)}:{number}: {reference}" for path in tracked_text_files()
             if not str(path.relative_to(ROOT)).startswith(NOT_TREE_PATHS)
             for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
             for reference in missing_paths(line, path.parent)]
    assert found == []
    assert missing_paths("see `tests/test_deploy.py` and export/lora_paper.py", ROOT) == [
        "tests/test_deploy.py", "export/lora_paper.py"]
    assert missing_paths("`tests/test_deploy_*.py`, tests/test_faults.py::test_slow, docs/architecture.md.", ROOT) == []
