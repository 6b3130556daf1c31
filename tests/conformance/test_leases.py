"""Leases and fencing: expired leases are recovered, poison jobs quarantined, and a finish with
a stale lease token is rejected and writes nothing.

A dead worker is simulated by claiming through ``broker.claim`` directly and never heartbeating.
"""

from __future__ import annotations

import threading

import pytest

from taskmill import App, JobFailedError, JobState, current_job
from taskmill.job import (
    Cancelled,
    Claim,
    ErrorInfo,
    Failed,
    Finish,
    Outcome,
    Progress,
    Released,
    RetryAt,
    Succeeded,
)
from taskmill.serialization import decode
from taskmill.testing import running_worker

from .conftest import LEASE_SETTINGS, AppFactory
from .helpers import claim_of, claim_one, opened, recover_until, worker_info

LOST = "taskmill.errors.WorkerLostError"


@pytest.mark.timeout(30)
def test_expired_lease_goes_back_to_queued_and_runs_again(app_factory: AppFactory) -> None:
    app = app_factory(**LEASE_SETTINGS)

    @app.task(retries=0)
    def job_attempt() -> int:
        return current_job().attempt

    handle = job_attempt.send()
    dead = claim_one(app, lease_s=0.3)
    assert dead.id == handle.id and dead.attempt == 1
    assert handle.status() is JobState.RUNNING

    # a lease that has not expired is not recovered
    broker = opened(app)
    assert handle.id not in dict(app.run_sync(broker.recover(app.settings.max_lost_leases)))

    assert recover_until(app, handle.id) == "queued"
    back = app.get_job(handle.id)
    assert back.state is JobState.QUEUED
    assert back.attempt == 1, "the lost attempt counts"
    assert back.lost_leases == 1
    assert back.lease_token is None and back.worker_id is None
    assert back.error is not None and back.error.type == LOST

    with running_worker(app):
        assert handle.result(timeout=10) == 2
    done = app.get_job(handle.id)
    assert done.state is JobState.SUCCEEDED and done.attempt == 2 and done.lost_leases == 1


@pytest.mark.timeout(30)
def test_a_recovered_job_keeps_its_place_before_jobs_sent_after_it(
    app_factory: AppFactory,
) -> None:
    """A job whose worker died is claimed again before the jobs sent after it: it keeps its
    place in the queue (on NATS, through the lane's redo lane; found by T18 at full size,
    where a recovered job waited ~20 s behind newer ones)."""
    app = app_factory(**LEASE_SETTINGS)

    @app.task(retries=0)
    def step(n: int) -> int:
        return n

    first = step.send(0)
    assert claim_one(app, lease_s=0.3).id == first.id
    later = {step.send(n).id for n in range(1, 21)}  # more than a claim looks ahead at
    assert recover_until(app, first.id) == "queued"
    broker = opened(app)
    claimed = app.run_sync(broker.claim(["default"], 1, "next", 30.0))
    assert [j.id for j in claimed] == [first.id]
    rest = app.run_sync(broker.claim(["default"], 30, "next", 30.0))
    assert {j.id for j in rest} == later


@pytest.mark.timeout(30)
def test_a_recovered_job_says_which_attempt_and_worker_lost_the_lease(
    app_factory: AppFactory,
) -> None:
    """One message on every broker, though SQL and Lua fill it in: placeholders in a worker's
    name stay as they are."""
    app = app_factory(**LEASE_SETTINGS)

    @app.task(retries=0)
    def job_attempt() -> int:
        return current_job().attempt

    handle = job_attempt.send()
    claim_one(app, lease_s=0.3, worker="w{attempt}%s{lost_leases}")
    assert recover_until(app, handle.id) == "queued"
    error = app.get_job(handle.id).error
    assert error == ErrorInfo(
        LOST,
        "lease expired on attempt 1 (worker w{attempt}%s{lost_leases} stopped heartbeating); "
        "lost leases: 1",
    )


@pytest.mark.timeout(30)
def test_workers_recover_dead_workers_jobs(app_factory: AppFactory) -> None:
    app = app_factory(**LEASE_SETTINGS)

    @app.task(retries=0)
    def job_attempt() -> int:
        return current_job().attempt

    handle = job_attempt.send()
    claim_one(app, lease_s=0.3)
    with running_worker(app):  # its maintenance loop finds the expired lease on its own
        assert handle.result(timeout=15) == 2
    assert app.get_job(handle.id).lost_leases == 1


