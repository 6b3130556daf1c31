"""The outbox: what a worker owes the broker, and the order it writes it in.

A real memory broker stores what the outbox writes (a report written after its job's outcome
would be refused, as on every broker); a subclass records the calls, and holds or fails the
ones a case needs. Time is a fake clock the test moves: the coalescing interval passes when
the test says so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import pytest

from taskmill.brokers.memory import MemoryBroker
from taskmill.context import JobContext
from taskmill.errors import BrokerUnavailableError
from taskmill.events import Event
from taskmill.job import Claim, Finish, Job, JobState, NewJob, Progress, Succeeded
from taskmill.worker.execution import JobRun
from taskmill.worker.outbox import PROGRESS_INTERVAL_S, Outbox


class Recording(MemoryBroker):
    """Records its writes in order; a write of progress may be held, an outcome write may
    fail."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[str]]] = []
        self.hold_progress: asyncio.Event | None = None
        self.progress_started = asyncio.Event()
        self.fail_finish = 0
        self.fail_claim = 0

    async def record_progress(self, items: Sequence[Progress]) -> None:
        self.progress_started.set()
        if self.hold_progress is not None:
            await self.hold_progress.wait()
        self.calls.append(("progress", [f"{p.claim.job_id}={p.fraction}" for p in items]))
        await super().record_progress(items)

    async def finish_and_claim(
        self,
        finishes: Sequence[Finish],
        queues: Sequence[str],
        limit: int,
        worker_id: str,
        lease_s: float,
    ) -> tuple[list[bool], list[Job]]:
        if self.fail_claim:
            self.fail_claim -= 1
            raise BrokerUnavailableError("the broker is down (nothing was written)")
        self.calls.append(("finish_and_claim", [f.claim.job_id for f in finishes]))
        applied = await MemoryBroker.finish(self, finishes)
        return applied, await self.claim(queues, limit, worker_id, lease_s)

    async def finish(self, finishes: Sequence[Finish]) -> list[bool]:
        if self.fail_finish:
            self.fail_finish -= 1
            raise BrokerUnavailableError("the broker is down (nothing was written)")
        self.calls.append(("finish", [f.claim.job_id for f in finishes]))
        return await super().finish(finishes)


class Clock:
    """A fake clock: ``later`` files a call for a time, ``advance`` makes time pass."""

    def __init__(self) -> None:
        self.now = 0.0
        self.due: list[tuple[float, Callable[[], None]]] = []

    def later(self, delay: float, fn: Callable[[], None]) -> None:
        self.due.append((self.now + delay, fn))

    def advance(self, seconds: float) -> None:
        self.now += seconds
        ripe = [fn for at, fn in self.due if at <= self.now]
        self.due = [(at, fn) for at, fn in self.due if at > self.now]
        for fn in ripe:
            fn()


class Setup:
    def __init__(self, *, events: bool = False) -> None:
        self.broker = Recording()
        self.clock = Clock()
        self.wakes = 0
        self.events: list[Event] = []
        self.outbox = Outbox(
            self.broker,
            worker_id="w1",
            wake=self.wake,
            later=self.clock.later,
            emit=self.events.append if events else None,
            clock=lambda: self.clock.now,
        )

    def wake(self) -> None:
        self.wakes += 1

    async def runs(self, n: int) -> list[JobRun]:
        """``n`` jobs, claimed, as the pipeline's records."""
        payload = b"[[],{}]"
        jobs = [NewJob(id=f"job-{i}", task="t", queue="q", payload=payload) for i in range(n)]
        await self.broker.enqueue(jobs)
        claimed = await self.broker.claim(["q"], n, "w1", 60.0)
        return sorted((run_of(job) for job in claimed), key=lambda r: r.job.id)

    async def stored(self, run: JobRun) -> Job:
        job = await self.broker.get(run.job.id)
        assert job is not None
        return job


def run_of(job: Job) -> JobRun:
    assert job.lease_token is not None
    ctx = JobContext(job.id, job.task, job.queue, job.attempt, job.max_attempts, _report=noop)
    return JobRun(job, Claim(job.id, job.lease_token), ctx, task=None, plain=True)


def noop(job_id: str, fraction: float | None, message: str | None) -> None:
    pass


def done(value: bytes = b"1") -> Succeeded:
    return Succeeded(value)


# --- outcomes ---------------------------------------------------------------------------------


