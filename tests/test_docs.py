"""The repository's markdown links point at files that exist."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
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


def _table_script():
    """scripts/compatibility_table.py, imported by path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "compatibility_table", ROOT / "scripts" / "compatibility_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


def _table_rows(text: str) -> list[tuple[str, str, str]]:
    """(tool, result, test) of each row of a generated compatibility table."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"\| (.+) \| [^|]+ \| (.+) \| `([^`]+)` \|$", line)
        if m:
            rows.append((m[1], m[2], m[3]))
    return rows


def test_compatibility_table_rows_are_the_declared_rows() -> None:
    """docs/compatibility.md holds exactly the rows the tests declare (``compat_row``), in the
    script's order, each with its declared result or marked as not passed: the table cannot
    drift from the tests, and a row whose test failed when it was generated cannot read as a
    result."""
    script = _table_script()
    declared = script.declared_rows(ROOT)
    table = _table_rows((ROOT / "docs" / "compatibility.md").read_text())
    assert [(t, test) for t, _, test in table] == [(r.tool, r.test) for r in declared], (
        "docs/compatibility.md is out of date: run python scripts/compatibility_table.py"
    )
    for (_, result, test), row in zip(table, declared, strict=True):
        assert result == row.result or result.startswith("**"), f"{test}: {result!r}"


def test_compatibility_table_marks_rows_not_passed() -> None:
    """The script shows a row's result only when every case carrying it passed."""
    script = _table_script()
    row = script.Row("tool", ("torch",), "VMoBA", "tests/test_x.py", "test_y", "case")
    other = script.Row("tool 2", ("no-such-package-here",), "dense", "tests/test_x.py", "test_y")

    def item(outcome: str, *tools: str) -> dict:
        return dict(path="tests/test_x.py", function="test_y", tools=list(tools), outcome=outcome)

    cases = {"a[case]": item("passed", "tool"), "b[other]": item("passed", "tool 2")}
    assert [script.status(r, {"items": cases}) for r in (row, other)] == ["passed"] * 2
    cases["c[other]"] = item("failed", "tool 2")
    assert script.status(other, {"items": cases}) == "FAILED"
    assert script.status(row, {"items": {"b": item("skipped", "tool")}}) == "skipped"
    assert script.status(row, {"items": {}}) == "not run"
    rows = _table_rows(script.render([row, other], {"items": cases}))
    assert rows == [
        ("tool", "VMoBA", "tests/test_x.py::test_y[case]"),
        ("tool 2", "**FAILED** (asserts: dense)", "tests/test_x.py::test_y"),
    ]
    assert "no-such-package-here (not installed)" in script.render([other], {"items": {}})


def test_declared_rows_are_read_from_the_decorators(tmp_path: Path) -> None:
    """Rows are read without importing the tests: a mark on the function covers all its cases,
    one on a ``pytest.param`` its case; a ``compat_row`` anywhere else, or with an argument
    that is not a literal, is an error (the table could not show it)."""
    script = _table_script()
    tests = tmp_path / "tests"
    tests.mkdir()
    row = 'compat_row(tool="{}", packages=("torch",), result="r")'
    (tests / "test_a.py").write_text(
        f"@{row.format('f')}\n"
        "@pytest.mark.parametrize('x', [1, 2])\n"
        "def test_f(x): ...\n\n"
        f"@pytest.mark.parametrize('x', [pytest.param(1, id='one', marks={row.format('g')})])\n"
        "def test_g(x): ...\n"
    )
    rows = script.declared_rows(tmp_path)
    assert [(r.tool, r.test) for r in rows] == [
        ("f", "tests/test_a.py::test_f"),
        ("g", "tests/test_a.py::test_g[one]"),
    ]
    for bad, match in [
        (f"def test_h():\n    {row.format('h')}\n", "outside a test's decorators"),
        ("R = 'r'\n@compat_row(tool='h', packages=(), result=R)\ndef test_h(): ...\n", "literal"),
    ]:
        (tests / "test_b.py").write_text(bad)
        with pytest.raises(ValueError, match=match):
            script.declared_rows(tmp_path)
