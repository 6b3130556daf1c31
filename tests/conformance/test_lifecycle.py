"""States, timestamps, attempts, stored results and errors of one job."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from taskmill import (
    App,
    JobCancelledError,
    JobFailedError,
    JobNotFoundError,
    JobState,
    current_job,
)
from taskmill.serialization import decode
from taskmill.testing import running_worker

from .helpers import wait_until


class BoomError(RuntimeError):
    pass


def test_states_timestamps_and_attempt(app: App) -> None:
    started = threading.Event()
    release = threading.Event()

    @app.task()
    def step(x: int) -> int:
        started.set()
        assert release.wait(20)
        return x + 1

    before = time.time()
    handle = step.send(41)
    after_send = time.time()
    queued = app.get_job(handle.id)
    assert queued.state is JobState.QUEUED
    assert handle.status() is JobState.QUEUED
    assert queued.attempt == 0
    assert before - 1 <= queued.enqueued_at <= after_send + 1
    assert queued.started_at is None and queued.finished_at is None
    assert queued.result is None and queued.error is None

    with running_worker(app):
        assert started.wait(10)
        running = wait_until(
            lambda: (j := app.get_job(handle.id)).state is JobState.RUNNING and j,
            what="the job to show as running",
        )
        assert running.attempt == 1
        assert running.started_at is not None and running.finished_at is None
        assert running.lease_token and running.worker_id
        assert running.lease_expires_at is not None
        assert running.lease_expires_at > running.started_at
        release.set()
        assert handle.result(timeout=10) == 42

    done = app.get_job(handle.id)
    assert done.state is JobState.SUCCEEDED
    assert done.attempt == 1
    assert done.started_at is not None and done.finished_at is not None
    assert done.enqueued_at <= done.started_at + 0.5
    assert done.started_at <= done.finished_at
    assert done.result is not None and decode(done.result) == 42
    assert done.error is None
    # the handle and the app agree; a finished job keeps answering
    assert handle.status() is JobState.SUCCEEDED
    assert handle.result(timeout=1) == 42


def test_none_result_is_stored(app: App) -> None:
    @app.task()
    def nothing() -> None:
        return None

    with running_worker(app):
        handle = nothing.send()
        assert handle.result(timeout=10) is None
    assert app.get_job(handle.id).state is JobState.SUCCEEDED


def test_failure_carries_type_message_and_traceback(app: App) -> None:
    @app.task(retries=0)
    def explode(what: str) -> None:
        raise BoomError(f"it went {what}")

    @app.task(retries=0)
    async def aexplode() -> None:
        raise ValueError("async boom")

    with running_worker(app):
        handle = explode.send("bang")
        with pytest.raises(JobFailedError) as info:
            handle.result(timeout=10)
        ahandle = aexplode.send()
        with pytest.raises(JobFailedError) as ainfo:
            ahandle.result(timeout=10)

    err = info.value
    assert err.job_id == handle.id
    assert err.type.endswith("BoomError") and "." in err.type  # module-qualified
    assert err.message == "it went bang"
    assert "explode" in err.traceback and "BoomError: it went bang" in err.traceback
    assert "it went bang" in str(err)
    assert ainfo.value.type == "ValueError" and ainfo.value.message == "async boom"
    assert "aexplode" in ainfo.value.traceback

    job = app.get_job(handle.id)
    assert job.state is JobState.FAILED
    assert job.attempt == 1 and job.finished_at is not None
    assert job.error is not None and job.error.message == "it went bang"
    assert job.result is None


def test_result_timeout_when_not_finished(app: App) -> None:
    @app.task()
    def never_run() -> None:
        return None

    handle = never_run.send()
    with pytest.raises(TimeoutError, match=handle.id):
        handle.result(timeout=0.2)


def test_unknown_job_id(app: App) -> None:
    with pytest.raises(JobNotFoundError):
        app.get_job("no-such-job")
    with pytest.raises(JobNotFoundError):
        app.job("no-such-job").status()
    with pytest.raises(JobNotFoundError):
        app.job("no-such-job").cancel()


def test_cancelled_result_raises(app: App) -> None:
    @app.task()
    def later() -> None:
        return None

    handle = later.options(delay=60).send()
    assert handle.cancel() is JobState.CANCELLED
    with pytest.raises(JobCancelledError):
        handle.result(timeout=1)


def test_timeout_option_fails_an_async_task(app: App) -> None:
    @app.task(retries=0)
    async def too_slow() -> None:
        await asyncio.sleep(30)

    with running_worker(app):
        handle = too_slow.options(timeout=0.2).send()
        with pytest.raises(JobFailedError) as info:
            handle.result(timeout=10)
    assert info.value.type == "taskmill.errors.TaskTimeoutError"
    job = app.get_job(handle.id)
    assert job.state is JobState.FAILED and job.attempt == 1


def test_timeout_option_fails_a_sync_task_and_asks_it_to_stop(app: App) -> None:
    stopped = threading.Event()

    @app.task(retries=0)
    def too_slow() -> None:
        job = current_job()
        deadline = time.monotonic() + 20
        while not job.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        if job.cancelled:
            stopped.set()

    with running_worker(app):
        handle = too_slow.options(timeout=0.2).send()
        with pytest.raises(JobFailedError) as info:
            handle.result(timeout=10)
        assert stopped.wait(10), "the task's thread was not told to stop"
    assert info.value.type == "taskmill.errors.TaskTimeoutError"
