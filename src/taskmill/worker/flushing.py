"""Writing the outbox when no claim is coming to carry it, and advancing workflows after.

While a worker is busy, its claims carry the outcomes waiting (``outbox.py``). When it is idle
or stopping, or progress is due, the outbox wakes the ``Flusher``'s loop, which writes what
waits in one call. A write that fails is kept by the outbox and retried after 0.5 s. A step
of a workflow whose outcome was stored may release the next steps: ``advance_workflows``
advances its workflow at once, after a claim's or a flush's write (the maintenance sweep
would, later).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from taskmill._ids import workflow_of
from taskmill.workflows import advance

if TYPE_CHECKING:
    from taskmill.client import Client
    from taskmill.worker.outbox import Batch, Outbox
    from taskmill.worker.stopping import Stop

log = logging.getLogger("taskmill.worker")

RETRY_S = 0.5

__all__ = ["Flusher", "advance_workflows"]


class Flusher:
    """The flush loop of one worker.

    ``wake`` is the event the outbox (and the worker) set when something should be written;
    ``progressed`` is set after each write, for the claim loop waiting on it; ``stop`` cuts the
    retry wait short, and a stop at once gives up a failing write on the way out.
    """

    def __init__(
        self,
        outbox: Outbox,
        client: Client,
        *,
        wake: asyncio.Event,
        progressed: asyncio.Event,
        stop: Stop,
    ) -> None:
        self._outbox = outbox
        self._client = client
        self._wake = wake
        self._progressed = progressed
        self._stop = stop
        self._lock = asyncio.Lock()  # one flush at a time (see flush_all)

    def wake_if_pending(self) -> None:
        """Outcomes wait and no claim will carry them soon: write them."""
        if self._outbox.pending:
            self._wake.set()

    async def run(self) -> None:
        wake = self._wake
        while True:
            await wake.wait()
            wake.clear()
            async with self._lock:
                await self._flush_once()

    async def flush_all(self) -> None:
        """On the way out: write everything owed (a few tries; none after a stop at once)."""
        # the flush loop may be writing a batch that already left the outbox: wait for it to
        # land, or cancelling the loop on the way out drops that batch
        async with self._lock:
            for _ in range(20):
                if not self._outbox.owes:
                    return
                if not await self._flush_once() and self._stop.now:
                    return

    async def _flush_once(self) -> bool:
        """Write progress and outcomes; False if the broker refused (kept for later)."""
        try:
            batch = await self._outbox.flush()
        except Exception:  # logged by the outbox
            await self._stop.sleep(RETRY_S)
            self._wake.set()
            return False
        if batch is None:
            return True
        try:  # still on its way meanwhile: run_until_idle must not end before steps it releases
            await advance_workflows(self._client, batch)
        finally:
            self._outbox.release(batch)
        self._progressed.set()
        return True


async def advance_workflows(client: Client, batch: Batch) -> bool:
    """Advance the workflows of the steps whose outcome ``batch`` stored. True if there was
    one (steps it released may be due: claim again at once)."""
    workflows = {
        wf for finish in batch.stored if (wf := workflow_of(finish.claim.job_id)) is not None
    }
    for workflow_id in workflows:
        try:
            await advance(client, workflow_id)
        except Exception as exc:
            log.error("workflow %s: advancing failed (the sweep retries): %s", workflow_id, exc)
    return bool(workflows)
