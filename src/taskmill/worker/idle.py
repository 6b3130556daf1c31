"""The claim loop's wait for work, when its last claim found nothing due.

It waits on ``Broker.wait`` (a wake-up on enqueue, the next scheduled job coming due, or
``poll_s``), and with ``also`` on an event of the worker's too (``run_until_idle``: a job
ended). A stop cancels the wait (``cancel``). A broker may hand a job over to a plain wait as
it is enqueued (``HandOver``): that job is claimed for this worker already, and is started
at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from taskmill.brokers.base import HandOver

if TYPE_CHECKING:
    from taskmill.brokers.base import Broker
    from taskmill.job import Job
    from taskmill.worker.flushing import Flusher
    from taskmill.worker.stopping import Stop

log = logging.getLogger("taskmill.worker")

FAILED_WAIT_RETRY_S = 0.5

__all__ = ["IdleWait", "first_of"]


class IdleWait:
    """Waits for work for one worker's claim loop; ``start`` starts a job handed over.

    ``flusher`` is woken as the wait begins: no claim will carry the outcomes waiting.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        queues: Sequence[str],
        poll_s: float,
        handover: HandOver,
        stop: Stop,
        flusher: Flusher,
        start: Callable[[Job], None],
    ) -> None:
        self._broker = broker
        self._queues = list(queues)
        self._poll_s = poll_s
        self._handover = handover
        self._stop = stop
        self._flusher = flusher
        self._start = start
        self._task: asyncio.Task[list[Job]] | None = None

    @property
    def waiting(self) -> bool:
        """The claim loop waits for work (an outcome now is left to the flusher)."""
        return self._task is not None

    def cancel(self) -> None:
        """Cut the wait short (a stop)."""
        if self._task is not None:
            self._task.cancel()

    async def wait(self, also: asyncio.Event | None = None) -> None:
        """Until work may be due, ``also`` is set, or the stop comes."""
        if self._stop.is_set():
            return  # stop() came during the claim: there was no wait for it to cancel
        # a job handed over while waiting is ours already; only a plain wait (no event that
        # could cancel it mid-reply) takes hand-overs, so a cancelled wait loses none
        handover = self._handover if also is None else None
        idle = self._task = asyncio.create_task(
            self._broker.wait(self._queues, self._poll_s, handover)
        )
        self._flusher.wake_if_pending()
        waiters: list[asyncio.Future[Any]] = [idle]
        if also is not None:
            waiters.append(asyncio.create_task(also.wait()))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in waiters:
                t.cancel()
            self._task = None
        if idle.done() and not idle.cancelled():
            await self._woken(idle)

    async def _woken(self, idle: asyncio.Task[list[Job]]) -> None:
        exc = idle.exception()
        if exc is not None:
            log.error("waiting for work failed: %s", exc)
            await self._stop.sleep(FAILED_WAIT_RETRY_S)
            return
        handed = idle.result()
        for job in handed:
            self._start(job)
        if handed:
            await asyncio.sleep(0)


async def first_of(*events: asyncio.Event) -> None:
    """Wait until one of ``events`` is set."""
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in waiters:
            t.cancel()
