"""Limits, enforced through the broker so that it holds across every worker and producer:
rate limits (per task or per queue) and a queue's depth limit.

A rate limit such as ``"50/s"`` allows one start per 1/50 s across all workers: a worker that
claims a rate-limited job reserves the next start in the broker (GCRA, no burst) and waits for
it with the job's lease held, so the job is neither failed nor spends an attempt. Starts are
spaced 2% wider than the rate, so that the jitter between a reserved start and the function
really starting does not put more than the limit into any one window.

A queue's ``max_depth`` bounds how many of its jobs may be scheduled or queued: ``send`` raises
``QueueFullError`` past it (``when_full="raise"``), or waits for room up to ``full_timeout_s``
(``"wait"``). The check reads the depth before the insert, so producers racing each other may
overshoot it by the jobs they send at the same moment. Periodic ticks and workflow steps are
checked too, as ``taskmill.client`` describes.

    >>> from taskmill import App
    >>> app = App("memory://")
    >>> app.configure_queue("emails", rate_limit="500/m", max_depth=10_000)
    >>> @app.task(queue="emails", rate_limit="10/s")
    ... def send_email(to: str) -> None: ...
    >>> app.queue_options["emails"].rate_interval_s
    0.12
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from taskmill.brokers.features import limit_store
from taskmill.errors import ConfigurationError, QueueFullError
from taskmill.job import NewJob

if TYPE_CHECKING:
    from taskmill.brokers.base import Broker

WhenFull = Literal["raise", "wait"]

_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*$")
SPACING = 1.02
"""Reserved starts are this much wider apart than the rate (see the module's docstring)."""


def parse_rate(rate: str) -> float:
    """``"10/s"``, ``"500/m"`` or ``"100/h"`` as the seconds between two starts."""
    match = _RATE.match(rate) if isinstance(rate, str) else None
    if match is None or float(match[1]) <= 0:
        raise ConfigurationError(
            f"rate_limit must look like '10/s', '500/m' or '100/h' (a positive number of starts "
            f"per second, minute or hour), not {rate!r}"
        )
    return _PERIODS[match[2]] / float(match[1])


@dataclass(frozen=True, slots=True)
class QueueOptions:
    rate_interval_s: float | None = None
    max_depth: int | None = None
    when_full: WhenFull = "raise"
    full_timeout_s: float = 30.0


def queue_options(
    *,
    rate_limit: str | None,
    max_depth: int | None,
    when_full: WhenFull,
    full_timeout_s: float,
) -> QueueOptions:
    if max_depth is not None and (isinstance(max_depth, bool) or max_depth < 1):
        raise ConfigurationError(f"max_depth must be a whole number >= 1, not {max_depth!r}")
    if when_full not in ("raise", "wait"):
        raise ConfigurationError(f"when_full must be 'raise' or 'wait', not {when_full!r}")
    interval = parse_rate(rate_limit) if rate_limit is not None else None
    return QueueOptions(interval, max_depth, when_full, full_timeout_s)


# --- producers: the depth limit -----------------------------------------------------------------


def limited_queues(options: Mapping[str, QueueOptions], jobs: Sequence[NewJob]) -> dict[str, int]:
    """How many of ``jobs`` go to each queue that has a ``max_depth`` (usually none)."""
    if not options:
        return {}
    sending = Counter(j.queue for j in jobs)
    return {q: n for q, n in sending.items() if q in options and options[q].max_depth is not None}


async def check_depth(
    broker: Broker,
    options: Mapping[str, QueueOptions],
    jobs: Sequence[NewJob],
    *,
    wait: bool = True,
) -> None:
    """Raise ``QueueFullError`` if a limited queue cannot take ``jobs``, or, for a queue with
    ``when_full="wait"`` (and ``wait``), wait for room first."""
    for queue, n in limited_queues(options, jobs).items():
        await _room_for(broker, queue, options[queue], n, wait=wait)


async def _room_for(broker: Broker, queue: str, options: QueueOptions, n: int, wait: bool) -> None:
    assert options.max_depth is not None
    waits = wait and options.when_full == "wait"
    deadline = time.monotonic() + options.full_timeout_s
    delay = 0.01
    while True:
        depth = await limit_store(broker).queue_depth(queue)
        if depth + n <= options.max_depth:
            return
        if not waits or time.monotonic() >= deadline:
            waited = f" after {options.full_timeout_s} s" if waits else ""
            raise QueueFullError(
                f"queue {queue!r} holds {depth:,} waiting jobs and its max_depth is "
                f"{options.max_depth:,}: {n:,} more refused{waited}, nothing was stored"
            )
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.5)


# --- workers: rate limits -----------------------------------------------------------------------


async def wait_for_rate_slots(broker: Broker, buckets: Sequence[tuple[str, float]]) -> None:
    """Reserve a start in each bucket and sleep until the latest of them."""
    store = limit_store(broker)
    waits = [await store.reserve_rate_slot(bucket, interval) for bucket, interval in buckets]
    delay = max(waits, default=0.0)
    if delay > 0:
        await asyncio.sleep(delay)


# --- workers: concurrency limits ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limit:
    """At most ``max`` jobs of a task running at once across all workers, per value of
    ``key``, a function of the task's arguments by name (None: one limit for the whole task).

    >>> from taskmill import App, Limit
    >>> app = App("memory://")
    >>> @app.task(concurrency=Limit(key=lambda user_id, **_: user_id, max=1))
    ... def rebuild_feed(user_id: int, full: bool = False) -> None: ...
    """

    max: int
    key: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max, bool) or not isinstance(self.max, int) or self.max < 1:
            raise ConfigurationError(f"Limit(max=...) must be a whole number >= 1: {self.max!r}")

    def bucket(self, task: str, arguments: Mapping[str, Any]) -> str:
        """The bucket of a call, given its arguments by name (bound to the task's signature,
        defaults applied): ``key`` is called with them as keywords, however the job was sent."""
        if self.key is None:
            return f"task:{task}"
        return f"task:{task}:{self.key(**arguments)}"


async def hold_slot(broker: Broker, bucket: str, holder: str, limit: int, ttl_s: float) -> None:
    """Wait until ``holder`` holds a slot of ``bucket`` (polling, 20 ms doubling to 1 s)."""
    store = limit_store(broker)
    delay = 0.02
    while not await store.acquire_slot(bucket, holder, limit, ttl_s):
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)
