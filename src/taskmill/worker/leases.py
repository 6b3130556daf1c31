"""Keeping a worker's leases: the heartbeat loop, and what the broker's replies say.

Every heartbeat interval the worker sends one heartbeat carrying the claims of every job it
holds (running, or with an outcome not written yet): the broker extends their leases and
answers with the jobs it must stop, those whose lease went to another worker (``lost``) and
those someone asked to cancel. The ``LeaseKeeper`` sends it, interrupts those runs, renews
the runs' concurrency slots, and keeps the time of the last heartbeat the broker took
(``last_ok``: what the worker's health reports).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from taskmill.retry import Interrupt

if TYPE_CHECKING:
    from taskmill.brokers.base import Broker, HeartbeatReply
    from taskmill.job import Claim, WorkerInfo
    from taskmill.worker.execution import JobRun, Pipeline

log = logging.getLogger("taskmill.worker")

__all__ = ["LeaseKeeper"]


class LeaseKeeper:
    """The heartbeats of one worker. ``runs`` is the worker's own map of its running jobs
    (read at each heartbeat, never changed here); ``owed`` gives the claims of the outcomes
    not written yet; ``info`` describes the worker for the broker's list of workers.
    ``register``: heartbeat even with no job held (an unregistered in-process test worker
    does not). ``on_heartbeat`` is called after each heartbeat the broker took."""

    def __init__(
        self,
        broker: Broker,
        pipeline: Pipeline,
        *,
        worker_id: str,
        lease_s: float,
        interval_s: float,
        runs: dict[str, JobRun],
        owed: Callable[[], list[Claim]],
        info: Callable[[], WorkerInfo],
        register: bool = True,
        on_heartbeat: Callable[[], None] | None = None,
    ) -> None:
        self.broker = broker
        self.pipeline = pipeline
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.interval_s = interval_s
        self.runs = runs
        self.owed = owed
        self.info = info
        self.register = register
        self.on_heartbeat = on_heartbeat
        self.last_ok: float | None = None
        """``time.monotonic()`` when the last heartbeat the broker took came back."""

    async def run(self) -> None:
        """A heartbeat every ``interval_s``, until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            await self.beat()

    async def beat(self) -> None:
        """One heartbeat, and what its reply says; a failed one is logged."""
        running = [r.claim for r in self.runs.values()]
        # the reply names lost jobs by id: by the time it comes, a job lost under the token
        # sent may run here again under a new one (its retry, claimed meanwhile), not lost
        sent_tokens = {c.job_id: c.token for c in running}
        claims = running + self.owed()
        if not claims and not self.register:
            return  # an unregistered (in-process test) worker has nothing to report
        try:
            reply = await self.broker.heartbeat(self.info(), claims, self.lease_s)
        except Exception as exc:
            log.error("worker %s: heartbeat failed: %s", self.worker_id, exc)
            return
        self.last_ok = time.monotonic()
        if self.on_heartbeat is not None:
            try:
                self.on_heartbeat()
            except Exception:  # an observer's bug must not stop the heartbeats
                log.exception("worker %s: on_heartbeat failed", self.worker_id)
        await self.pipeline.renew_slots(list(self.runs.values()))
        self._interrupt_as_told(reply, sent_tokens)

    def _interrupt_as_told(self, reply: HeartbeatReply, sent_tokens: dict[str, str]) -> None:
        for job_id in reply.lost:
            run = self.runs.get(job_id)
            if run is not None and not run.lost and run.claim.token == sent_tokens.get(job_id):
                log.warning("job %s (%s): lease lost; stopping it here", job_id, run.job.task)
                run.lost = True
                run.interrupt(Interrupt.LOST)
        for job_id in reply.cancel_requested:
            run = self.runs.get(job_id)
            if run is not None and not run.interrupted:
                log.info("job %s (%s): cancel requested", job_id, run.job.task)
                run.interrupt(Interrupt.CANCEL)
