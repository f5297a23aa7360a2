"""Fault-test bookkeeping: every test records the faults it injected and what they cost.

Set ``INFLUENCESPACE_FAULT_REPORT=/path/report.json`` to keep the records of a session; docs/reliability.md
counts faults injected, runs survived and rows lost from such a report.
"""

from __future__ import annotations

import json
import os

import pytest

_RECORDS: list[dict] = []


@pytest.fixture
def record_fault(request):
    """``record_fault(fault, outcome, injected=1, rows_lost=0)`` for the calling test (after its asserts).

    ``injected``: how many faults of this kind the test injected. A recorded fault was survived: the test
    reached the call, so the run finished with the reference result or stopped with a clear error.
    """

    def record(fault: str, outcome: str, injected: int = 1, rows_lost: int = 0) -> None:
        _RECORDS.append(
            {"test": request.node.nodeid, "fault": fault, "outcome": outcome, "injected": injected, "rows_lost": rows_lost}
        )

    return record


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("INFLUENCESPACE_FAULT_REPORT")
    if out and _RECORDS:
        with open(out, "w") as f:
            json.dump(_RECORDS, f, indent=1)
