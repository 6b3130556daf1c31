"""Retries: backoff that grows and is capped, Retry(delay=), retry_on / dont_retry_on, and
retrying failed jobs by hand."""

from __future__ import annotations

import threading
import time

import pytest

from taskmill import App, Backoff, JobFailedError, JobState, Retry, current_job
from taskmill.testing import running_worker

from .helpers import opened, wait_until


class TransientError(Exception):
    pass


class PermanentError(TransientError):
    pass


def _stored_run_at(app: App, job_id: str) -> float:
    """The stored ``run_at`` of the job, read from inside the task."""
    return app.get_job(job_id).run_at


@pytest.mark.timeout(30)
def test_backoff_grows_and_is_capped(app: App) -> None:
    # delays 0.2, 0.4, then 0.8 and 1.6 capped to 0.5
    policy = Backoff(base=0.2, factor=2, cap=0.5, jitter=False)
    failed_at: list[float] = []
    run_at: list[float] = []
    attempts: list[int] = []

    @app.task(retries=4, backoff=policy)
    def flaky() -> str:
        job = current_job()
        attempts.append(job.attempt)
        run_at.append(_stored_run_at(app, job.id))
        if job.attempt < 5:
            failed_at.append(time.time())
            raise TransientError(f"attempt {job.attempt}")
        return "finally"

    with running_worker(app):
        handle = flaky.send()
        assert handle.result(timeout=20) == "finally"
    assert attempts == [1, 2, 3, 4, 5]
    # the delay before attempt n+1 is the stored run_at minus the time attempt n failed
    delays = [run_at[i + 1] - failed_at[i] for i in range(4)]
    for got, expected in zip(delays, [0.2, 0.4, 0.5, 0.5], strict=True):
        assert expected - 0.01 <= got <= expected + 0.15, (delays, expected)
    job = app.get_job(handle.id)
    assert job.state is JobState.SUCCEEDED and job.attempt == 5
    assert job.max_attempts == 5
    assert job.error is not None and job.error.message == "attempt 4"  # the last error is kept


@pytest.mark.timeout(30)
def test_jittered_backoff_stays_within_half_and_cap(app: App) -> None:
    failed_at: list[float] = []
    run_at: list[float] = []

    @app.task(retries=3, backoff=Backoff(base=0.4, factor=10, cap=0.4, jitter=True))
    def flaky() -> None:
        job = current_job()
        run_at.append(_stored_run_at(app, job.id))
        if job.attempt < 4:
            failed_at.append(time.time())
            raise TransientError("again")

    with running_worker(app):
        flaky.send().result(timeout=20)
    delays = [run_at[i + 1] - failed_at[i] for i in range(3)]
    assert all(0.19 <= d <= 0.4 + 0.15 for d in delays), delays


def test_waiting_retry_is_scheduled_in_the_broker(app: App) -> None:
    gate = threading.Event()

    @app.task(retries=1, backoff=Backoff.constant(30))
    def fails_once() -> str:
        if current_job().attempt == 1:
            raise TransientError("first")
        gate.set()
        return "second"

    with running_worker(app):
        handle = fails_once.send()
        job = wait_until(
            lambda: (j := app.get_job(handle.id)).state is JobState.SCHEDULED and j,
            what="the retry to be scheduled",
        )
    assert job.attempt == 1
    assert job.started_at is not None
    assert job.run_at >= time.time() + 25
    assert job.error is not None and job.error.message == "first"
    assert not gate.is_set()


def test_retry_with_delay_from_the_task(app: App) -> None:
    seen: list[tuple[int, float]] = []
    raised_at: list[float] = []
    started_at: list[float] = []

    @app.task(retries=1, backoff=Backoff.constant(3600))
    def again() -> int:
        started_at.append(time.time())
        job = current_job()
        seen.append((job.attempt, app.get_job(job.id).run_at))
        if job.attempt == 1:
            raised_at.append(time.time())
            raise Retry(delay=0.5, reason="not yet")
        return job.attempt

    with running_worker(app):
        handle = again.send()
        assert handle.result(timeout=10) == 2
    assert [a for a, _ in seen] == [1, 2]
    # Retry(delay=) wins over the task's hour-long backoff
    assert 0.49 <= seen[1][1] - raised_at[0] <= 0.65
    # and the idle worker picks it up when it comes due, not at its next idle poll
    assert started_at[1] - seen[1][1] < 1.0
    job = app.get_job(handle.id)
    assert job.error is not None and job.error.message == "not yet"


