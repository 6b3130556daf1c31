"""Hypothesis profiles for the property tests: ``ci`` (the default) is derandomised (the same
examples every run, so a failure reproduces and CI is never flaky) and sized for each module to
run in seconds; ``TASKMILL_HYPOTHESIS=nightly`` runs many more examples, still derandomised;
``TASKMILL_HYPOTHESIS=explore`` draws fresh random examples (to hunt, not to gate)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

HERE = Path(__file__).parent
_COMMON = settings(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
settings.register_profile("ci", _COMMON, max_examples=1_000, derandomize=True)
settings.register_profile("nightly", _COMMON, max_examples=100_000, derandomize=True)
settings.register_profile("explore", _COMMON, max_examples=5_000, derandomize=False)
PROFILE = os.environ.get("TASKMILL_HYPOTHESIS", "ci")
settings.load_profile(PROFILE)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The larger profiles run for minutes to hours per test: past the 60 s default timeout
    (the ``ci`` profile keeps it)."""
    if PROFILE != "ci":
        for item in items:
            if item.path.parent == HERE:
                item.add_marker(pytest.mark.timeout(6 * 3600))
