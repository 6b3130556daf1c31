"""The worker's reserve: it claims beyond its slots in place of jobs that cannot run, and
never runs more functions at once than its concurrency (``taskmill.worker.reserve``)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator, Sequence

import pytest

from taskmill import App
from taskmill.brokers.memory import MemoryBroker
from taskmill.job import Finish, Job, JobState, Released
from taskmill.task import Task
from taskmill.testing import running_worker, wait_until
from taskmill.worker import parts
from taskmill.worker.reserve import BodySlots, Reserve

pytestmark = pytest.mark.timeout(60)


def test_the_reserve_follows_the_share_of_jobs_that_end_without_running() -> None:
    reserve = Reserve(concurrency=4)
    assert reserve.extra(4) == 0
    for _ in range(200):
        reserve.finished(ran=False)
        reserve.finished(ran=True)
    assert 0.45 < reserve.share < 0.55
    assert reserve.extra(4) == 4  # 6 extra for 4 free slots, capped at the concurrency
    reserve.share = 0.5
    assert (reserve.extra(1), reserve.extra(2)) == (2, 3)  # half as many again as expected
    reserve.share = 0.05
    assert reserve.extra(4) == 0  # a few such jobs: no reserve
    for _ in range(400):
        reserve.finished(ran=False)
    assert reserve.extra(4) == 4
    for _ in range(200):
        reserve.finished(ran=True)
    assert reserve.extra(4) == 0  # the jobs run again: no reserve


def test_a_slot_goes_to_the_first_job_waiting_for_it() -> None:
    async def main() -> None:
        slots = BodySlots(1, wait_s=5.0)
        assert slots.try_take()
        assert not slots.try_take()
        first = asyncio.create_task(slots.take())
        second = asyncio.create_task(slots.take())
        await asyncio.sleep(0)
        assert not slots.try_take()  # jobs wait: a newcomer does not jump the line
        slots.give_back()
        assert await first
        assert not second.done()
        slots.give_back()
        assert await second
        slots.give_back()
        assert slots.taken == 0

    asyncio.run(main())


def test_a_wait_past_its_time_or_cancelled_takes_no_slot() -> None:
    async def main() -> None:
        slots = BodySlots(1, wait_s=0.05)
        assert slots.try_take()
        assert not await slots.take()  # timed out
        waiter = asyncio.create_task(slots.take())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        slots.give_back()
        assert slots.taken == 0
        assert slots.try_take()  # nothing leaked, nothing counted twice

    asyncio.run(main())


def test_a_wait_that_timed_out_does_not_hold_up_free_slots() -> None:
    """A job that gave up waiting leaves the line: once the slots are free, the next job
    takes one at once instead of waiting for a function to return."""

    async def main() -> None:
        slots = BodySlots(1, wait_s=0.05)
        assert slots.try_take()
        assert not await slots.take()  # timed out while the slot was busy
        slots.give_back()
        assert slots.taken == 0
        assert slots.try_take()

    asyncio.run(main())


def test_a_slot_handed_over_as_the_wait_ends_passes_on() -> None:
    async def main() -> None:
        slots = BodySlots(1, wait_s=5.0)
        assert slots.try_take()
        waiter = asyncio.create_task(slots.take())
        await asyncio.sleep(0)
        slots.give_back()  # the slot is the waiter's ...
        waiter.cancel()  # ... but it is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert slots.taken == 0
        assert slots.try_take()

    asyncio.run(main())


def test_closed_slots_turn_away_waiting_and_later_jobs() -> None:
    async def main() -> None:
        slots = BodySlots(1, wait_s=5.0)
        assert slots.try_take()
        waiter = asyncio.create_task(slots.take())
        await asyncio.sleep(0)
        slots.close()
        assert not await waiter
        assert not await slots.take()
        slots.give_back()
        assert slots.taken == 0

    asyncio.run(main())


def producer_of_unknown_jobs(broker: MemoryBroker) -> App:
    """An app that sends jobs of a task the worker's app does not have (they fail at once)."""
    producer = App("memory://")
    producer.client.use_broker(broker)

    @producer.task(name="gone.task")
    def gone(n: int) -> int:
        return n

    return producer


class Claims(MemoryBroker):
    """Keeps how many jobs each claim asked for, and every hand-back."""

    def __init__(self) -> None:
        super().__init__()
        self.limits: list[int] = []
        self.released: list[str] = []

    async def finish_and_claim(
        self,
        finishes: Sequence[Finish],
        queues: Sequence[str],
        limit: int,
        worker_id: str,
        lease_s: float,
    ) -> tuple[list[bool], list[Job]]:
        self.limits.append(limit)
        self.released += [f.claim.job_id for f in finishes if isinstance(f.outcome, Released)]
        return await super().finish_and_claim(finishes, queues, limit, worker_id, lease_s)

    async def finish(self, finishes: Sequence[Finish]) -> list[bool]:
        self.released += [f.claim.job_id for f in finishes if isinstance(f.outcome, Released)]
        return await super().finish(finishes)


