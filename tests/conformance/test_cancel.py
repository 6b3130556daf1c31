"""Cancel: waiting jobs never run; a running async job is cancelled; a running sync job is
asked to stop (``current_job().cancelled``)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from taskmill import App, Cancel, JobCancelledError, JobState, current_job
from taskmill.testing import running_worker


def test_cancelled_queued_job_never_runs(app: App) -> None:
    ran: list[str] = []

    @app.task()
    def work(label: str) -> str:
        ran.append(label)
        return label

    doomed = work.send("doomed")
    assert doomed.cancel() is JobState.CANCELLED
    job = app.get_job(doomed.id)
    assert job.state is JobState.CANCELLED and job.finished_at is not None
    with running_worker(app, concurrency=1):
        assert work.send("after").result(timeout=10) == "after"
    assert ran == ["after"]
    assert app.get_job(doomed.id).attempt == 0


def test_cancelled_scheduled_job_never_runs(app: App) -> None:
    ran: list[str] = []

    @app.task()
    def work(label: str) -> str:
        ran.append(label)
        return label

    with running_worker(app):
        doomed = work.options(delay=0.3).send("doomed")
        assert doomed.status() is JobState.SCHEDULED
        assert doomed.cancel() is JobState.CANCELLED
        # a job due after the cancelled one: once it ran, the cancelled one's time had come
        assert work.options(delay=0.6).send("sentinel").result(timeout=10) == "sentinel"
    assert ran == ["sentinel"]
    assert doomed.status() is JobState.CANCELLED


def test_cancel_running_async_job(app: App) -> None:
    started = threading.Event()
    was_cancelled = threading.Event()

    @app.task()
    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            was_cancelled.set()
            raise

    with running_worker(app):
        handle = forever.send()
        assert started.wait(10)
        assert handle.cancel() is JobState.RUNNING  # requested; the worker ends it
        with pytest.raises(JobCancelledError):
            handle.result(timeout=10)
        assert was_cancelled.is_set()
    job = app.get_job(handle.id)
    assert job.state is JobState.CANCELLED
    assert job.finished_at is not None and job.attempt == 1


def test_cancel_running_sync_job_is_cooperative(app: App) -> None:
    started = threading.Event()
    saw_cancel = threading.Event()

    @app.task()
    def loop() -> str:
        job = current_job()
        started.set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if job.cancelled:
                saw_cancel.set()
                return "stopped early"
            time.sleep(0.01)
        return "ran out"

    with running_worker(app):
        handle = loop.send()
        assert started.wait(10)
        assert handle.cancel() is JobState.RUNNING
        with pytest.raises(JobCancelledError):
            handle.result(timeout=10)
    assert saw_cancel.is_set()
    job = app.get_job(handle.id)
    assert job.state is JobState.CANCELLED
    assert job.result is None, "a cancelled job stores no result"


def test_task_may_cancel_itself(app: App) -> None:
    @app.task(retries=3)
    def give_up() -> None:
        raise Cancel("nothing to do")

    with running_worker(app):
        handle = give_up.send()
        with pytest.raises(JobCancelledError):
            handle.result(timeout=10)
    job = app.get_job(handle.id)
    assert job.state is JobState.CANCELLED and job.attempt == 1


def test_cancel_finished_job_changes_nothing(app: App) -> None:
    @app.task()
    def quick() -> int:
        return 1

    with running_worker(app):
        handle = quick.send()
        assert handle.result(timeout=10) == 1
    assert handle.cancel() is JobState.SUCCEEDED
    assert handle.result(timeout=1) == 1


async def test_async_handle_cancel_and_status(app: App) -> None:
    @app.task()
    def later() -> None:
        return None

    handle = await later.options(delay=60).asend()
    assert await handle.astatus() is JobState.SCHEDULED
    assert await handle.acancel() is JobState.CANCELLED
    assert (await app.aget_job(handle.id)).state is JobState.CANCELLED
    with pytest.raises(JobCancelledError):
        await handle.aresult(timeout=1)
