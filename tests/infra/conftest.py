"""The pytest-testinfra checks that `invoke verify` runs against real hosts.

Nothing here is collected unless ``--pullback-inventory`` is given: the normal test run
(``testpaths = ["tests"]``) must never try to reach servers. ``pytest_ignore_collect``
(not a skip marker) keeps these files out of collection entirely.

With ``--pullback-results FILE`` every check's outcome is written there as one JSON line
(host, the check's docstring, PASS/FAIL/SKIP/ERROR, the failure message) for verify's
report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

INVENTORY_OPTION = "--pullback-inventory"
RESULTS_OPTION = "--pullback-results"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pullback", "pullback verify")
    group.addoption(INVENTORY_OPTION, default=None,
                    help="inventory whose hosts the tests/infra checks expect")
    group.addoption(RESULTS_OPTION, default=None,
                    help="write one JSON line per check result to this file")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if config.getoption(INVENTORY_OPTION, default=None) is None:
        return True
    return None


def _message(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (file, line, reason)
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(longrepr)
    # An assertion's own message is its first line; pytest's introspection follows.
    first = text.strip().splitlines()[0] if text.strip() else ""
    for prefix in ("AssertionError: ", "Failed: "):
        first = first.removeprefix(prefix)
    return first[:500]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    path = item.config.getoption(RESULTS_OPTION, default=None)
    if not path:
        return
    if report.when == "call":
        status = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}[report.outcome]
    elif report.when == "setup" and report.outcome != "passed":
        status = "SKIP" if report.outcome == "skipped" else "ERROR"
    else:
        return
    callspec = getattr(item, "callspec", None)
    host = callspec.id.split("://", 1)[-1] if callspec else "local"
    doc = (getattr(item, "function", None).__doc__ or item.name).strip().splitlines()[0]
    record = {"host": host, "check": doc, "status": status,
              "message": "" if status == "PASS" else _message(report)}
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
