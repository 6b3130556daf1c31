"""Keeping a worker's leases: the heartbeat loop, and what the broker's replies say.

Every heartbeat interval the worker sends one heartbeat carrying the claims of every job it
holds (running, or with an outcome not written yet): the broker extends their leases and
answers with the jobs it must stop, those whose lease went to another worker (``lost``) and
those someone asked to cancel. The ``LeaseKeeper`` sends it, interrupts those runs, renews
the runs' concurrency slots, and keeps the time of the last heartbeat the broker took
(``last_ok``: what the worker's health reports).

**Silence counts as a lost lease.** A worker cut off from its broker gets no reply to name
its jobs lost, yet the broker hands them to another worker once their leases expire. So the
keeper also keeps its own deadline: a heartbeat the broker took at send time ``t`` (the
worker's monotonic clock) extended every lease it carried to at least ``t + lease_s`` by the
broker's clock, which started it no earlier. Once that deadline passes with no newer heartbeat
taken, the worker is *out of contact*: it marks every job it holds lease-lost, as a reply
naming them lost would (the run is stopped as far as its pool allows, its outcome dropped),
logs one ERROR for the episode, and claims nothing (``in_contact`` is clear) until a heartbeat
is taken again. Jobs that start meanwhile (a claim or a hand-over already on its way) are
marked lost at the next check, every heartbeat interval. With the heartbeat at a third of the
lease, the mark comes at most one lease after the connection was cut, since the last heartbeat
taken was sent no later than the cut. Outcomes waiting to be written are kept: the broker's
fencing decides whether they still count.

>>> keeper = LeaseKeeper.__new__(LeaseKeeper)
>>> keeper.lease_s, keeper.vouched_at = 3.0, 100.0
>>> keeper.deadline()
103.0
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
        self.vouched_at = time.monotonic()
        """Monotonic send time of the last heartbeat the broker took (at first: now, before
        any claim); after an episode out of contact, the time it ended."""
        self.lost_contact_at: float | None = None
        """Monotonic start of the episode out of contact under way (None: in contact)."""
        self.in_contact = asyncio.Event()
        """Set while the worker may claim: clear out of contact."""
        self.in_contact.set()

    @property
    def out_of_contact(self) -> bool:
        """No heartbeat taken for longer than the lease: the jobs held were marked lost."""
        return self.lost_contact_at is not None

    def deadline(self) -> float:
        """Monotonic time after which the leases held can no longer be vouched for."""
        return self.vouched_at + self.lease_s

    async def run(self) -> None:
        """A heartbeat every ``interval_s``, and the watch on the leases' deadline, until
        cancelled. The watch runs beside the heartbeats: a heartbeat to an unreachable broker
        can hang far longer than the lease."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._watch(), name="taskmill-lease-watch")
            while True:
                await asyncio.sleep(self.interval_s)
                await self.beat()

    async def _watch(self) -> None:
        while True:
            left = self.deadline() - time.monotonic()
            if left > 0:
                await asyncio.sleep(left)  # then look again: a heartbeat may have moved it
                continue
            self.check()
            await asyncio.sleep(self.interval_s)

    def check(self, now: float | None = None) -> None:
        """Past the deadline: out of contact (logged once per episode), and every job held
        that is not marked lost yet is marked now."""
        now = time.monotonic() if now is None else now
        if now < self.deadline():
            return
        silent_s = now - self.vouched_at
        if self.lost_contact_at is None:
            self.lost_contact_at = now
            self.in_contact.clear()
            log.error(
                "worker %s: no heartbeat taken for %.1f s (lease %g s): other workers may have "
                "its jobs now; dropping its %d running jobs and claiming none until a heartbeat "
                "is taken",
                self.worker_id,
                silent_s,
                self.lease_s,
                sum(1 for r in self.runs.values() if not r.lost),
            )
        for run in list(self.runs.values()):
            if not run.lost:
                self._lose(run, f"no heartbeat taken for {silent_s:.1f} s")

    async def beat(self) -> None:
        """One heartbeat, and what its reply says; a failed one is logged."""
        running = [r.claim for r in self.runs.values()]
        # the reply names lost jobs by id: by the time it comes, a job lost under the token
        # sent may run here again under a new one (its retry, claimed meanwhile), not lost
        sent_tokens = {c.job_id: c.token for c in running}
        claims = running + self.owed()
        sent = time.monotonic()
        if not claims and not self.register:
            self._taken(sent)  # nothing held, nothing to vouch for
            return  # an unregistered (in-process test) worker has nothing to report
        try:
            reply = await self.broker.heartbeat(self.info(), claims, self.lease_s)
        except Exception as exc:
            log.error("worker %s: heartbeat failed: %s", self.worker_id, exc)
            return
        self._taken(sent)
        if self.on_heartbeat is not None:
            try:
                self.on_heartbeat()
            except Exception:  # an observer's bug must not stop the heartbeats
                log.exception("worker %s: on_heartbeat failed", self.worker_id)
        await self.pipeline.renew_slots(list(self.runs.values()))
        self._interrupt_as_told(reply, sent_tokens)

    def _taken(self, sent: float) -> None:
        """The broker took the heartbeat sent at ``sent``."""
        now = self.last_ok = time.monotonic()
        if self.lost_contact_at is None:
            self.vouched_at = max(self.vouched_at, sent)
            return
        # every job held through the episode is marked lost: the leases from here on are
        # those of claims made from now on
        log.warning(
            "worker %s: a heartbeat was taken again after %.1f s out of contact; claiming again",
            self.worker_id,
            now - self.lost_contact_at,
        )
        self.vouched_at = now
        self.lost_contact_at = None
        self.in_contact.set()

    def _interrupt_as_told(self, reply: HeartbeatReply, sent_tokens: dict[str, str]) -> None:
        for job_id in reply.lost:
            run = self.runs.get(job_id)
            if run is not None and not run.lost and run.claim.token == sent_tokens.get(job_id):
                self._lose(run, None)
        for job_id in reply.cancel_requested:
            run = self.runs.get(job_id)
            if run is not None and not run.interrupted:
                log.info("job %s (%s): cancel requested", job_id, run.job.task)
                run.interrupt(Interrupt.CANCEL)

    @staticmethod
    def _lose(run: JobRun, why: str | None) -> None:
        """The run's lease is lost: stop it as far as its pool allows, drop its outcome."""
        because = "" if why is None else f" ({why})"
        log.warning(
            "job %s (%s): lease lost%s; stopping it here", run.job.id, run.job.task, because
        )
        run.lost = True
        run.interrupt(Interrupt.LOST)
