"""How a worker stops: the stop request, the drain of running jobs, and the end of its loops.

``Worker.stop()`` may be called from any thread, and twice: the first call drains (running
jobs get ``drain_timeout_s`` to finish), the second stops at once (running jobs are handed
back without spending an attempt). ``Stop`` keeps that request and wakes the worker's loop
with it; the worker's loops read it. ``install_signal_handlers`` makes SIGTERM and SIGINT
such requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from taskmill.retry import Interrupt

if TYPE_CHECKING:
    from taskmill.worker.execution import JobRun

log = logging.getLogger("taskmill.worker")

__all__ = ["LastWrites", "Stop", "cancel_and_wait", "drain", "install_signal_handlers"]


class Stop:
    """A worker's stop request.

    ``request`` sets plain flags, then hands ``wake`` to the worker's ``loop`` (once known)
    with ``call_soon_threadsafe``, so any thread may call it. ``event`` is an
    ``asyncio.Event``, which is not thread-safe: ``wake`` sets it (``set``) on the worker's
    loop, and the loops wait on it.
    """

    def __init__(self, wake: Callable[[], None] | None = None) -> None:
        self.requested = False  # stop claiming; running jobs may finish
        self.now = False  # do not wait for running jobs, nor retry a failed write
        self.event = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None  # the worker's: set by Worker.run
        self._wake = self.set if wake is None else wake  # on that loop: hears of the request

    def request(self) -> None:
        """The first request drains, the next one stops at once."""
        if self.requested:
            self.now = True
        self.requested = True
        loop = self.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._wake)

    def set(self) -> None:
        """On the worker's loop: wake what waits for the stop."""
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def at_once(self) -> None:
        """On the worker's loop: stop now (an error no retry can fix)."""
        self.requested = self.now = True
        self.event.set()

    async def wait(self) -> None:
        await self.event.wait()

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or until the stop comes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.event.wait()


def install_signal_handlers(stop: Stop, *, worker_id: str) -> None:
    """SIGTERM/SIGINT on the running loop: the first drains, the second stops at once."""
    loop = stop.loop = asyncio.get_running_loop()

    def on_signal(sig: int) -> None:
        name = signal.Signals(sig).name
        if stop.requested:
            log.warning("worker %s: %s again: stopping now", worker_id, name)
        else:  # a normal shutdown (a deploy, a scale-down): nothing to warn about
            log.info("worker %s: %s: draining (send again to stop at once)", worker_id, name)
        stop.request()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


async def drain(
    running: dict[str, JobRun],
    progressed: asyncio.Event,
    stop: Stop,
    *,
    timeout_s: float,
    worker_id: str,
) -> None:
    """Let the running jobs finish within ``timeout_s`` (``progressed`` is set as each one
    ends), then interrupt those left so that they hand their job back, and wait for them."""
    deadline = time.monotonic() + timeout_s
    if running:
        log.info(
            "worker %s: draining %d running jobs (up to %.0f s)",
            worker_id,
            len(running),
            timeout_s,
        )
    while running and not stop.now:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        progressed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(remaining):
                await progressed.wait()
    leftovers = list(running.values())
    for run in leftovers:
        log.warning(
            "job %s (%s): still running at shutdown; handing it back", run.job.id, run.job.task
        )
        run.interrupt(Interrupt.SHUTDOWN)
    handles = [run.handle for run in leftovers if run.handle is not None]
    if handles:
        await asyncio.gather(*handles, return_exceptions=True)


async def cancel_and_wait(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel the tasks and wait until they end, cancelling again those still running after
    a second: redis-py can swallow a cancel that lands while a command starts (the task goes
    on to its next await and would run forever; a worker hung on stop, seen in the suite)."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)


STOP_WRITES_S = 1.5
"""After the drain, how long the last writes (outcomes, hand-backs, the worker's
unregistering) may take together. A broker that cannot be reached then does not hold the
process for minutes of retries: it exits within the drain timeout + 2 s, and the jobs whose
outcome or hand-back it could not write come back by lease expiry (docs/guarantees.md)."""


class LastWrites:
    """The writes a stopping worker makes after its drain, under one shared deadline."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.by: float | None = None  # set when the drain ends

    def start(self) -> None:
        self.by = time.monotonic() + STOP_WRITES_S

    async def bounded(self, aw: Awaitable[object], what: str) -> None:
        """``aw``, given up (logged) once the last writes are out of time; unbounded before
        the drain has set that time (a worker that failed at start)."""
        if self.by is None:
            await aw
            return
        try:
            async with asyncio.timeout(max(0.0, self.by - time.monotonic())):
                await aw
        except TimeoutError:
            log.warning(
                "worker %s: %s: gave up after the drain (the broker did not answer within"
                " %.1f s); jobs it still held come back when their leases expire",
                self.worker_id,
                what,
                STOP_WRITES_S,
            )
