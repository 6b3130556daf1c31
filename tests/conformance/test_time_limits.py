"""Soft and hard time limits, as every broker stores them: a per-send soft limit travels with
the job's arguments, and the limits' errors are recorded and retried like any other."""

from __future__ import annotations

import asyncio

import pytest

from taskmill import App, JobFailedError, JobState, SoftTimeLimitExceeded
from taskmill.testing import running_worker

pytestmark = pytest.mark.timeout(60)

# Retries wait longer than a heartbeat's round trip: a heartbeat still carrying the first
# attempt's claim can report the job lost by its id, which stops the second attempt if the
# same worker claimed it meanwhile (a worker race outside time limits).
RETRY_AFTER_S = 0.5


def test_a_per_send_soft_limit_reaches_the_worker(app: App) -> None:
    @app.task(name="export", timeout=30)
    async def export() -> str:
        try:
            await asyncio.sleep(20)
        except SoftTimeLimitExceeded as exc:
            return str(exc)
        return "no soft limit"

    with running_worker(app):
        limited = export.options(soft_timeout=0.2).send()
        assert limited.result(timeout=20) == "task export exceeded its soft time limit of 0.2 s"
    job = app.get_job(limited.id)
    assert job.state is JobState.SUCCEEDED and job.attempt == 1 and job.timeout_s == 30


def test_time_limit_errors_are_recorded_and_retried_by_the_policy(app: App) -> None:
    @app.task(name="reraises", soft_timeout=0.1, timeout=30, retries=1, backoff=RETRY_AFTER_S)
    async def reraises() -> None:
        await asyncio.sleep(20)

    @app.task(name="ignores", soft_timeout=0.1, timeout=0.4, retries=1, backoff=RETRY_AFTER_S)
    async def ignores() -> None:
        try:
            await asyncio.sleep(20)
        except SoftTimeLimitExceeded:
            await asyncio.sleep(20)

    with running_worker(app):
        soft, hard = reraises.send(), ignores.send()
        with pytest.raises(JobFailedError) as soft_error:
            soft.result(timeout=30)
        with pytest.raises(JobFailedError) as hard_error:
            hard.result(timeout=30)
    assert soft_error.value.type == "taskmill.errors.SoftTimeLimitExceeded"
    assert soft_error.value.message == "task reraises exceeded its soft time limit of 0.1 s"
    assert hard_error.value.type == "taskmill.errors.TaskTimeoutError"
    assert hard_error.value.message == (
        "task ignores timed out after 0.4 s (its hard time limit); it was cancelled"
    )
    for handle in (soft, hard):
        job = app.get_job(handle.id)
        assert (job.state, job.attempt) == (JobState.FAILED, 2), job  # retries=1: one retry
