"""Races inside one worker, made to happen by a broker that answers at the wrong moment."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from taskmill import App, Backoff, Limit, chain, current_job
from taskmill.brokers.base import EnqueueResult, HeartbeatReply, OnConflict
from taskmill.brokers.memory import MemoryBroker
from taskmill.job import Claim, Finish, Job, JobState, NewJob, Progress, WorkerInfo
from taskmill.task import Task
from taskmill.testing import await_until, running_worker, wait_until
from taskmill.workflows import step_job_id


class LateHeartbeat(MemoryBroker):
    """Holds the first heartbeat that carries a claim until the same job was claimed again,
    then answers it: the reply names the job as lost (its first claim's token is stale)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = threading.Event()
        self.reclaimed = threading.Event()
        self.replied = threading.Event()

    async def heartbeat(
        self, worker: WorkerInfo, claims: Sequence[Claim], lease_s: float
    ) -> HeartbeatReply:
        if claims and not self.sent.is_set():
            self.sent.set()
            while not self.reclaimed.is_set():
                await asyncio.sleep(0.005)
            reply = await super().heartbeat(worker, claims, lease_s)
            self.replied.set()
            return reply
        return await super().heartbeat(worker, claims, lease_s)

    async def finish_and_claim(
        self,
        finishes: Sequence[Finish],
        queues: Sequence[str],
        limit: int,
        worker_id: str,
        lease_s: float,
    ) -> tuple[list[bool], list[Job]]:
        applied, jobs = await super().finish_and_claim(finishes, queues, limit, worker_id, lease_s)
        if any(job.attempt == 2 for job in jobs):
            self.reclaimed.set()
        return applied, jobs


def test_a_late_heartbeat_reply_does_not_stop_the_next_attempt() -> None:
    """The reply names lost jobs by id: one about attempt 1's claim must not stop attempt 2,
    which this worker holds under a new token (seen on Redis: an attempt spent, the job
    stuck until its lease expired)."""
    broker = LateHeartbeat()
    app = App("memory://", lease_s=60, heartbeat_s=0.05)
    app.client.use_broker(broker)

    @app.task(retries=1, backoff=Backoff(base=0, cap=0, jitter=False))
    def flaky() -> int:
        job = current_job()
        if job.attempt == 1:
            assert broker.sent.wait(10)
            raise ValueError("the first attempt fails")
        assert broker.replied.wait(10)
        job._cancelled.wait(0.5)  # the worker acts on the reply meanwhile, if it is to
        return job.attempt

    try:
        with running_worker(app):
            handle = flaky.send()
            assert handle.result(timeout=10) == 2
    finally:
        app.close()


class SlowProgress(MemoryBroker):
    """Progress writes take a while (a slow network): the job ends while its last report is
    still on its way."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = threading.Event()

    async def record_progress(self, items: Sequence[Progress]) -> None:
        self.writing.set()
        await asyncio.sleep(0.3)
        await super().record_progress(items)


def test_an_outcome_waits_for_the_progress_write_in_flight() -> None:
    """The flush took the job's last report while it ran; the job ended before that write
    landed: its outcome must not overtake it (the report would be refused as stale, and its
    event would follow the outcome's)."""
    broker = SlowProgress()
    app = App("memory://")
    app.client.use_broker(broker)

    @app.task()
    def reporter() -> str:
        current_job().progress(1.0, "done")
        assert broker.writing.wait(10)  # the report is being written
        return "ok"

    try:
        # one slot: the claim loop waits for it and carries the outcome the moment it ends
        with running_worker(app, concurrency=1):
            handle = reporter.send()
            assert handle.result(timeout=10) == "ok"
        job = app.get_job(handle.id)
        assert (job.progress, job.progress_message) == (1.0, "done")
    finally:
        app.close()


class SlowRelease(MemoryBroker):
    """Releasing a concurrency slot waits until the test lets it go on (a slow network), and
    the heartbeats say when the worker was told of a cancel request."""

    def __init__(self) -> None:
        super().__init__()
        self.releasing = threading.Event()
        self.go_on = threading.Event()
        self.heartbeats = 0
        self.told_to_cancel_at: int | None = None  # the heartbeat whose reply asked it

    async def release_slot(self, bucket: str, holder: str) -> None:
        self.releasing.set()
        while not self.go_on.is_set():
            await asyncio.sleep(0.005)
        await super().release_slot(bucket, holder)

    async def heartbeat(
        self, worker: WorkerInfo, claims: Sequence[Claim], lease_s: float
    ) -> HeartbeatReply:
        reply = await super().heartbeat(worker, claims, lease_s)
        self.heartbeats += 1
        if reply.cancel_requested and self.told_to_cancel_at is None:
            self.told_to_cancel_at = self.heartbeats
        return reply


def limited_app(broker: SlowRelease) -> tuple[App, Task[[], str]]:
    app = App("memory://", lease_s=60, heartbeat_s=0.05)
    app.client.use_broker(broker)

    @app.task(concurrency=Limit(max=1))
    async def limited() -> str:
        return "done"

    return app, limited


def test_a_cancel_request_while_a_job_releases_its_slot_comes_too_late() -> None:
    """The outcome was decided; the request came while the job released its concurrency
    slot. The run was cancelled there: its outcome was never written, and its lease was kept
    alive by heartbeats for ever (the job stuck running, a slot of the worker lost)."""
    broker = SlowRelease()
    app, limited = limited_app(broker)
    try:
        with running_worker(app):
            handle = limited.send()
            assert broker.releasing.wait(10)
            assert handle.cancel() is JobState.RUNNING  # the request is stored
            told = wait_until(lambda: broker.told_to_cancel_at, what="a reply with the cancel")
            # heartbeats are sent one after the other: the next one means the worker acted
            wait_until(lambda: broker.heartbeats > told, what="the heartbeat after it")
            broker.go_on.set()
            assert handle.result(timeout=10) == "done"
    finally:
        broker.go_on.set()
        app.close()


def test_a_job_releasing_its_slot_at_a_shutdown_keeps_its_outcome() -> None:
    """The drain timed out while a finished job released its slot: the stop cut that short,
    and the outcome it had was never written (the job stayed running until its lease
    expired, then counted as a lost lease)."""
    broker = SlowRelease()
    app, limited = limited_app(broker)
    try:
        with running_worker(app, drain_timeout_s=0.1):
            handle = limited.send()
            assert broker.releasing.wait(10)
        job = app.get_job(handle.id)
        assert (job.state, job.lost_leases) == (JobState.SUCCEEDED, 0)
    finally:
        broker.go_on.set()
        app.close()


class FlushDuringEmptyClaim(MemoryBroker):
    """Stages the race of ``run_until_idle`` against the flush that advances a workflow:
    the flush loop writes the outcome of the step ``target`` while the claim loop claims with
    nothing to carry. That claim runs first and finds nothing (the flush has not released
    the next step yet), and its reply comes back only once the flush has released the next
    step (seen on Redis under load: the worker left, the released step stayed queued)."""

    def __init__(self) -> None:
        super().__init__()
        self.target = ""
        self.flushing = threading.Event()  # the flush of target's outcome is on its way
        self.claimed = threading.Event()  # an empty claim ran meanwhile, and found nothing
        self.released = threading.Event()  # the flush's advance enqueued the next step

    async def finish(self, finishes: Sequence[Finish]) -> list[bool]:
        applied = await super().finish(finishes)
        if any(f.claim.job_id == self.target for f in finishes) and not self.flushing.is_set():
            self.flushing.set()
            await _until(self.claimed)
        return applied

    async def enqueue(
        self, jobs: Sequence[NewJob], *, on_conflict: OnConflict = "return"
    ) -> EnqueueResult:
        result = await super().enqueue(jobs, on_conflict=on_conflict)
        if self.claimed.is_set():
            self.released.set()
        return result

    async def finish_and_claim(
        self,
        finishes: Sequence[Finish],
        queues: Sequence[str],
        limit: int,
        worker_id: str,
        lease_s: float,
    ) -> tuple[list[bool], list[Job]]:
        stage = not finishes and self.flushing.is_set() and not self.claimed.is_set()
        applied, jobs = await super().finish_and_claim(finishes, queues, limit, worker_id, lease_s)
        if stage and not jobs:
            self.claimed.set()
            await _until(self.released)
        return applied, jobs


async def _until(event: threading.Event) -> None:
    await await_until(event.is_set, timeout=10, interval=0.005, what="the staged race's next step")


def test_run_until_idle_waits_for_the_steps_a_flush_releases() -> None:
    """A claim that found nothing while a flush was writing a workflow step's outcome proves
    nothing: the flush may release the next step after that claim looked. ``run_until_idle``
    ended there, with the workflow running and its next step queued for ever."""
    broker = FlushDuringEmptyClaim()
    app = App("memory://")
    app.client.use_broker(broker)
    down = {"pricing": True}

    @app.task()
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(retries=0)
    def price(total: int) -> int:
        if down["pricing"]:
            raise ConnectionError("pricing service unreachable")
        return total * 2

    try:
        handle = chain(add.s(1, 2), price.s(), add.s(100)).send()
        app.run_until_idle()
        assert handle.status() == "failed"
        down["pricing"] = False
        broker.target = step_job_id(handle.id, "1")
        app.retry_jobs([broker.target])
        app.run_until_idle()
        assert broker.released.is_set(), "the race was not staged"
        assert handle.status() == "succeeded"
        assert handle.result(timeout=1) == 106
    finally:
        app.close()
