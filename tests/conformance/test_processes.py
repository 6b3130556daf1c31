"""Workers and producers in other processes: SIGKILL recovery, SIGTERM drain, exactly-once
execution without failures. Skipped for brokers that live inside one process."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskmill import App, JobState
from taskmill.testing import running_worker
from taskmill.workflows import chain, group, step_job_id

from .apps import build_app, create_executions_table, executions
from .conftest import LEASE_SETTINGS
from .helpers import (
    PACKAGE,
    Process,
    opened,
    processes,
    producer_args,
    subprocess_env,
    wait_until,
    worker_args,
)

pytestmark = pytest.mark.multiprocess

SETTINGS: dict[str, Any] = dict(LEASE_SETTINGS)


@pytest.fixture
def app(broker_url: str) -> Iterator[App]:
    """The same app (tasks of ``apps.py``) that the subprocesses load."""
    app = build_app(broker_url, **SETTINGS)
    yield app
    app.close()


@pytest.fixture
def env(broker_url: str) -> dict[str, str]:
    return subprocess_env(broker_url, SETTINGS)


def _wait_registered(app: App, proc: Process) -> None:
    broker = opened(app)

    def registered() -> bool:
        assert proc.popen.poll() is None, f"worker exited early:\n{proc.output()}"
        return any(w.pid == proc.pid for w in app.run_sync(broker.list_workers()))

    wait_until(registered, timeout=20, what=f"worker process {proc.pid} to register")


def _started_in(marker: Path) -> tuple[int, int]:
    """(pid, attempt) written by the task when it started."""
    wait_until(marker.exists, timeout=20, what=f"the task to start ({marker.name})")
    text = wait_until(marker.read_text, timeout=5, what="the marker to be written")
    pid, attempt = text.split()
    return int(pid), int(attempt)


@pytest.mark.timeout(90)
def test_sigkill_mid_job_the_job_comes_back_and_completes(
    app: App, env: dict[str, str], tmp_path: Path
) -> None:
    marker = tmp_path / "started"
    with processes() as start:
        doomed = start(worker_args(concurrency=2), env, tmp_path / "doomed.log")
        _wait_registered(app, doomed)
        handle = app.tasks["conformance.hang_first_attempt"].send(str(marker))
        assert _started_in(marker) == (doomed.pid, 1)
        running = app.get_job(handle.id)
        assert running.state is JobState.RUNNING and running.attempt == 1

        doomed.signal(signal.SIGKILL)
        assert doomed.wait(10) == -signal.SIGKILL

        rescuer = start(worker_args(concurrency=2), env, tmp_path / "rescuer.log")
        try:
            assert handle.result(timeout=30) == 2
        except BaseException:
            print(doomed.output(), rescuer.output())
            raise
    job = app.get_job(handle.id)
    assert job.state is JobState.SUCCEEDED
    assert job.attempt == 2 and job.lost_leases == 1


@pytest.mark.timeout(90)
def test_sigkill_mid_workflow_the_workflow_completes_as_it_would_have(
    app: App, env: dict[str, str], tmp_path: Path
) -> None:
    """A chord whose member's worker is killed mid-run: the member is recovered and run
    again by another worker process, and the rest of the workflow runs once."""
    marker = tmp_path / "started"
    hang, double = app.tasks["conformance.hang_first_attempt"], app.tasks["conformance.double"]
    flow = chain(group([hang.s(str(marker)), double.s(5)]), app.tasks["conformance.echo_list"].s())
    with processes() as start:
        doomed = start(worker_args(concurrency=2), env, tmp_path / "doomed.log")
        _wait_registered(app, doomed)
        handle = flow.send()
        assert _started_in(marker) == (doomed.pid, 1)
        doomed.signal(signal.SIGKILL)
        assert doomed.wait(10) == -signal.SIGKILL
        rescuer = start(worker_args(concurrency=2), env, tmp_path / "rescuer.log")
        try:
            assert handle.result(timeout=30) == [[2, 10]]
        except BaseException:
            print(doomed.output(), rescuer.output())
            raise
    steps = handle.steps()
    assert set(steps.values()) == {JobState.SUCCEEDED}
    assert app.get_job(step_job_id(handle.id, "0")).attempt == 2
    callback = app.get_job(step_job_id(handle.id, "2"))
    # it ran once: any other attempt was a lease lost to the killed worker (on Redis a job can
    # be handed to it while its idle registration lasts) and came back unrun
    assert callback.attempt - callback.lost_leases == 1


HAND_BACK_SETTINGS: dict[str, Any] = {"lease_s": 3.0, "heartbeat_s": 0.5, "recover_interval_s": 0.2}
"""A lease long enough for the supervisor's next process to start and hand jobs back first,
on a loaded machine (a start takes 0.3-1 s)."""


@pytest.mark.timeout(120)
def test_jobs_a_dead_process_held_and_had_not_begun_are_handed_back_unharmed(
    broker_url: str, tmp_path: Path
) -> None:
    """A job that ends its worker process is claimed in one batch with three that had not
    begun (async: they would run after it on the loop). The supervisor's next process hands
    those three back before their leases run out: they run with no lost lease, while the job
    that killed the process counts one per death and is quarantined at the third. Before,
    the three were charged with it each time and quarantined beside it."""
    app = build_app(broker_url, **HAND_BACK_SETTINGS)
    try:
        crash = app.tasks["conformance.exit_process"].options(priority=10).send()
        goods = [app.tasks["conformance.async_double"].send(n) for n in range(3)]
        env = subprocess_env(broker_url, HAND_BACK_SETTINGS)
        args = ["-m", "taskmill", "worker", f"{PACKAGE}.apps:app", "--pool-spec", "default:1:4"]
        with processes() as start:
            supervisor = start(args, env, tmp_path / "supervisor.log")
            try:
                assert [h.result(timeout=60) for h in goods] == [0, 2, 4]
                wait_until(
                    lambda: crash.status() is JobState.FAILED,
                    timeout=60,
                    what="the job that kills its process to be quarantined",
                )
            finally:
                print(supervisor.output())
            supervisor.signal(signal.SIGTERM)
            assert supervisor.wait(30) == 0
        for handle in goods:
            job = app.get_job(handle.id)
            assert (job.state, job.attempt, job.lost_leases) == (JobState.SUCCEEDED, 1, 0)
        dead = app.get_job(crash.id)
        assert dead.lost_leases == app.settings.max_lost_leases
        assert dead.error is not None and dead.error.type == "taskmill.errors.WorkerLostError"
        assert "handed back 3 job(s)" in supervisor.output()
    finally:
        app.close()


@pytest.mark.timeout(60)
def test_sigterm_drains_a_running_job_and_exits_zero(
    app: App, env: dict[str, str], tmp_path: Path
) -> None:
    marker = tmp_path / "started"
    with processes() as start:
        worker = start(worker_args(drain_timeout_s=20), env, tmp_path / "worker.log")
        _wait_registered(app, worker)
        # longer than the lease: heartbeats must go on while draining
        handle = app.tasks["conformance.slow"].send(str(marker), 2.5)
        assert _started_in(marker) == (worker.pid, 1)
        lease_at_sigterm = app.get_job(handle.id).lease_expires_at
        assert lease_at_sigterm is not None
        worker.signal(signal.SIGTERM)
        wait_until(
            lambda: (app.get_job(handle.id).lease_expires_at or 0) > lease_at_sigterm + 0.3,
            timeout=10,
            what="the lease to be renewed while draining",
        )
        new = app.tasks["conformance.slow"].send(str(tmp_path / "never"), 0)
        assert worker.wait(20) == 0, worker.output()
    job = app.get_job(handle.id)
    assert job.state is JobState.SUCCEEDED, worker.output()
    assert job.attempt == 1 and job.lost_leases == 0
    assert handle.result(timeout=1) == "done"
    assert new.status() is JobState.QUEUED, "a draining worker claims nothing new"
    assert not (tmp_path / "never").exists()
    assert worker.pid not in {w.pid for w in app.run_sync(opened(app).list_workers())}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("task", ["conformance.async_forever", "conformance.until_cancelled"])
def test_sigterm_hands_back_a_job_longer_than_the_drain_timeout(
    app: App, env: dict[str, str], tmp_path: Path, task: str
) -> None:
    marker = tmp_path / "started"
    with processes() as start:
        worker = start(worker_args(drain_timeout_s=0.5), env, tmp_path / "worker.log")
        _wait_registered(app, worker)
        handle = app.tasks[task].send(str(marker))
        assert _started_in(marker) == (worker.pid, 1)
        assert app.get_job(handle.id).attempt == 1
        worker.signal(signal.SIGTERM)
        assert worker.wait(20) == 0, worker.output()
    job = app.get_job(handle.id)
    assert job.state is JobState.QUEUED, worker.output()
    assert job.attempt == 0, "a job handed back at shutdown spends no attempt"
    assert job.lost_leases == 0
    assert job.lease_token is None and job.worker_id is None
    assert "handing it back" in worker.output()


@pytest.mark.timeout(60)
def test_second_sigterm_stops_at_once(app: App, env: dict[str, str], tmp_path: Path) -> None:
    marker = tmp_path / "started"
    with processes() as start:
        worker = start(worker_args(drain_timeout_s=60), env, tmp_path / "worker.log")
        _wait_registered(app, worker)
        handle = app.tasks["conformance.async_forever"].send(str(marker))
        _started_in(marker)
        worker.signal(signal.SIGTERM)
        wait_until(lambda: "draining" in worker.output(), what="the worker to start draining")
        worker.signal(signal.SIGTERM)
        assert worker.wait(15) == 0, worker.output()
    job = app.get_job(handle.id)
    assert job.state is JobState.QUEUED and job.attempt == 0


@pytest.mark.timeout(120)
def test_two_workers_several_producers_each_job_runs_exactly_once(
    app: App, env: dict[str, str], tmp_path: Path
) -> None:
    db = tmp_path / "executions.db"
    create_executions_table(db)
    producers, per_producer = 3, 100
    total = producers * per_producer
    with processes() as start:
        workers = [
            start(worker_args(concurrency=4), env, tmp_path / f"worker-{i}.log") for i in range(2)
        ]
        for w in workers:
            _wait_registered(app, w)
        senders = [
            start(producer_args(db, per_producer, tmp_path / f"ids-{i}"), env, tmp_path / f"p{i}")
            for i in range(producers)
        ]
        # and one in-process worker on the same file, for a third kind of competitor
        with running_worker(app, concurrency=2):
            for p in senders:
                assert p.wait(60) == 0, p.output()
            broker = opened(app)

            def all_done() -> bool:
                counts: Counter[str] = Counter()
                for s in app.run_sync(broker.stats()):
                    counts.update(s.counts)
                assert counts["failed"] == 0 and counts["cancelled"] == 0
                return counts["succeeded"] == total

            wait_until(all_done, timeout=60, interval=0.1, what=f"{total} jobs to succeed")
        for w in workers:
            w.signal(signal.SIGTERM)
        for w in workers:
            assert w.wait(20) == 0, w.output()

    sent = [line for i in range(producers) for line in (tmp_path / f"ids-{i}").read_text().split()]
    assert len(sent) == len(set(sent)) == total
    runs = executions(db)
    per_job = Counter(job_id for job_id, _, _ in runs)
    assert set(per_job) == set(sent)
    assert max(per_job.values()) == 1, [j for j, n in per_job.items() if n > 1]
    assert len(runs) == total
    ran_in = Counter(pid for _, _, pid in runs)
    assert all(ran_in[w.pid] > 0 for w in workers), f"work was not shared: {ran_in}"
    jobs = app.run_sync(opened(app).list_jobs(state=JobState.SUCCEEDED, limit=total + 10))
    assert len(jobs) == total and all(j.attempt == 1 for j in jobs)


@pytest.mark.timeout(60)
def test_sigterm_exits_within_the_drain_timeout_despite_an_uncooperative_sync_job(
    app: App, env: dict[str, str], tmp_path: Path
) -> None:
    marker = tmp_path / "started"
    with processes() as start:
        worker = start(worker_args(drain_timeout_s=0.3), env, tmp_path / "worker.log")
        _wait_registered(app, worker)
        handle = app.tasks["conformance.slow"].send(str(marker), 4.0)
        _started_in(marker)
        worker.signal(signal.SIGTERM)
        wait_until(
            lambda: app.get_job(handle.id).state is JobState.QUEUED,
            what="the job to be handed back",
        )
        assert app.get_job(handle.id).attempt == 0
        assert worker.wait(2.0) == 0
