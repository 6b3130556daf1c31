"""``--pool process``: sync tasks run in child processes the worker owns.

Results and errors travel back as data; the child makes the retry decision by the task's
policy; the soft limit raises ``SoftTimeLimitExceeded`` in the task; the hard limit kills the
child with the processes it started, as does the worker's death; a dead child fails the
attempt; children are replaced after ``max_tasks_per_child``. Every child is gone when the
worker stops.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from uuid import uuid4

import pytest

from taskmill import App, Backoff, Job, JobFailedError, JobState
from taskmill.retry import RetryPolicy
from taskmill.testing import running_worker, wait_until
from taskmill.worker import Worker, process_pool

from .pool_app import IMPORT_DELAY_ENV, build_app
from .support import Workers, wait_registered

T = TypeVar("T")
APP_PATH = f"{__name__.rpartition('.')[0]}.pool_app:app"
SETTINGS = {"lease_s": 10.0, "heartbeat_s": 0.1}


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    app = build_app(f"sqlite:///{tmp_path / 'jobs.db'}", **SETTINGS)
    yield app
    app.close()


@pytest.fixture
def pool(app: App) -> Iterator[Callable[..., Any]]:
    """Start a process-pool worker for ``app``; on exit, check no child outlived it."""

    def start(**options: Any) -> Any:
        options.setdefault("concurrency", 1)
        return running_worker(app, pool="process", app_path=APP_PATH, **options)

    yield start
    leftovers = multiprocessing.active_children()
    for child in leftovers:
        child.kill()
        child.join(5)
    assert leftovers == [], "child processes outlived their worker"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def process_running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan waits for whoever adopted it to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here
        return pid_alive(pid)
    return stat.rpartition(")")[2].split()[0] != "Z"


def read_pids(pid_file: Path) -> list[int] | None:
    """The pids a task wrote, once it wrote them all."""
    text = pid_file.read_text() if pid_file.exists() else ""
    return [int(p) for p in text.split()] if text.endswith(tuple("0123456789")) else None


def test_results_come_back_from_the_child(app: App, pool: Callable[..., Any]) -> None:
    square, pid = app.tasks["pool.square"], app.tasks["pool.pid"]
    with pool(concurrency=2):
        handles = square.send_many([(n,) for n in range(6)])
        assert [h.result(timeout=30) for h in handles] == [0, 1, 4, 9, 16, 25]
        child = pid.send().result(timeout=30)
    assert child != os.getpid()
    assert not pid_alive(child)  # stopped with the worker


def test_errors_carry_the_remote_type_message_and_traceback(
    app: App, pool: Callable[..., Any]
) -> None:
    with pool():
        handle = app.tasks["pool.boom"].send(7)
        with pytest.raises(JobFailedError) as info:
            handle.result(timeout=30)
        err = info.value
        assert err.type == "LookupError"
        assert err.message.startswith("no row 7 in child ")
        child_pid = int(err.message.rsplit(" ", 1)[1])
        assert child_pid != os.getpid()
        assert "Traceback (most recent call last):" in err.traceback
        assert 'raise LookupError(f"no row {n} in child {os.getpid()}")' in err.traceback
        assert "pool_app.py" in err.traceback
        # the child survived its task's exception and runs the next job
        assert app.tasks["pool.pid"].send().result(timeout=30) == child_pid
        assert app.get_job(handle.id).attempt == 1


def test_a_result_json_cannot_hold_fails_the_job_at_once(
    app: App, pool: Callable[..., Any]
) -> None:
    """NaN was stored as null; refused now, and not retried (the child retried a result it
    could not encode by the task's policy, the thread and async pools do not)."""
    with pool():
        handle = app.tasks["pool.nan"].send()
        with pytest.raises(JobFailedError) as info:
            handle.result(timeout=30)
    assert info.value.type == "taskmill.errors.SerializationError"
    assert "result of task 'pool.nan' cannot be stored as JSON: result is nan" in (
        info.value.message
    )
    assert app.get_job(handle.id).attempt == 1


def test_retry_decisions_are_made_by_the_tasks_policy_in_the_child(
    app: App, pool: Callable[..., Any]
) -> None:
    # the worker's own copy of the task would retry (no dont_retry_on): only the child's
    # policy, which lists QuotaExceededError, fails the job on its first attempt
    app.tasks["pool.quota"].policy = RetryPolicy(backoff=Backoff.constant(0))
    with pool():
        quota = app.tasks["pool.quota"].send()
        with pytest.raises(JobFailedError) as info:
            quota.result(timeout=30)
        assert info.value.type.endswith("pool_app.QuotaExceededError")
        assert info.value.message == "monthly quota used up"
        assert app.get_job(quota.id).attempt == 1  # dont_retry_on: no second attempt

        flaky = app.tasks["pool.flaky"].send(2)
        attempt, _ = flaky.result(timeout=30)
        assert attempt == 3
        job = app.get_job(flaky.id)
        assert job.error is not None and job.error.message == "attempt 2 failed"

        asked = app.tasks["pool.ask_retry"].send()
        assert asked.result(timeout=30) == 2  # Retry(delay=0), not the 1 h backoff

        exhausted = app.tasks["pool.flaky"].send(10)
        with pytest.raises(JobFailedError, match=r"ConnectionError: attempt 4 failed"):
            exhausted.result(timeout=30)
        assert app.get_job(exhausted.id).attempt == 4


def test_a_timeout_kills_the_child_and_the_next_job_runs_in_a_fresh_one(
    app: App, pool: Callable[..., Any], tmp_path: Path
) -> None:
    pid_file = tmp_path / "hang.pid"
    with pool():
        started = time.monotonic()
        handle = app.tasks["pool.hang"].send(str(pid_file))
        with pytest.raises(JobFailedError) as info:
            handle.result(timeout=30)
        assert time.monotonic() - started < 20  # not the task's 120 s sleep
        assert info.value.type == "taskmill.errors.TaskTimeoutError"
        assert info.value.message == (
            "task pool.hang timed out after 1 s (its hard time limit); its child process and "
            "the processes it started were killed"
        )
        hung = int(pid_file.read_text())
        assert not pid_alive(hung)
        fresh = app.tasks["pool.pid"].send().result(timeout=30)
        assert fresh != hung


def test_a_childs_start_up_does_not_count_against_the_jobs_hard_limit(
    app: App, pool: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # sent before the worker starts: its first child is still importing the app when the job
    # reaches it, for longer than the job's 1 s hard limit
    monkeypatch.setenv(IMPORT_DELAY_ENV, "1.5")
    handle = app.tasks["pool.square"].options(timeout=1).send(7)
    with pool():
        assert handle.result(timeout=30) == 49


def test_a_child_that_cannot_start_fails_the_attempt(
    app: App, pool: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(IMPORT_DELAY_ENV, "60")
    monkeypatch.setattr(process_pool, "_START_UP_S", 0.5)
    handle = app.tasks["pool.square"].options(retries=0).send(7)
    with pool(), pytest.raises(JobFailedError) as info:
        handle.result(timeout=30)
    assert info.value.type == "taskmill.errors.WorkerLostError"
    assert info.value.message == (
        "the child process for task pool.square had not imported the app after 0.5 s: "
        "killed before the job started"
    )


def test_the_hard_limit_kills_the_processes_the_task_started(
    app: App, pool: Callable[..., Any], tmp_path: Path
) -> None:
    pid_file = tmp_path / "spawned.pids"
    with pool():
        handle = app.tasks["pool.spawn_and_hang"].send(str(pid_file))
        child, sleeper = wait_until(lambda: read_pids(pid_file), what="the task's pids", timeout=20)
        assert process_running(sleeper)
        with pytest.raises(JobFailedError) as info:
            handle.result(timeout=30)
        assert info.value.type == "taskmill.errors.TaskTimeoutError"
        assert info.value.message == (
            "task pool.spawn_and_hang timed out after 1 s (its hard time limit); its child "
            "process and the processes it started were killed"
        )
        wait_until(
            lambda: not process_running(sleeper), what=f"sleep {sleeper} to be killed", timeout=20
        )
        assert not process_running(child)
        assert app.tasks["pool.pid"].send().result(timeout=30) not in (child, os.getpid())


def test_the_soft_limit_raises_in_the_task_which_cleans_up_and_returns(
    app: App, pool: Callable[..., Any], tmp_path: Path
) -> None:
    marker = tmp_path / "cleaned"
    with pool():
        started = time.monotonic()
        handle = app.tasks["pool.soft_cleanup"].send(str(marker))
        assert handle.result(timeout=30) == "cleaned up"
        assert time.monotonic() - started < 20  # not the task's 30 s sleep
        assert marker.read_text() == (
            "task pool.soft_cleanup exceeded its soft time limit of 0.3 s | flag=True True"
        )
        # the same child goes on: the soft limit killed nothing
        first = app.tasks["pool.pid"].send().result(timeout=30)
        assert app.tasks["pool.soft_cleanup"].send(str(marker)).result(timeout=30) == ("cleaned up")
        assert app.tasks["pool.pid"].send().result(timeout=30) == first


def test_a_task_that_ignores_its_soft_limit_is_killed_at_the_hard_one(
    app: App, pool: Callable[..., Any], tmp_path: Path
) -> None:
    pid_file = tmp_path / "ignored.pid"
    with pool():
        handle = app.tasks["pool.soft_ignored"].send(str(pid_file))
        with pytest.raises(JobFailedError) as info:
            handle.result(timeout=30)
        assert info.value.type == "taskmill.errors.TaskTimeoutError"
        assert info.value.message.startswith(
            "task pool.soft_ignored timed out after 1.5 s (its hard time limit)"
        )
        (child,) = read_pids(pid_file) or [0]  # written when the soft limit was raised
        assert child and not pid_alive(child)


def test_a_soft_limit_raised_out_of_the_task_is_retried_by_its_policy(
    app: App, pool: Callable[..., Any]
) -> None:
    with pool():
        handle = app.tasks["pool.soft_reraised"].send()
        with pytest.raises(JobFailedError) as info:
            handle.result(timeout=30)
    assert info.value.type == "taskmill.errors.SoftTimeLimitExceeded"
    assert info.value.message == "task pool.soft_reraised exceeded its soft time limit of 0.3 s"
    assert "sleeper.wait()" in info.value.traceback  # raised where the task waited
    job = app.get_job(handle.id)
    assert job.attempt == 2  # retries=1: retried once, as any other exception


def test_a_per_send_soft_limit_reaches_the_child(
    app: App, pool: Callable[..., Any], tmp_path: Path
) -> None:
    marker = tmp_path / "cleaned"
    with pool():
        cleanup = app.tasks["pool.soft_cleanup"].options(soft_timeout=0.1, timeout=30)
        assert cleanup.send(str(marker)).result(timeout=30) == "cleaned up"
    assert marker.read_text().startswith(
        "task pool.soft_cleanup exceeded its soft time limit of 0.1 s"
    )


@pytest.mark.timeout(90)
def test_a_child_whose_worker_dies_kills_itself_and_what_it_started(
    app: App, tmp_path: Path
) -> None:
    url = app.url
    workers = Workers(tmp_path, "pool_app:app")
    pid_file = tmp_path / "orphaned.pids"
    try:
        worker = workers.start(url, "--pool", "process", "--concurrency", "1")
        wait_registered(app, worker, workers)
        # no hard limit: only the worker's death may stop it
        app.tasks["pool.spawn_and_hang"].options(timeout=3600).send(str(pid_file))
        child, sleeper = wait_until(lambda: read_pids(pid_file), what="the task's pids", timeout=20)
        worker.kill()  # SIGKILL, the worker alone: nothing of it can clean up
        worker.wait(timeout=30)
        wait_until(
            lambda: not process_running(child) and not process_running(sleeper),
            what=f"child {child} and its sleep {sleeper} to end",
            timeout=20,
        )
    finally:
        workers.close()


def test_max_tasks_per_child_replaces_children(app: App, pool: Callable[..., Any]) -> None:
    pid = app.tasks["pool.pid"]
    with pool(max_tasks_per_child=2):
        pids = [pid.send().result(timeout=30) for _ in range(5)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
    assert len(set(pids)) == 3


def test_a_child_that_exits_fails_the_attempt_and_the_worker_goes_on(
    app: App, pool: Callable[..., Any]
) -> None:
    with pool():
        handle = app.tasks["pool.exit"].send(3)
        with pytest.raises(JobFailedError) as info:
            handle.result(timeout=30)
        assert info.value.type == "taskmill.errors.WorkerLostError"
        assert info.value.message == ("the child process running task pool.exit died (exit code 3)")

        retried = app.tasks["pool.exit_first"].send()
        assert retried.result(timeout=30) == "survived"
        job = app.get_job(retried.id)
        assert job.attempt == 2
        assert job.error is not None and job.error.type == "taskmill.errors.WorkerLostError"

        assert app.tasks["pool.square"].send(9).result(timeout=30) == 81


def test_progress_reported_in_the_child_is_stored(
    app: App, pool: Callable[..., Any], tmp_path: Path
) -> None:
    release = tmp_path / "release"
    with pool():
        handle = app.tasks["pool.progress"].send(str(release))

        def with_progress() -> Job | None:
            job = app.get_job(handle.id)
            return job if job.progress is not None else None

        job = wait_until(with_progress, what="progress from the child", timeout=20)
        assert job.state is JobState.RUNNING
        assert job.progress == 0.5
        assert job.progress_message is not None
        assert job.progress_message.startswith("half done in ")
        assert int(job.progress_message.rsplit(" ", 1)[1]) != os.getpid()
        release.touch()
        assert handle.result(timeout=30) == "released"


def test_a_cancel_reaches_the_task_in_the_child(
    app: App, pool: Callable[..., Any], tmp_path: Path
) -> None:
    marker = tmp_path / "cancelled"
    with pool():
        handle = app.tasks["pool.cooperative"].send(str(marker))
        wait_until(
            lambda: app.get_job(handle.id).progress_message == "started",
            what="the task to start",
            timeout=20,
        )
        assert handle.cancel() is JobState.RUNNING  # asked; the task stops cooperatively
        wait_until(
            lambda: handle.status() is JobState.CANCELLED,
            what="the job to be cancelled",
            timeout=20,
        )
        pid_text, flag = marker.read_text().split()
        assert flag == "cancelled=True"
        assert int(pid_text) != os.getpid()


def test_the_process_pool_needs_an_app_path(app: App) -> None:
    with pytest.raises(ValueError, match=r"pool='process' needs app_path \('module:app'\)"):
        Worker(app, pool="process")


def test_a_child_gets_the_arguments_decoded_to_their_annotations(
    app: App, pool: Callable[..., Any]
) -> None:
    with pool():
        handle = app.tasks["pool.typed"].send(datetime(2024, 5, 1, tzinfo=UTC), {uuid4()})
        assert handle.result(timeout=30) == {
            "received": ["datetime", "set"],
            "current_job": ["datetime", "set"],
        }
