"""The fault suite's two sizes: CI (the default, minutes for the whole tier) and full (``make
soak``, hours allowed). ``FAULTS_SIZE=full`` picks the full size; every fault test takes its
numbers (jobs, faults, durations, its timeout) through :func:`sized`."""

from __future__ import annotations

import os
from typing import TypeVar

SIZE_ENV = "FAULTS_SIZE"

T = TypeVar("T")


def size() -> str:
    """``"ci"`` or ``"full"``; anything else in ``FAULTS_SIZE`` is an error, not a silent CI run."""
    value = os.environ.get(SIZE_ENV, "ci")
    if value not in ("ci", "full"):
        raise ValueError(f"{SIZE_ENV} must be 'ci' or 'full', not {value!r}")
    return value


def sized(ci: T, full: T) -> T:
    """``ci`` at CI size, ``full`` under ``FAULTS_SIZE=full``."""
    return full if size() == "full" else ci
