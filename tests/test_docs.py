"""The repository's markdown links point at files that exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _markdown_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    if not listed:  # not a git checkout (an sdist): every markdown file on disk
        found = ROOT.rglob("*.md")  # hidden folders (.ci-venv, .git) are not the project's
        return [p for p in found if not any(x.startswith(".") for x in p.relative_to(ROOT).parts)]
    return [ROOT / f for f in listed]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        if not (path.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)} links to missing files: {broken}"


def test_compatibility_table_names_tests_that_exist() -> None:
    """docs/compatibility.md states results by test: each test it names is in the suite."""
    table = (ROOT / "docs" / "compatibility.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", table)
    assert len(named) >= 10
    missing = [
        f"{path}::{test}"
        for path, test in named
        if not re.search(rf"^def {test}\(", (ROOT / path).read_text(), re.M)
    ]
    assert not missing, f"docs/compatibility.md names tests that do not exist: {missing}"
