"""What the CLI and dashboard need: pause/resume, purge, stats, list_jobs, pruning, workers."""

from __future__ import annotations

import os
import threading
import time

import pytest

from taskmill import App, JobFailedError, JobNotFoundError, JobState
from taskmill.testing import running_worker

from .conftest import AppFactory
from .helpers import opened, wait_until


def _counts(app: App) -> dict[str, dict[str, int]]:
    return {s.queue: s.counts for s in app.run_sync(opened(app).stats())}


def test_pause_and_resume_a_queue(app: App) -> None:
    @app.task()
    def work(label: str) -> str:
        return label

    broker = opened(app)
    app.run_sync(broker.pause("slow", True))
    stats = {s.queue: s for s in app.run_sync(broker.stats())}
    assert stats["slow"].paused is True
    assert app.run_sync(broker.claim(["slow"], 5, "w", 5.0)) == []

    with running_worker(app, queues=["slow", "fast"], concurrency=2):
        held = work.options(queue="slow").send("held")
        # the worker is claiming: a job on the other queue runs meanwhile
        assert work.options(queue="fast").send("fast").result(timeout=10) == "fast"
        assert held.status() is JobState.QUEUED
        app.run_sync(broker.pause("slow", False))
        assert held.result(timeout=10) == "held"
    stats = {s.queue: s for s in app.run_sync(broker.stats())}
    assert stats["slow"].paused is False


def test_purge_deletes_waiting_jobs_of_one_queue_only(app: App) -> None:
    started = threading.Event()
    release = threading.Event()

    @app.task()
    def work(n: int) -> int:
        if n == -1:
            started.set()
            assert release.wait(20)
        return n

    broker = opened(app)
    with running_worker(app, queues=["bulk"], concurrency=1):
        done = work.options(queue="bulk").send(0)
        assert done.result(timeout=10) == 0
        running = work.options(queue="bulk").send(-1)
        assert started.wait(10)
        # the only slot is busy: these wait
        waiting = work.options(queue="bulk").send_many([(1,), (2,), (3,)])
        scheduled = work.options(queue="bulk", delay=60).send(4)
        other = work.options(queue="keep").send(5)
        assert app.run_sync(broker.purge("bulk")) == 4
        for h in [*waiting, scheduled]:
            with pytest.raises(JobNotFoundError):
                h.status()
        assert done.status() is JobState.SUCCEEDED
        assert running.status() is JobState.RUNNING
        assert other.status() is JobState.QUEUED
        release.set()
        assert running.result(timeout=10) == -1
    assert app.run_sync(broker.purge("bulk")) == 0


def test_purge_frees_unique_keys(app: App) -> None:
    @app.task()
    def work() -> None:
        return None

    first = work.options(key="k").send()
    assert app.run_sync(opened(app).purge("default")) == 1
    second = work.options(key="k").send()
    assert not second.existing and second.id != first.id


def test_stats_counts_per_queue_and_state(app: App) -> None:
    @app.task(retries=0)
    def work(fail: bool) -> None:
        if fail:
            raise RuntimeError("no")

    broker = opened(app)
    with running_worker(app, queues=["a"]):
        work.options(queue="a").send(False).result(timeout=10)
        with pytest.raises(JobFailedError):
            work.options(queue="a").send(True).result(timeout=10)
    work.options(queue="a").send_many([(False,), (False,)])
    work.options(queue="a", delay=60).send(False)
    work.options(queue="a").send(False).cancel()
    work.options(queue="b").send(False)

    before = time.time()
    stats = {s.queue: s for s in app.run_sync(broker.stats())}
    assert stats["a"].counts == {
        "scheduled": 1,
        "queued": 2,
        "running": 0,
        "succeeded": 1,
        "failed": 1,
        "cancelled": 1,
    }
    assert stats["b"].counts["queued"] == 1
    assert sum(stats["b"].counts.values()) == 1
    oldest = stats["a"].oldest_waiting_s
    assert oldest is not None and 0 <= oldest < time.time() - before + 60
    assert stats["a"].paused is False

    claim = app.run_sync(broker.claim(["b"], 1, "w", 5.0))
    assert len(claim) == 1
    stats = {s.queue: s for s in app.run_sync(broker.stats())}
    assert stats["b"].counts["running"] == 1 and stats["b"].counts["queued"] == 0


