"""The repository stands on its own: its docs and docstrings cite its own files."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"DESIGN\.md|STYLE\.md|\.\./shared|\.\./\.library")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / n for n in names if n.endswith((".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".txt", ".proto"))
            and (ROOT / n).is_file()]


def test_nothing_cites_files_outside_the_repository() -> None:
    files = tracked_text_files()
    assert len(files) > 50
    found = [f"{path.relative_to(ROOT)}:{number}" for path in files if path.name != "test_docs.py"
             for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert found == []


def test_the_check_finds_a_citation() -> None:
    assert OUTSIDE.search('"""The error table (DESIGN.md §4)."""') and not OUTSIDE.search("docs/architecture.md")
