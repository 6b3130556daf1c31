"""Loaded (through ``PYTHONPATH``) only by the fault tests' processes that run on a clock
offset by libfaketime (``faults.processes.faketime_env``).

libfaketime 0.9.10 (Debian 12) with ``FAKETIME_DONT_FAKE_MONOTONIC=1`` makes
``clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)`` fail with EINVAL, which is how
``time.sleep`` sleeps since Python 3.11: every ``time.sleep`` would raise ``OSError``. Faking
the monotonic clock too is worse (a ``threading.Event.wait`` with a timeout never returns).
So here ``time.sleep`` waits on an event instead, which sleeps on the real monotonic clock.
"""

from __future__ import annotations

import threading
import time
from typing import SupportsIndex


def _sleep(seconds: float | SupportsIndex) -> None:
    value = float(seconds)
    if value < 0:
        raise ValueError("sleep length must be non-negative")
    threading.Event().wait(value)


time.sleep = _sleep
