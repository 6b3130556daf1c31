"""Flow control, enforced through the broker so that it holds across every worker and producer:
rate limits (per task or per queue) and a queue's depth limit.

A rate limit such as ``"50/s"`` allows one start per 1/50 s across all workers: a worker that
claims a rate-limited job reserves the next start in the broker (GCRA, no burst) and waits for
it with the job's lease held, so the job is neither failed nor spends an attempt. Starts are
spaced 2% wider than the rate, so that the jitter between a reserved start and the function
really starting does not put more than the limit into any one window.

A queue's ``max_depth`` bounds how many of its jobs may be scheduled or queued: ``send`` raises
``QueueFullError`` past it (``when_full="raise"``), or waits for room up to ``full_timeout_s``
(``"wait"``). The check reads the depth before the insert, so producers racing each other may
overshoot it by the jobs they send at the same moment.

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
from taskmill.job import Job, NewJob

if TYPE_CHECKING:
    from taskmill.app import App
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


async def check_depth(app: App, jobs: Sequence[NewJob]) -> None:
    """Raise ``QueueFullError`` (or wait for room) if a limited queue cannot take ``jobs``."""
    sending = Counter(j.queue for j in jobs)
    limited = {q: n for q, n in sending.items() if _max_depth(app, q) is not None}
    if not limited:
        return
    store = limit_store(await app.abroker())
    for queue, n in limited.items():
        options = app.queue_options[queue]
        assert options.max_depth is not None
        deadline = time.monotonic() + options.full_timeout_s
        delay = 0.01
        while True:
            depth = await store.queue_depth(queue)
            if depth + n <= options.max_depth:
                break
            if options.when_full == "raise" or time.monotonic() >= deadline:
                waited = (
                    "" if options.when_full == "raise" else f" after {options.full_timeout_s} s"
                )
                raise QueueFullError(
                    f"queue {queue!r} holds {depth:,} waiting jobs and its max_depth is "
                    f"{options.max_depth:,}: {n:,} more refused{waited}, nothing was stored"
                )
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)


def needs_depth_check(app: App, jobs: Sequence[NewJob]) -> bool:
    return bool(app.queue_options) and any(_max_depth(app, j.queue) is not None for j in jobs)


def _max_depth(app: App, queue: str) -> int | None:
    options = app.queue_options.get(queue)
    return options.max_depth if options is not None else None


# --- workers: rate limits -----------------------------------------------------------------------


def rate_buckets(app: App, job: Job) -> list[tuple[str, float]]:
    """The rate limits a job is under: its task's and its queue's, as (bucket, interval)."""
    buckets = []
    task = app.tasks.get(job.task)
    if task is not None and task.rate_interval_s is not None:
        buckets.append((f"task:{task.name}", task.rate_interval_s * SPACING))
    options = app.queue_options.get(job.queue)
    if options is not None and options.rate_interval_s is not None:
        buckets.append((f"queue:{job.queue}", options.rate_interval_s * SPACING))
    return buckets


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
