"""Faults scripted into an example's fake service: per key (a path, a project, a persona's
source), the next calls fail in the order given, one fault each, then calls succeed again. A
fault is a word the fake understands (``"429"``, ``"timeout"``, ...); a word it does not is
refused when scripted, not when a call meets it."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class FaultScript(Generic[K]):
    """The scripted faults of one fake, safe to use from its request threads.

    >>> script = FaultScript[str](lambda f: f in ("500", "timeout"), "'500' or 'timeout'")
    >>> script.add("/sms", ["500", "timeout"])
    >>> script.next("/sms"), script.pending("/sms"), script.next("/sms"), script.next("/sms")
    ('500', 1, 'timeout', None)
    >>> script.add("/sms", ["503"])
    Traceback (most recent call last):
    ...
    ValueError: a fault is '500' or 'timeout', not '503'
    """

    def __init__(self, valid: Callable[[str], bool], described: str) -> None:
        self._valid = valid
        self._described = described
        self._queues: dict[K, deque[str]] = {}
        self._lock = threading.Lock()

    def add(self, key: K, faults: Iterable[str]) -> None:
        """After those already scripted for ``key``, these; all refused if one is unknown."""
        faults = list(faults)
        for fault in faults:
            if not self._valid(fault):
                raise ValueError(f"a fault is {self._described}, not {fault!r}")
        with self._lock:
            self._queues.setdefault(key, deque()).extend(faults)

    def replace(self, key: K, faults: Iterable[str]) -> None:
        """These, instead of what was still scripted for ``key``."""
        self.clear(key)
        self.add(key, faults)

    def clear(self, key: K) -> None:
        with self._lock:
            self._queues.pop(key, None)

    def next(self, *keys: K) -> str | None:
        """The fault of this call, taken from the first of ``keys`` that has one left (a
        narrow key before a broad one); ``None``: no fault, answer well."""
        with self._lock:
            for key in keys:
                queue = self._queues.get(key)
                if queue:
                    return queue.popleft()
        return None

    def pending(self, key: K) -> int:
        """How many faults are still to come for ``key``."""
        with self._lock:
            return len(self._queues.get(key, ()))

    def total(self) -> int:
        """How many faults are still to come, for every key."""
        with self._lock:
            return sum(len(q) for q in self._queues.values())


def http_status_or_timeout(fault: str) -> bool:
    """A fault that is an error status (400 to 599) or ``timeout`` (no answer in time).

    >>> [http_status_or_timeout(f) for f in ("503", "timeout", "200", "slow")]
    [True, True, False, False]
    """
    return fault == "timeout" or (fault.isdigit() and 400 <= int(fault) <= 599)
