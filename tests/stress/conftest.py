"""The stress suite's fixtures: a record for each trial, and the figures at the end."""

from __future__ import annotations

import pytest
from trials import RESULTS, Kind, Trial, write_report


@pytest.fixture
def trial(request):
    """The record of this trial, counted whatever its outcome."""
    kind_name, title = request.node.get_closest_marker("kind").args
    kind = RESULTS.setdefault(kind_name, Kind(title))
    record = Trial(kind, request.node.callspec.params.get("number", 0))
    yield record
    kind.run += 1
    kind.leftovers += bool(record.left)
    kind.lost += record.lost
    if record.cleanup is not None:
        kind.cleanups.append(record.cleanup)
    if record.moment is not None:
        kind.moments.append(record.moment)
    outcome = getattr(request.node, "outcome", None)
    if outcome is not None and outcome.failed:
        kind.failed.append(f"trial {record.number}: {outcome.longreprtext.splitlines()[-1]}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "call":
        item.outcome = report


def pytest_sessionfinish(session):
    write_report()
