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
