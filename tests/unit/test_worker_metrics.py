"""The worker's counts (``taskmill.worker.metrics``) in-process on the memory broker: what a
worker counts, how a supervisor's directory joins processes' counts (a retired process is kept
once), the outbox telling of refused outcomes, and that counting needs no prometheus-client."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from taskmill import App, current_job
from taskmill.brokers.memory import MemoryBroker
from taskmill.context import JobContext
from taskmill.job import Claim, Job, JobState, Succeeded
from taskmill.worker import Worker
from taskmill.worker.execution import JobRun
from taskmill.worker.metrics import (
    FileSink,
    JobMetrics,
    LatestTotals,
    MetricsDir,
    Totals,
    WorkerMetrics,
    dump_totals,
    load_totals,
    registry_of,
)
from taskmill.worker.outbox import Outbox

FINISHED = "taskmill_worker_jobs_finished"
STARTED = "taskmill_worker_jobs_started"
ENQUEUED = "taskmill_worker_jobs_enqueued"


def run_counted(app: App) -> Totals:
    latest = LatestTotals()
    metrics = WorkerMetrics(JobMetrics(), latest)
    worker = Worker(app, queues=app.queues(), register=False, metrics=metrics)
    app.client.run_sync(worker.run(until_idle=True))
    assert app.client.enqueue_observers == []  # the worker took its observer away
    return latest.latest  # published when the worker stopped


def test_a_worker_counts_starts_outcomes_enqueues_and_times() -> None:
    app = App("memory://")

    @app.task(name="ok")
    def ok(n: int) -> int:
        return n

    @app.task(name="bad", retries=0, queue="slow")
    def bad() -> None:
        raise ValueError("no")

    @app.task(name="flaky", retries=1)
    def flaky() -> None:
        if current_job().attempt == 1:
            raise RuntimeError("once: retried later, after the worker stopped")

    @app.task(name="fanout")
    def fanout(k: int) -> None:
        ok.send_many([(i,) for i in range(k)])

    for n in range(3):
        ok.send(n)
    bad.send()
    flaky.send()
    fanout.send(4)  # sent by the producer: not counted as enqueued; its 4 sends are
    totals = run_counted(app)
    app.close()
    c = totals.counters
    assert c[(STARTED, ("default", "ok"))] == 7
    assert c[(STARTED, ("default", "flaky"))] == 1
    assert c[(FINISHED, ("default", "ok", "succeeded"))] == 7
    assert c[(FINISHED, ("slow", "bad", "failed"))] == 1
    assert c[(FINISHED, ("default", "flaky", "retried"))] == 1
    assert c[(ENQUEUED, ("default", "ok"))] == 4
    assert {k for k in c if k[0] == ENQUEUED} == {(ENQUEUED, ("default", "ok"))}
    run = totals.histograms[("taskmill_worker_job_run_seconds", ("default", "ok"))]
    assert sum(run[:-1]) == 7 and run[-1] >= 0
    wait = totals.histograms[("taskmill_worker_job_queue_wait_seconds", ("default", "flaky"))]
    assert sum(wait[:-1]) == 1


def test_a_supervisors_directory_keeps_a_retired_process_once(tmp_path: Path) -> None:
    tmp_path = tmp_path / "counts"
    tmp_path.mkdir()
    directory = MetricsDir(tmp_path)
    one, two = JobMetrics(), JobMetrics()
    app = App("memory://")

    @app.task(name="t")
    def t() -> None: ...

    job = app.client.run_sync(app.broker.get(t.send().id))
    assert job is not None
    for metrics, pid, n in ((one, 101, 2), (two, 102, 3)):
        for _ in range(n):
            metrics.started(job)
        FileSink(tmp_path, pid).publish(metrics.totals())
    app.close()
    key = (STARTED, ("default", "t"))
    assert directory.totals().counters[key] == 5
    directory.retire(101)  # the process exited: its counts stay, its file goes
    assert not (tmp_path / "101.json").exists()
    assert directory.totals().counters[key] == 5
    FileSink(tmp_path, 103).publish(JobMetrics().totals())  # its replacement, from zero
    assert directory.totals().counters[key] == 5
    directory.retire(103)
    directory.retire(999)  # no file: nothing to keep
    assert directory.totals().counters[key] == 5
    directory.close()
    assert not tmp_path.exists()


def test_totals_survive_json_and_are_exposed_cumulatively() -> None:
    metrics = JobMetrics()
    app = App("memory://")

    @app.task(name="t")
    def t() -> None: ...

    job = app.client.run_sync(app.broker.get(t.send().id))
    app.close()
    assert job is not None
    for run_s in (0.0005, 0.003, 0.003, 7200.0):
        metrics.finished(job, Succeeded(b"null"), run_s, lost=False)
    totals = load_totals(dump_totals(metrics.totals()))
    assert totals == metrics.totals()
    text = generate_latest(registry_of(lambda: totals)).decode()
    samples = {
        (s.name, s.labels.get("le")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    run = "taskmill_worker_job_run_seconds"
    assert samples[(f"{run}_bucket", "0.001")] == 1
    assert samples[(f"{run}_bucket", "0.005")] == 3
    assert samples[(f"{run}_bucket", "3600.0")] == 3
    assert samples[(f"{run}_bucket", "+Inf")] == 4
    assert samples[(f"{run}_count", None)] == 4
    assert abs(samples[(f"{run}_sum", None)] - 7200.0065) < 1e-6


def test_counting_does_not_import_prometheus_client() -> None:
    code = (
        "import sys, taskmill.worker.process, taskmill.cli.worker;"
        "assert 'prometheus_client' not in sys.modules, 'imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_the_outbox_tells_of_outcomes_the_broker_refused() -> None:
    refused: list[int] = []
    outbox = Outbox(
        MemoryBroker(),
        worker_id="w",
        wake=lambda: None,
        later=lambda delay, fn: None,
        rejected=refused.append,
    )
    runs = []
    for job_id in ("a", "b", "c"):
        job = Job(job_id, "t", "default", JobState.RUNNING, b"[]", lease_token="x")
        ctx = JobContext(job_id, "t", "default", 1, 1, lambda *report: None)
        runs.append(JobRun(job, Claim(job_id, "x"), ctx, None, True))
    for run in runs:
        outbox.add(run, Succeeded(b"null"))
    outbox.landed(outbox.take(), [False, True, False])  # two leases were stale
    outbox.add(runs[0], Succeeded(b"null"))
    outbox.landed(outbox.take(), [True])
    assert refused == [2]
