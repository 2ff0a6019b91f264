"""Rows of docs/compatibility.md, declared by the tests that assert them.

A test declares the row it asserts with :func:`compat_row`, a mark on the test function or on one
of its ``pytest.param`` cases::

    @compat_row(tool="first-block cache", packages=("diffusers",), result="VMoBA in ...")
    def test_first_block_cache_runs_vmoba_in_every_block(plain): ...

    @pytest.mark.parametrize("tool", [pytest.param(f, id="cast", marks=compat_row(...))])

The arguments must be literals: ``scripts/compatibility_table.py`` reads the declarations from
the test files without importing them (so a test that fails to import or to set up still has its
row, shown FAILED), and ``tests/test_docs.py`` checks that the table holds exactly the declared
rows. Loaded as a plugin (``pytest -p compat_rows --compat-json out.json``, with ``tests/`` on
``sys.path``), this module writes each marked test's outcome; the script turns them into the
table: a row reads its result only when every test case carrying it passed.

``packages`` are distribution names; the table shows the version installed where it ran
(``importlib.metadata``), never a version written by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

MARK = "compat"
_OUTCOMES = pytest.StashKey[dict[str, dict[str, Any]]]()


def compat_row(*, tool: str, packages: tuple[str, ...], result: str) -> pytest.MarkDecorator:
    """The mark that declares a row of docs/compatibility.md.

    Args:
        tool: the tool column (markdown).
        packages: distributions whose installed versions make the version column.
        result: what the test asserts, shown when it passed (markdown).
    """
    return getattr(pytest.mark, MARK)(tool=tool, packages=tuple(packages), result=result)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--compat-json",
        default=None,
        help="write the outcome of every test marked with a compatibility row to this file",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARK}(tool, packages, result): a compatibility row")
    config.stash[_OUTCOMES] = {}


def _merge(old: str | None, new: str) -> str:
    """A test case's outcome over its phases: failed beats skipped beats passed."""
    order = ["passed", "skipped", "failed"]
    return new if old is None else max(old, new, key=order.index)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    report = yield
    rows = [m.kwargs for m in item.iter_markers(MARK)]
    if rows:
        outcome = "failed" if getattr(report, "wasxfail", None) is not None else report.outcome
        entry = item.config.stash[_OUTCOMES].setdefault(
            item.nodeid,
            dict(
                path=Path(str(item.path)).relative_to(item.config.rootpath).as_posix(),
                function=getattr(item, "originalname", item.name),
                tools=[r["tool"] for r in rows],
                outcome=None,
            ),
        )
        entry["outcome"] = _merge(entry["outcome"], outcome)
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = session.config.getoption("--compat-json")
    if path:
        items = session.config.stash[_OUTCOMES]
        Path(path).write_text(json.dumps(dict(items=items, exitstatus=int(exitstatus)), indent=1))
