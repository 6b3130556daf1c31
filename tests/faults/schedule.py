"""Fault schedules drawn from a seed: the same seed gives the same schedule.

The seed comes from ``FAULTS_SEED`` when set (to replay a run), else from the OS; a test prints
the seed it used, so a failure names the value to replay with.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

SEED_ENV = "FAULTS_SEED"


def seed_from_env() -> int:
    """``FAULTS_SEED`` if set, else a fresh random seed."""
    value = os.environ.get(SEED_ENV)
    return int(value) if value else random.SystemRandom().randrange(2**32)


@dataclass(frozen=True)
class Kill:
    at_s: float
    """Seconds after the start of the fault phase."""
    target: int
    """Which process to kill: an index into the live candidates sorted by pid, taken modulo
    their number at the time (restarted processes get new pids)."""


def kill_schedule(seed: int, count: int, every_s: float, jitter_s: float = 0.5) -> list[Kill]:
    """``count`` kills about ``every_s`` apart (each gap ± ``jitter_s``)."""
    rng = random.Random(seed)
    kills, at = [], 0.0
    for _ in range(count):
        at += every_s + rng.uniform(-jitter_s, jitter_s)
        kills.append(Kill(round(at, 3), rng.randrange(1_000)))
    return kills
