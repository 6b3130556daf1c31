"""The app of the long-run resource tests (T20-T22): ``taskmill worker faults.growth_app:app``.

The URL comes from ``TASKMILL_URL``; ``GROWTH_RESULT_TTL_S`` and ``GROWTH_PRUNE_INTERVAL_S``, when
set, give the app's ``result_ttl_s`` and ``prune_interval_s`` (T21's short retention). The task
``growth.step(fail)`` does nothing, or, with ``fail``, raises from ``DEPTH`` frames down, so the
worker formats and stores a deep traceback; ``growth.hold(seconds)`` sleeps. With
``GROWTH_TRACEMALLOC`` set (a file path), the worker process traces its allocations from import
and writes a snapshot there on SIGUSR1: the way to find what grows when T20 fails.
"""

from __future__ import annotations

import os
import signal
import time
import tracemalloc
from types import FrameType
from typing import Any

from taskmill import App

DEPTH = 50
"""Frames between the task's body and the ``raise`` of a failing step."""

RESULT_TTL_ENV = "GROWTH_RESULT_TTL_S"
PRUNE_INTERVAL_ENV = "GROWTH_PRUNE_INTERVAL_S"
TRACEMALLOC_ENV = "GROWTH_TRACEMALLOC"


def _settings() -> dict[str, Any]:
    options: dict[str, Any] = {}
    for env, name in ((RESULT_TTL_ENV, "result_ttl_s"), (PRUNE_INTERVAL_ENV, "prune_interval_s")):
        if env in os.environ:
            options[name] = float(os.environ[env])
    return options


app = App(os.environ.get("TASKMILL_URL", "memory://"), **_settings())


class DeepError(Exception):
    """What a failing step raises, ``DEPTH`` frames down."""


def _down(n: int) -> None:
    if n <= 0:
        raise DeepError("a failing step, deep down")
    _down(n - 1)


def run_step(fail: bool) -> None:
    """The body of ``growth.step`` (a producer registers it on its own app too)."""
    if fail:
        _down(DEPTH)


step = app.task(name="growth.step", retries=0)(run_step)


def run_hold(seconds: float) -> None:
    """The body of ``growth.hold``: a job that keeps its thread (T20 fills the pool with them)."""
    time.sleep(seconds)  # the job's work


hold = app.task(name="growth.hold", retries=0)(run_hold)


def _snapshot(signum: int, frame: FrameType | None) -> None:
    tracemalloc.take_snapshot().dump(os.environ[TRACEMALLOC_ENV])


if os.environ.get(TRACEMALLOC_ENV):
    tracemalloc.start(25)
    signal.signal(signal.SIGUSR1, _snapshot)