def test_list_jobs_filters_and_order(app: App) -> None:
    @app.task()
    def alpha(n: int) -> int:
        return n

    @app.task()
    def beta(n: int) -> int:
        return n

    broker = opened(app)
    a = [alpha.send(n) for n in range(3)]
    b = beta.options(queue="other").send(9)
    later = alpha.options(delay=60).send(4)

    def ids(**filters: object) -> list[str]:
        return [j.id for j in app.run_sync(broker.list_jobs(**filters))]  # type: ignore[arg-type]

    assert ids() == [later.id, b.id, a[2].id, a[1].id, a[0].id], "newest first"
    assert ids(limit=2) == [later.id, b.id]
    assert ids(task=alpha.name) == [later.id, a[2].id, a[1].id, a[0].id]
    assert ids(queue="other") == [b.id]
    assert ids(state=JobState.SCHEDULED) == [later.id]
    assert ids(state=JobState.QUEUED, task=alpha.name, queue="default") == [
        a[2].id,
        a[1].id,
        a[0].id,
    ]
    assert ids(state=JobState.FAILED) == []
    assert ids(task="nope") == []
    job = app.run_sync(broker.list_jobs(queue="other"))[0]
    assert job.task == beta.name and job.payload


def test_prune_deletes_only_old_finished_jobs(app: App) -> None:
    @app.task(retries=0)
    def work(fail: bool) -> None:
        if fail:
            raise RuntimeError("no")

    broker = opened(app)
    with running_worker(app):
        done = [work.send(False) for _ in range(3)]
        for h in done:
            h.result(timeout=10)
        failed = work.send(True)
        with pytest.raises(JobFailedError):
            failed.result(timeout=10)
    cancelled = work.options(delay=60).send(False)
    cancelled.cancel()
    pending = work.send(False)
    scheduled = work.options(delay=60).send(False)

    finished_before = min(app.get_job(h.id).finished_at or 0 for h in done)
    assert app.run_sync(broker.prune(finished_before - 1)) == 0
    cutoff = app.run_sync(broker.now()) + 1
    assert app.run_sync(broker.prune(cutoff, limit=2)) == 2
    assert app.run_sync(broker.prune(cutoff)) == 3
    for h in [*done, failed, cancelled]:
        with pytest.raises(JobNotFoundError):
            app.get_job(h.id)
    assert pending.status() is JobState.QUEUED
    assert scheduled.status() is JobState.SCHEDULED


@pytest.mark.timeout(30)
def test_workers_prune_by_result_ttl(app_factory: AppFactory) -> None:
    app = app_factory(result_ttl_s=0.5, prune_interval_s=0.2)

    @app.task()
    def work() -> int:
        return 1

    with running_worker(app):
        handle = work.send()
        assert handle.result(timeout=10) == 1
        keep = work.options(delay=60).send()

        def gone() -> bool:
            try:
                app.get_job(handle.id)
            except JobNotFoundError:
                return True
            return False

        wait_until(gone, timeout=15, what="the worker to prune the finished job")
    assert keep.status() is JobState.SCHEDULED


def test_running_worker_is_registered_then_removed(app: App) -> None:
    started = threading.Event()
    release = threading.Event()

    @app.task()
    def hold() -> None:
        started.set()
        assert release.wait(20)

    broker = opened(app)
    with running_worker(app, queues=["default", "extra"], concurrency=3) as worker:
        info = wait_until(
            lambda: next(
                (w for w in app.run_sync(broker.list_workers()) if w.id == worker.id), None
            ),
            what="the worker to register",
        )
        assert info.pid == os.getpid()
        assert info.host
        assert sorted(info.queues) == ["default", "extra"]
        assert info.concurrency == 3
        assert info.started_at <= time.time() and info.heartbeat_at >= info.started_at
        handle = hold.send()
        assert started.wait(10)
        wait_until(
            lambda: any(
                handle.id in w.running
                for w in app.run_sync(broker.list_workers())
                if w.id == worker.id
            ),
            what="the worker's running jobs to show the job",
        )
        beat = info.heartbeat_at
        wait_until(
            lambda: any(
                w.heartbeat_at > beat
                for w in app.run_sync(broker.list_workers())
                if w.id == worker.id
            ),
            what="a later heartbeat",
        )
        release.set()
        handle.result(timeout=10)
    assert worker.id not in {w.id for w in app.run_sync(broker.list_workers())}


def test_list_jobs_takes_a_state_or_its_name_alike(app: App) -> None:
    """Bug 7: every broker takes ``JobState.SUCCEEDED`` or ``"succeeded"``, and names the
    valid states when given another."""

    @app.task()
    def work(n: int) -> int:
        return n

    broker = opened(app)
    with running_worker(app):
        done = work.send(1)
        assert done.result(timeout=10) == 1
    waiting = work.options(queue="unserved").send(2)

    for name, member in [("succeeded", JobState.SUCCEEDED), ("queued", JobState.QUEUED)]:
        by_name = app.run_sync(broker.list_jobs(state=name))
        by_member = app.run_sync(broker.list_jobs(state=member))
        assert [j.id for j in by_name] == [j.id for j in by_member]
    assert [j.id for j in app.run_sync(broker.list_jobs(state=JobState.SUCCEEDED))] == [done.id]
    assert [j.id for j in app.run_sync(broker.list_jobs(state=JobState.QUEUED))] == [waiting.id]
    with pytest.raises(ValueError, match=r"'done'.*scheduled, queued, running, succeeded"):
        app.run_sync(broker.list_jobs(state="done"))
