"""Hypothesis profiles for the property tests: ``ci`` (the default) is derandomised (the same
examples every run, so a failure reproduces and CI is never flaky) and sized for each module to
run in seconds; ``TASKMILL_HYPOTHESIS=nightly`` runs many more examples, still derandomised;
``TASKMILL_HYPOTHESIS=explore`` draws fresh random examples (to hunt, not to gate)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = settings(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
settings.register_profile("ci", _COMMON, max_examples=1_000, derandomize=True)
settings.register_profile("nightly", _COMMON, max_examples=100_000, derandomize=True)
settings.register_profile("explore", _COMMON, max_examples=5_000, derandomize=False)
settings.load_profile(os.environ.get("TASKMILL_HYPOTHESIS", "ci"))