def test_retry_request_after_the_last_attempt_fails(app: App) -> None:
    @app.task(retries=1)
    def always() -> None:
        raise Retry(delay=0)

    with running_worker(app):
        handle = always.send()
        with pytest.raises(JobFailedError) as info:
            handle.result(timeout=10)
    assert info.value.type == "taskmill.retry.Retry"
    assert app.get_job(handle.id).attempt == 2


def test_dont_retry_on_fails_at_once(app: App) -> None:
    @app.task(retries=5, backoff=0, dont_retry_on=[PermanentError])
    def picky(permanent: bool) -> None:
        raise (PermanentError if permanent else TransientError)("no")

    with running_worker(app):
        permanent = picky.send(True)
        with pytest.raises(JobFailedError) as info:
            permanent.result(timeout=10)
        transient = picky.send(False)
        with pytest.raises(JobFailedError):
            transient.result(timeout=10)
    assert info.value.type.endswith("PermanentError")
    assert app.get_job(permanent.id).attempt == 1
    assert app.get_job(transient.id).attempt == 6


def test_retry_on_restricts_what_is_retried(app: App) -> None:
    @app.task(retries=3, backoff=0, retry_on=TransientError)
    def selective(kind: str) -> int:
        attempt = current_job().attempt
        if kind == "transient" and attempt < 3:
            raise TransientError("again")
        if kind == "other":
            raise ValueError("not retried")
        return attempt

    with running_worker(app):
        assert selective.send("transient").result(timeout=10) == 3
        other = selective.send("other")
        with pytest.raises(JobFailedError) as info:
            other.result(timeout=10)
    assert info.value.type == "ValueError"
    assert app.get_job(other.id).attempt == 1


def test_failed_after_last_attempt_then_retried_by_hand(app: App) -> None:
    healthy = threading.Event()

    @app.task(retries=1, backoff=0)
    def fragile(n: int) -> int:
        if not healthy.is_set():
            raise TransientError(f"down {n}")
        return n

    broker = opened(app)
    handles = [fragile.send(n) for n in range(3)]
    with running_worker(app):
        for h in handles:
            with pytest.raises(JobFailedError, match="down"):
                h.result(timeout=10)
        first = app.get_job(handles[0].id)
        assert first.state is JobState.FAILED and first.attempt == 2
        assert first.error is not None and first.error.message == "down 0"
        # failed jobs stay inspectable
        failed = app.run_sync(broker.list_jobs(state=JobState.FAILED))
        assert {j.id for j in failed} == {h.id for h in handles}

        healthy.set()
        assert app.run_sync(broker.retry([handles[0].id])) == [handles[0].id]
        assert handles[0].result(timeout=10) == 0
        assert handles[1].status() is JobState.FAILED  # only the one asked for

        assert sorted(app.run_sync(broker.retry(None))) == sorted(h.id for h in handles[1:])
        assert [h.result(timeout=10) for h in handles[1:]] == [1, 2]

    again = app.get_job(handles[0].id)
    assert again.state is JobState.SUCCEEDED
    assert again.attempt == 1, "a retry by hand starts with a fresh attempt budget"
    # nothing left to retry; a succeeded job is not retried
    assert app.run_sync(broker.retry(None)) == []
    assert app.run_sync(broker.retry([handles[0].id])) == []


def test_retry_all_failed_leaves_cancelled_jobs_but_retry_by_id_takes_them(app: App) -> None:
    @app.task(retries=0)
    def broken() -> None:
        raise TransientError("x")

    broker = opened(app)
    cancelled = broken.options(delay=60).send()
    cancelled.cancel()
    with running_worker(app):
        failed = broken.send()
        with pytest.raises(JobFailedError):
            failed.result(timeout=10)
    assert app.run_sync(broker.retry(None)) == [failed.id]
    assert failed.status() is JobState.QUEUED
    assert cancelled.status() is JobState.CANCELLED
    assert app.run_sync(broker.retry([cancelled.id])) == [cancelled.id]
    job = app.get_job(cancelled.id)
    assert job.state is JobState.QUEUED and job.attempt == 0
    assert job.run_at <= time.time() + 0.5, "a retried job is due now"


def test_retry_by_hand_is_skipped_while_its_key_is_taken(app: App) -> None:
    @app.task(retries=0)
    def keyed(fail: bool) -> None:
        if fail:
            raise TransientError("x")

    broker = opened(app)
    with running_worker(app):
        first = keyed.options(key="only-one").send(True)
        with pytest.raises(JobFailedError):
            first.result(timeout=10)
    second = keyed.options(key="only-one").send(False)
    assert not second.existing and second.id != first.id
    assert app.run_sync(broker.retry([first.id])) == []
    assert first.status() is JobState.FAILED