@pytest.mark.timeout(30)
def test_heartbeats_keep_a_long_job_leased(app_factory: AppFactory) -> None:
    app = app_factory(**LEASE_SETTINGS)  # lease 1 s, heartbeat 0.2 s

    never = threading.Event()

    @app.task(retries=0)
    def long_job() -> int:
        job = current_job()
        assert not never.wait(2.0)  # two lease lengths
        return job.attempt

    with running_worker(app):
        handle = long_job.send()
        assert handle.result(timeout=15) == 1
    job = app.get_job(handle.id)
    assert job.attempt == 1 and job.lost_leases == 0


@pytest.mark.timeout(30)
def test_poison_job_fails_after_max_lost_leases(app_factory: AppFactory) -> None:
    app = app_factory(**LEASE_SETTINGS, max_lost_leases=2)

    @app.task(retries=5)
    def poison() -> None:
        return None

    handle = poison.send()
    claim_one(app, lease_s=0.2)
    assert recover_until(app, handle.id) == "queued"
    second = claim_one(app, lease_s=0.2)
    assert second.attempt == 2
    assert recover_until(app, handle.id) == "failed"
    job = app.get_job(handle.id)
    assert job.state is JobState.FAILED
    assert job.lost_leases == 2 and job.attempt == 2
    assert job.finished_at is not None and job.lease_token is None
    with pytest.raises(JobFailedError) as info:
        handle.result(timeout=1)
    assert info.value.type == LOST
    # quarantined, not lost: it can be retried by hand with a fresh budget
    assert app.run_sync(opened(app).retry([handle.id])) == [handle.id]
    again = app.get_job(handle.id)
    assert again.state is JobState.QUEUED and again.lost_leases == 0 and again.attempt == 0


@pytest.mark.timeout(30)
def test_cancel_requested_on_a_dead_workers_job_ends_cancelled(app_factory: AppFactory) -> None:
    app = app_factory(**LEASE_SETTINGS)

    @app.task()
    def stuck() -> None:
        return None

    handle = stuck.send()
    claim_one(app, lease_s=0.2)
    assert handle.cancel() is JobState.RUNNING
    assert recover_until(app, handle.id) == "cancelled"
    assert handle.status() is JobState.CANCELLED


@pytest.mark.timeout(30)
def test_stale_token_is_rejected_and_writes_nothing(app_factory: AppFactory) -> None:
    app = app_factory(**LEASE_SETTINGS)

    @app.task()
    def contested() -> None:
        return None

    broker = opened(app)
    handle = contested.send()
    old = claim_one(app, lease_s=0.2, worker="old")
    assert recover_until(app, handle.id) == "queued"
    new = claim_one(app, lease_s=30, worker="new")
    assert new.attempt == 2
    assert new.lease_token != old.lease_token
    stale = claim_of(old)
    err = ErrorInfo("RuntimeError", "late")

    outcomes: list[Outcome] = [
        Succeeded(b'"stale result"'),
        Failed(err),
        RetryAt(run_at=0.0, error=err),
        Cancelled("late cancel"),
        Released(),
    ]
    for outcome in outcomes:
        assert app.run_sync(broker.finish([Finish(stale, outcome)])) == [False], outcome
    app.run_sync(broker.record_progress([Progress(stale, 0.9, "stale progress")]))
    reply = app.run_sync(broker.heartbeat(worker_info("old"), [stale], 30.0))
    assert handle.id in reply.lost

    job = app.get_job(handle.id)
    assert job.state is JobState.RUNNING
    assert job.lease_token == new.lease_token and job.worker_id == "new"
    assert job.attempt == 2
    assert job.result is None and job.progress is None and job.progress_message is None
    assert job.error is not None and job.error.type == LOST  # from the recovery, not "late"

    # the current holder's writes do apply; a mixed batch is judged claim by claim
    current = claim_of(new)
    assert app.run_sync(broker.heartbeat(worker_info("new"), [current], 30.0)).lost == set()
    applied = app.run_sync(
        broker.finish([Finish(stale, Failed(err)), Finish(current, Succeeded(b'"fresh"'))])
    )
    assert applied == [False, True]
    done = app.get_job(handle.id)
    assert done.state is JobState.SUCCEEDED
    assert done.result is not None and decode(done.result) == "fresh"
    assert handle.result(timeout=1) == "fresh"
    # and once finished, even the right token cannot write again
    assert app.run_sync(broker.finish([Finish(current, Failed(err))])) == [False]
    assert handle.status() is JobState.SUCCEEDED


def test_finish_for_unknown_job_is_rejected(app: App) -> None:
    broker = opened(app)
    assert app.run_sync(broker.finish([Finish(Claim("nope", "x"), Succeeded(b"1"))])) == [False]
