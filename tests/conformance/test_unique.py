"""Unique keys: one pending job per key."""

from __future__ import annotations

import threading

import msgspec
import pytest

from taskmill import App, ConfigurationError, DuplicateJobError, JobState
from taskmill.testing import running_worker

from .helpers import opened, wait_until


def test_second_send_returns_the_pending_job(app: App) -> None:
    @app.task()
    def sync_user(user_id: int) -> int:
        return user_id

    first = sync_user.options(key="user-1").send(1)
    second = sync_user.options(key="user-1").send(2)
    assert first.existing is False
    assert second.existing is True
    assert second.id == first.id
    other = sync_user.options(key="user-2").send(2)
    assert other.id != first.id and not other.existing
    jobs = app.run_sync(opened(app).list_jobs())
    assert sorted(j.id for j in jobs) == sorted([first.id, other.id])
    assert app.get_job(first.id).key == "user-1"


def test_scheduled_and_running_jobs_hold_their_key(app: App) -> None:
    started = threading.Event()
    release = threading.Event()

    @app.task()
    def hold() -> str:
        started.set()
        assert release.wait(20)
        return "held"

    scheduled = hold.options(key="later", delay=60).send()
    assert hold.options(key="later").send().id == scheduled.id

    running = hold.options(key="busy").send()
    with running_worker(app):
        assert started.wait(10)
        again = hold.options(key="busy").send()
        assert again.existing and again.id == running.id
        release.set()
        assert running.result(timeout=10) == "held"
        # finished: the key is free again
        fresh = hold.options(key="busy").send()
        assert not fresh.existing and fresh.id != running.id
        assert fresh.result(timeout=10) == "held"


def test_on_conflict_raise(app: App) -> None:
    @app.task()
    def once() -> None:
        return None

    first = once.options(key="k").send()
    with pytest.raises(DuplicateJobError) as info:
        once.options(key="k", on_conflict="raise").send()
    assert info.value.key == "k"
    assert info.value.existing_id == first.id
    assert len(app.run_sync(opened(app).list_jobs())) == 1


async def test_on_conflict_raise_async(app: App) -> None:
    @app.task()
    def once() -> None:
        return None

    first = await once.options(key="k").asend()
    again = await once.options(key="k").asend()
    assert again.existing and again.id == first.id
    with pytest.raises(DuplicateJobError):
        await once.options(key="k", on_conflict="raise").asend()


def test_keys_within_one_batch(app: App) -> None:
    @app.task(key=lambda n: f"n-{n % 2}")
    def parity(n: int) -> int:
        return n

    handles = parity.send_many([(1,), (2,), (3,), (4,)])
    assert [h.existing for h in handles] == [False, False, True, True]
    assert handles[2].id == handles[0].id and handles[3].id == handles[1].id
    assert app.get_job(handles[0].id).key == "n-1"

    # with "raise", a conflict rejects the whole batch: nothing of it is stored
    before = len(app.run_sync(opened(app).list_jobs()))
    with pytest.raises(DuplicateJobError):
        parity.options(on_conflict="raise").send_many([(5,), (7,)])
    with pytest.raises(DuplicateJobError):
        parity.options(on_conflict="raise", key="fresh").send_many([(10,), (11,)])
    assert len(app.run_sync(opened(app).list_jobs())) == before


def test_key_function_and_key_freed_by_failure_and_cancel(app: App) -> None:
    @app.task(retries=0, key=lambda order_id: f"order-{order_id}")
    def charge(order_id: int) -> int:
        raise RuntimeError("card declined")

    first = charge.send(7)
    assert charge.send(7).id == first.id
    first.cancel()
    after_cancel = charge.send(7)
    assert after_cancel.id != first.id and not after_cancel.existing
    with running_worker(app):
        assert app.get_job(after_cancel.id).key == "order-7"
        with pytest.raises(Exception, match="card declined"):
            after_cancel.result(timeout=10)
    assert after_cancel.status() is JobState.FAILED
    assert not charge.send(7).existing