async def test_outcomes_keep_their_leases_covered_until_the_broker_has_them() -> None:
    s = Setup()
    a, b = await s.runs(2)
    s.outbox.add(a, done())
    s.outbox.add(b, done())
    assert s.outbox.claims() == [a.claim, b.claim]
    assert s.outbox.pending and not s.outbox.settled

    batch = s.outbox.take()  # riding along with a claim
    assert [f.claim for f in batch.finishes] == [a.claim, b.claim]
    assert s.outbox.claims() == [a.claim, b.claim]  # on its way: still covered
    assert not s.outbox.pending and not s.outbox.settled

    applied = await s.broker.finish(batch.finishes)
    s.outbox.landed(batch, applied)
    s.outbox.release(batch)
    assert s.outbox.claims() == [] and s.outbox.settled
    assert batch.stored == batch.finishes
    assert (await s.stored(a)).state is JobState.SUCCEEDED


async def test_a_batch_that_was_not_written_goes_first_in_the_next_one() -> None:
    s = Setup()
    a, b = await s.runs(2)
    s.outbox.report(a, 0.5, "half")
    s.outbox.add(a, done())
    first = s.outbox.take()
    s.outbox.add(b, done())  # ended while the first batch was on its way
    s.outbox.put_back(first)  # the claim carrying it failed
    assert s.outbox.claims() == [a.claim, b.claim]

    second = s.outbox.take()
    assert [f.claim for f in second.finishes] == [a.claim, b.claim]
    assert [p.claim for p, _ in second.final] == [a.claim]  # a's last report went with it


async def test_outcomes_ride_along_with_a_claim_and_go_back_if_it_fails() -> None:
    s = Setup()
    a, b = await s.runs(2)
    await s.broker.enqueue([NewJob(id="next", task="t", queue="q", payload=b"[[],{}]")])
    s.outbox.report(a, 0.5, "half")
    s.outbox.add(a, done())
    s.broker.fail_claim = 1
    with pytest.raises(BrokerUnavailableError):
        await s.outbox.finish_and_claim(["q"], 1, 60.0)
    assert s.outbox.pending and s.outbox.claims() == [a.claim]  # put back, lease still covered

    s.outbox.add(b, done())
    batch, jobs = await s.outbox.finish_and_claim(["q"], 1, 60.0)
    assert [j.id for j in jobs] == ["next"]
    assert batch.stored == batch.finishes and [f.claim for f in batch.stored] == [a.claim, b.claim]
    assert s.outbox.settled and s.outbox.claims() == []
    # the last report goes first each time: a claim that failed may have written it or not
    assert s.broker.calls == [
        ("progress", ["job-0=0.5"]),
        ("progress", ["job-0=0.5"]),
        ("finish_and_claim", ["job-0", "job-1"]),
    ]


async def test_a_failed_flush_keeps_the_outcomes_and_their_last_reports() -> None:
    s = Setup()
    (a,) = await s.runs(1)
    s.outbox.report(a, 0.75, None)
    s.outbox.add(a, done())
    s.broker.fail_finish = 1
    with pytest.raises(BrokerUnavailableError):
        await s.outbox.flush()
    assert s.outbox.claims() == [a.claim] and s.outbox.pending

    batch = await s.outbox.flush()
    assert batch is not None and batch.stored == batch.finishes
    s.outbox.release(batch)
    job = await s.stored(a)
    assert (job.state, job.progress) == (JobState.SUCCEEDED, 0.75)
    assert s.outbox.settled


async def test_a_flush_with_no_outcome_writes_only_progress() -> None:
    s = Setup()
    (a,) = await s.runs(1)
    s.outbox.report(a, 0.25, "a quarter")
    assert s.outbox.owes and not s.outbox.pending
    assert await s.outbox.flush() is None
    assert s.broker.calls == [("progress", ["job-0=0.25"])]
    assert not s.outbox.owes


# --- progress ---------------------------------------------------------------------------------


async def test_progress_is_coalesced_to_one_write_per_interval() -> None:
    s = Setup()
    a, b = await s.runs(2)
    for i in range(100):
        s.outbox.report(a, i / 100, f"step {i}")
    s.outbox.report(b, 0.5, None)
    assert len(s.clock.due) == 1  # one wake-up asked for, however many reports
    s.clock.advance(PROGRESS_INTERVAL_S / 2)
    assert s.wakes == 0
    s.clock.advance(PROGRESS_INTERVAL_S / 2)
    assert s.wakes == 1

    await s.outbox.write_progress()  # what the woken flush loop does
    assert s.broker.calls == [("progress", ["job-0=0.99", "job-1=0.5"])]
    s.outbox.report(a, 1.0, None)  # the next report asks for the next wake-up
    assert len(s.clock.due) == 1
    s.clock.advance(PROGRESS_INTERVAL_S)
    assert s.wakes == 2