def test_jobs_that_cannot_run_are_replaced_without_running_more_than_the_slots() -> None:
    """Half the queue is records of a task no worker knows: they fail at once, and the
    worker claims more than its free slots in their place, yet at most 2 functions run
    at once, and every job ends as it should."""
    broker = Claims()
    app = App("memory://")
    app.client.use_broker(broker)
    lock = threading.Lock()
    inside = [0, 0]  # now, most at once

    @app.task
    def good(n: int) -> int:
        with lock:
            inside[0] += 1
            inside[1] = max(inside)
        threading.Event().wait(0.002)
        with lock:
            inside[0] -= 1
        return n

    producer = producer_of_unknown_jobs(broker)
    try:
        handles, bad = [], []
        for n in range(150):
            bad.append(producer.send_task("gone.task", [n]))
            handles.append(good.send(n))
        with running_worker(app, concurrency=2):
            assert [h.result(timeout=30) for h in handles] == list(range(150))
            wait_until(lambda: all(h.status() is JobState.FAILED for h in bad), timeout=30)
        assert inside[1] == 2
        assert max(broker.limits) > 2, broker.limits  # it claimed beyond its 2 slots
        error = bad[0].info().error
        assert error is not None and error.type == "taskmill.errors.UnknownTaskError"
    finally:
        app.close()


@contextlib.contextmanager
def one_slot_among_doomed(
    monkeypatch: pytest.MonkeyPatch, wait_s: float, *, one_ran: bool
) -> Iterator[tuple[Claims, Task[[bool], bool], threading.Event]]:
    """A worker with one slot and a reserve wait of ``wait_s`` that has seen 200 jobs it
    cannot run fail (and, ``one_ran``, one short job run): its broker, the task ``work``
    (``work(True)`` holds the slot until the event is set) and that event."""
    monkeypatch.setattr(parts, "WAIT_S", wait_s)
    broker = Claims()
    app = App("memory://")
    app.client.use_broker(broker)
    release = threading.Event()

    @app.task
    def work(hold: bool) -> bool:
        if hold:
            assert release.wait(20)
        return hold

    producer = producer_of_unknown_jobs(broker)
    try:
        doomed = [producer.send_task("gone.task", [n]) for n in range(200)]
        with running_worker(app, concurrency=1):
            # the worker learns that most jobs cannot run, and goes idle
            wait_until(lambda: doomed[-1].status() is JobState.FAILED, timeout=20)
            if one_ran:
                assert work.send(False).result(timeout=20) is False  # a short job has run
            yield broker, work, release
    finally:
        release.set()
        app.close()


def test_a_job_in_reserve_too_long_is_handed_back_unstarted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One slot, taken by a job that runs long: the job claimed in reserve beside it goes
    back to the queue (no attempt spent) after the wait, and runs once the slot is free."""
    with one_slot_among_doomed(monkeypatch, 0.05, one_ran=False) as (broker, work, release):
        long_one, beside = work.send_many([(True,), (False,)])  # claimed together
        wait_until(lambda: beside.id in broker.released, timeout=20)
        assert long_one.status() is JobState.RUNNING, (broker.released, long_one.id)
        release.set()
        assert long_one.result(timeout=20) is True
        assert beside.result(timeout=20) is False
        assert beside.info().attempt == 1  # handed back: no attempt spent


def test_while_jobs_end_at_once_a_runnable_job_is_claimed_before_a_slot_is_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The standing reserve: with most jobs failing without running, a job sent while the
    only slot is busy is claimed at once (it waits in reserve, its lease held) and runs the
    moment the slot is free; without it, it stayed queued until the next claim."""
    with one_slot_among_doomed(monkeypatch, 20.0, one_ran=True) as (broker, work, release):
        long_one = work.send(True)
        wait_until(lambda: long_one.status() is JobState.RUNNING, timeout=20)
        beside = work.send(False)  # sent after: the slot is busy
        wait_until(lambda: beside.status() is JobState.RUNNING, timeout=20)
        assert long_one.status() is JobState.RUNNING
        release.set()
        assert long_one.result(timeout=20) is True
        assert beside.result(timeout=20) is False
        assert beside.info().attempt == 1 and beside.id not in broker.released


def test_a_hand_back_from_the_reserve_stops_the_standing_reserve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job handed back from the reserve (its wait ran out behind a long job) is not
    claimed again and again while the long job runs: the standing reserve stops for
    ``QUIET_S``. Without that, a reserve wait of 50 ms made it go back about 20 times in
    the second watched here."""
    with one_slot_among_doomed(monkeypatch, 0.05, one_ran=True) as (broker, work, release):
        long_one = work.send(True)
        wait_until(lambda: long_one.status() is JobState.RUNNING, timeout=20)
        beside = work.send(False)
        wait_until(lambda: beside.id in broker.released, timeout=20)
        # an absence, watched for 20 reserve waits
        assert not release.wait(20 * 0.05)
        assert broker.released.count(beside.id) == 1, broker.released
        assert beside.status() is JobState.QUEUED
        release.set()
        assert long_one.result(timeout=20) is True
        assert beside.result(timeout=20) is False