def test_a_stored_job_id_is_never_stored_again(app: App) -> None:
    """``job_id``: a send repeated under a stored id stores nothing, before the job ran, after
    it succeeded, and within one batch of the broker contract."""
    runs: list[int] = []

    @app.task()
    def charge(order: int) -> int:
        runs.append(order)
        return order

    first = charge.options(job_id="charge-1").send(1)
    again = charge.options(job_id="charge-1").send(1)
    assert (first.id, first.existing) == ("charge-1", False)
    assert (again.id, again.existing) == ("charge-1", True)
    with running_worker(app):
        assert first.result(timeout=10) == 1
    after = charge.options(job_id="charge-1").send(1)
    assert after.existing and after.status() is JobState.SUCCEEDED
    with running_worker(app):
        fresh = charge.send(2)
        assert fresh.result(timeout=10) == 2
    assert sorted(runs) == [1, 2]

    broker = opened(app)
    batch = [charge.build(charge.defaults, (n,), {}) for n in (3, 4)]
    batch[1] = msgspec.structs.replace(batch[1], id="charge-1")
    result = app.run_sync(broker.enqueue(batch))
    assert result.ids == [batch[0].id, "charge-1"] and result.existing == {1}
    assert len(app.run_sync(broker.list_jobs())) == 3


def test_a_stored_job_id_sent_while_a_worker_waits_is_not_stored_again(app: App) -> None:
    """With a worker waiting for work (Redis asks for a stored id and for waiting workers in
    one command), a send under a stored id stores and runs nothing again, and a new job still
    goes to the waiting worker."""
    runs: list[int] = []

    @app.task()
    def charge(order: int) -> int:
        runs.append(order)
        return order

    with running_worker(app) as worker:
        first = charge.options(job_id="charge-9").send(1)
        assert first.result(timeout=10) == 1
        wait_until(lambda: worker.waiting_for_work, what="the worker to wait for work")
        again = charge.options(job_id="charge-9").send(1)
        assert (again.id, again.existing) == ("charge-9", True)
        fresh = charge.send(2)
        assert fresh.result(timeout=10) == 2
    assert sorted(runs) == [1, 2]
    assert app.get_job("charge-9").attempt == 1


def test_a_stored_job_id_wins_over_its_own_key(app: App) -> None:
    """A job repeated under its id and its unique key is the same job, not a key conflict."""

    @app.task()
    def once() -> None:
        return None

    first = once.options(job_id="j-1", key="k").send()
    again = once.options(job_id="j-1", key="k", on_conflict="raise").send()
    assert again.existing and again.id == first.id == "j-1"


def test_job_id_is_for_one_job(app: App) -> None:
    @app.task()
    def once() -> None:
        return None

    with pytest.raises(ConfigurationError, match="job_id names one job"):
        once.options(job_id="j").send_many([(), ()])
    with pytest.raises(ConfigurationError, match="job_id must be a string of 1 to 200 characters"):
        once.options(job_id="")


def test_job_by_key_finds_the_pending_holder_only(app: App) -> None:
    started = threading.Event()
    release = threading.Event()

    @app.task()
    def hold() -> str:
        started.set()
        assert release.wait(20)
        return "held"

    scheduled = hold.options(key="later", delay=60).send()
    found = app.job_by_key("later")
    assert found is not None and found.id == scheduled.id
    assert found.state is JobState.SCHEDULED and found.key == "later"
    assert app.job_by_key("nobody-holds-this") is None

    running = hold.options(key="busy").send()
    queued = app.run_sync(app.ajob_by_key("busy"))
    assert queued is not None and (queued.id, queued.state) == (running.id, JobState.QUEUED)
    with running_worker(app):
        assert started.wait(10)
        held = app.job_by_key("busy")
        assert held is not None and (held.id, held.state) == (running.id, JobState.RUNNING)
        release.set()
        assert running.result(timeout=10) == "held"
        assert app.job_by_key("busy") is None, "a finished job holds no key"
        assert app.get_job(running.id).key == "busy"
    assert app.job_by_key("later") is not None, "the scheduled job still holds its key"
    with pytest.raises(ValueError, match="key must be a non-empty str"):
        app.job_by_key("")