async def test_a_jobs_last_report_is_written_before_its_outcome() -> None:
    """A report still unwritten when the job ended goes with its outcome, first: written
    after the outcome, the broker would refuse it as stale."""
    s = Setup()
    (a,) = await s.runs(1)
    s.outbox.report(a, 1.0, "done")
    s.outbox.add(a, done())
    await s.outbox.write_progress()  # a flush of running jobs' progress has nothing of it
    assert s.broker.calls == []

    batch = s.outbox.take()  # riding along with a claim
    await s.outbox.ready(batch)
    s.outbox.landed(batch, await s.broker.finish(batch.finishes))
    assert s.broker.calls == [("progress", ["job-0=1.0"]), ("finish", ["job-0"])]
    job = await s.stored(a)
    assert (job.progress, job.progress_message) == (1.0, "done")


async def test_an_outcome_waits_for_a_progress_write_in_flight() -> None:
    """The flush took a report while the job ran; the job ended before that write landed:
    its outcome must not overtake it."""
    s = Setup()
    (a,) = await s.runs(1)
    s.broker.hold_progress = asyncio.Event()
    s.outbox.report(a, 0.9, None)
    writing = asyncio.create_task(s.outbox.write_progress())
    await s.broker.progress_started.wait()  # the report is on its way
    s.outbox.add(a, done())
    flushing = asyncio.create_task(s.outbox.flush())
    for _ in range(10):
        await asyncio.sleep(0)  # every step the flush could take without the write landing
    assert not flushing.done() and s.broker.calls == []

    s.broker.hold_progress.set()
    await writing
    batch = await flushing
    assert batch is not None
    assert s.broker.calls == [("progress", ["job-0=0.9"]), ("finish", ["job-0"])]
    assert (await s.stored(a)).progress == 0.9


async def test_reports_after_the_outcome_and_of_lost_runs_are_dropped() -> None:
    s = Setup()
    a, b = await s.runs(2)
    s.outbox.add(a, done())
    s.outbox.report(a, 0.5, None)  # a thread that ran past its job's hard limit
    s.outbox.report(b, 0.5, None)
    s.outbox.drop(b)  # b's lease was lost: nothing of it is written
    s.outbox.report(b, 0.6, None)
    batch = await s.outbox.flush()
    assert batch is not None
    assert s.broker.calls == [("finish", ["job-0"])]
    assert batch.final == []


# --- events -----------------------------------------------------------------------------------


async def test_events_follow_the_writes_and_skip_rejected_outcomes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = Setup(events=True)
    a, b = await s.runs(2)
    s.outbox.report(a, 0.5, "half")
    await s.outbox.write_progress()
    s.clock.now += 1
    s.outbox.report(a, 1.0, "all")
    s.outbox.add(a, done())
    stale = JobRun(b.job, Claim(b.job.id, "not-the-token"), b.ctx, task=None, plain=True)
    s.outbox.add(stale, done())
    with caplog.at_level(logging.WARNING, logger="taskmill.worker"):
        batch = await s.outbox.flush()
    assert batch is not None and batch.applied == [True, False]
    assert [(e.job_id, e.state, e.progress, e.at) for e in s.events] == [
        ("job-0", "running", 0.5, 0.0),
        ("job-0", "running", 1.0, 1.0),
        ("job-0", "succeeded", None, 1.0),
    ]
    assert "job job-1: outcome Succeeded rejected: lease token not-the-token is stale" in (
        caplog.text
    )


class SlowBus(MemoryBroker):
    """Its first publish waits until released (a round trip a stop may cut short)."""

    def __init__(self) -> None:
        super().__init__()
        self.publishing = asyncio.Event()
        self.release = asyncio.Event()
        self.published: list[bytes] = []

    async def publish_events(self, payload: bytes) -> None:
        self.publishing.set()
        if not self.published:
            await self.release.wait()
        self.published.append(payload)


def _event(state: str, seq: int) -> Event:
    return Event("job-0", "t", "default", state, 1, 0.0, seq)


async def test_a_publish_cut_short_by_a_stop_is_sent_by_the_last_publish() -> None:
    """A worker stops by cancelling the publisher's loop, then publishes what is left: the
    events of a publish the cancel interrupted are in what is left, not dropped."""
    from taskmill.events import decode_payload
    from taskmill.worker.outbox import Publisher

    bus = SlowBus()
    publisher = Publisher(bus, worker_id="w")
    loop = asyncio.create_task(publisher.run())
    publisher.emit(_event("running", 1))
    await asyncio.wait_for(bus.publishing.wait(), 5)
    publisher.emit(_event("succeeded", 2))
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop
    bus.release.set()
    await publisher.publish()
    sent = [e.state for payload in bus.published for e in decode_payload(payload)]
    assert sent == ["running", "succeeded"]
