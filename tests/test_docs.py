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


# docs/benchmarks.md: every figure carries the command that made it and its raw record. A
# section (the text under its own heading, down to the next heading of any level) that holds
# a figure must also hold a command and a reference to an existing record under
# docs/benchmark-runs/. The text before the first `##` (the machine) is exempt.
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
HEADING = re.compile(r"^#{1,6} ")
# A measured quantity: a number with a unit or a ratio sign, or a number in a table's row.
FIGURE = re.compile(r"\d(?:[\d,]*\d)?(?:\.\d+)?\s?(?:ms|s|req/s|infer/s|prompts/s|images/s|GB|GiB|MB|MiB|KB|%)(?![\w/])"
                    r"|×\s?\d|\d\s?×|\b\d+\.\d+\b")
TABLE_RULE = re.compile(r"^\|[\s|:-]+\|$")
COMMAND = re.compile(r"`(?:\.venv/bin/)?(?:cliplora |python |perf_analyzer |/usr/bin/time |make )[^`]*`"
                     r"|`[\w./-]+\.sh`|^```bash$", re.MULTILINE)
RECORD = re.compile(r"(?:docs/)?benchmark-runs/[\w./*-]*")


def benchmark_sections(text: str) -> list[tuple[str, list[str]]]:
    """(heading, lines) of each section from the first `##` on; code blocks stay in their section."""
    sections: list[tuple[str, list[str]]] = []
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and HEADING.match(line):
            sections.append((line, []))
        elif sections:
            sections[-1][1].append(line)
    return [(heading, lines) for heading, lines in sections if not heading.startswith("# ")]


def unbacked_figures(text: str, docs: Path) -> list[str]:
    """'heading: what is missing (first figure line)' for each section whose figures lack a
    command or an existing record."""
    problems = []
    for heading, lines in benchmark_sections(text):
        prose, fenced = [], False
        for line in lines:
            if line.startswith("```"):
                fenced = not fenced
            elif not fenced and not TABLE_RULE.match(line):
                prose.append(line)
        figures = [line for line in prose if FIGURE.search(line)]
        if not figures:
            continue
        body = "\n".join(lines)
        records = list(dict.fromkeys(r.rstrip(".") for r in RECORD.findall(body)))
        missing = [what for what, found in (("command", COMMAND.search(body)), ("record", records)) if not found]
        missing += [f"record {r} (no such path)" for r in records
                    if not any((base / r.removeprefix("docs/")).exists() for base in (docs, docs.parent))]
        if missing:
            problems.append(f"{heading.lstrip('# ')}: no {', no '.join(missing)} (figure: {figures[0].strip()[:80]})")
    return problems


def test_every_benchmark_figure_has_its_command_and_record() -> None:
    assert unbacked_figures(BENCHMARKS.read_text(), BENCHMARKS.parent) == []


def test_the_benchmark_check_finds_a_figure_without_command_or_record() -> None:
    docs = BENCHMARKS.parent
    backed = "## A\n\n```bash\ncliplora loadtest --report x\n```\n\np50 **12.5 ms** ([record](benchmark-runs/final/c1/))\n"
    assert unbacked_figures("# Title\n\n2 cores, 24 GiB\n\n" + backed, docs) == []
    no_command = "## B\n\nthroughput 4.37 req/s, record: `benchmark-runs/final/c2/report.json`\n"
    no_record = "## C\n\n`cliplora loadtest --concurrency 2`\n\n| model | p50 |\n|---|---|\n| base | 454.5 |\n"
    gone = "### D\n\n`python -m cliplora.loadtest.paths` gave 2.87× (benchmark-runs/nowhere.json)\n"
    assert unbacked_figures(backed + no_command + no_record + gone, docs) == [
        "B: no command (figure: throughput 4.37 req/s, record: `benchmark-runs/final/c2/report.json`)",
        "C: no record (figure: | base | 454.5 |)",
        "D: no record benchmark-runs/nowhere.json (no such path) (figure: `python -m cliplora.loadtest.paths` gave 2.87× (benchmark-runs/nowhere.json))"]
    assert unbacked_figures("## E\n\nSee the GPU script: fp16 and fp32, batch 1 and 32, not run.\n", docs) == []
