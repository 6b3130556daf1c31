"""What recording one job's metrics costs a worker's hot path, three ways, in µs per job.

    python -m bench.metrics_cost [--jobs 200000]

Per job a worker records a start (a counter and the queue-wait histogram) and an outcome (a
counter and the run-time histogram), by queue and task:

- taskmill: ``taskmill.worker.metrics.JobMetrics`` (plain dicts, published once a second);
- prometheus-client, one process: ``Counter``/``Histogram`` with ``labels(...)``;
- prometheus-client, multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``): the same calls, each
  value written to a memory-mapped file; run in a child process, since the mode is chosen
  when ``prometheus_client`` is imported.

Each is timed on the same sequence of jobs (4 tasks, 2 queues, 5 % failures), best of 5.

Then the whole worker: an in-process ``Worker`` drains ``--drain-jobs`` async no-op jobs
(``run(until_idle=True)``, on SQLite and on the memory broker), ``--rounds`` times with and
without metrics, alternating; the CPU time of this process per job, medians. One process on
one loop: steadier on a busy machine than ``bench.throughput --mode metrics``, whose worker
processes share the cores with everything else. On the memory broker a job costs least, so its
ratio is the upper bound of what the metrics add.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from taskmill.job import ErrorInfo, Failed, Job, JobState, Outcome, Succeeded

TASKS = [("default", "app.a"), ("default", "app.b"), ("mail", "app.c"), ("mail", "app.d")]


def jobs_and_outcomes(n: int) -> list[tuple[Job, Outcome, float]]:
    ok: Outcome = Succeeded(b"null")
    bad: Outcome = Failed(ErrorInfo("ValueError", "no"))
    out = []
    for i in range(n):
        queue, task = TASKS[i % len(TASKS)]
        job = Job(str(i), task, queue, JobState.RUNNING, b"[]", run_at=100.0, started_at=100.01)
        out.append((job, bad if i % 20 == 0 else ok, 0.0004 + (i % 7) * 0.001))
    return out


def best_us(fn: Callable[[], None], n: int) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def taskmill_cost(work: list[tuple[Job, Outcome, float]]) -> float:
    from taskmill.worker.metrics import JobMetrics

    m = JobMetrics()

    def run() -> None:
        for job, outcome, run_s in work:
            m.started(job)
            m.finished(job, outcome, run_s, lost=False)

    return best_us(run, len(work))


def prometheus_cost(work: list[tuple[Job, Outcome, float]]) -> float:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from taskmill.worker.metrics import BUCKETS_S, OUTCOMES

    registry = CollectorRegistry()
    started = Counter("started", "", ["queue", "task"], registry=registry)
    finished = Counter("finished", "", ["queue", "task", "outcome"], registry=registry)
    run_h = Histogram("run", "", ["queue", "task"], buckets=BUCKETS_S, registry=registry)
    wait_h = Histogram("wait", "", ["queue", "task"], buckets=BUCKETS_S, registry=registry)

    def run() -> None:
        for job, outcome, run_s in work:
            started.labels(job.queue, job.task).inc()
            assert job.started_at is not None
            wait_h.labels(job.queue, job.task).observe(job.started_at - job.run_at)
            finished.labels(job.queue, job.task, OUTCOMES[type(outcome)]).inc()
            run_h.labels(job.queue, job.task).observe(run_s)

    return best_us(run, len(work))


def drain_cpu_us(url: str, jobs: int, metrics: bool) -> float:
    """CPU µs per job of one in-process drain of ``jobs`` async no-op jobs."""
    import asyncio

    from taskmill import App
    from taskmill.worker import Worker
    from taskmill.worker.metrics import JobMetrics, LatestTotals, WorkerMetrics

    app = App(url)
    task = app.task(name="anoop", retries=0)(_anoop)
    for start in range(0, jobs, 5000):
        task.send_many([()] * min(5000, jobs - start))
    counts = WorkerMetrics(JobMetrics(), LatestTotals()) if metrics else None
    worker = Worker(app, concurrency=16, register=False, metrics=counts)
    t0 = time.process_time()
    done = asyncio.run(worker.run(until_idle=True))
    cpu = time.process_time() - t0
    app.close()
    assert done == jobs, done
    return cpu / jobs * 1e6


async def _anoop() -> None:
    return None


def drain_rows(tmp: str, jobs: int, rounds: int) -> list[tuple[str, str]]:
    rows = []
    for broker in ("sqlite", "memory"):
        cpu: dict[bool, list[float]] = {False: [], True: []}
        for r in range(rounds):
            for on in (False, True):
                url = f"sqlite:///{tmp}/drain-{r}-{on}.db" if broker == "sqlite" else "memory://"
                cpu[on].append(drain_cpu_us(url, jobs, on))
        off, on = statistics.median(cpu[False]), statistics.median(cpu[True])
        pairs = [b / a for a, b in zip(cpu[False], cpu[True], strict=True)]
        rows.append((f"in-process drain on {broker}, CPU µs/job, no metrics", f"{off:.2f}"))
        rows.append((f"in-process drain on {broker}, CPU µs/job, metrics", f"{on:.2f}"))
        rows.append(
            ("  median of the rounds' ratios (with / without)", f"{statistics.median(pairs):.3f}")
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--drain-jobs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", choices=["taskmill", "prometheus"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = jobs_and_outcomes(args.jobs)
    if args.only == "prometheus":  # the child of the multiprocess measure
        print(prometheus_cost(work))
        return
    rows = [
        ("taskmill JobMetrics (plain dicts)", taskmill_cost(work)),
        ("prometheus-client, one process", prometheus_cost(work)),
    ]
    with tempfile.TemporaryDirectory(prefix="taskmill-prom-") as tmp:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": tmp}
        out = subprocess.run(
            [sys.executable, "-m", "bench.metrics_cost", "--jobs", str(args.jobs), "--only",
             "prometheus"],
            env=env, check=True, capture_output=True, text=True,
        )  # fmt: skip
        rows.append(("prometheus-client, multiprocess mode (mmap)", float(out.stdout)))
        drains = drain_rows(tmp, args.drain_jobs, args.rounds)
    print(f"\nrecording one job's start and outcome, µs per job ({args.jobs:,} jobs, best of 5)")
    for name, us in rows:
        print(f"  {name:<50} {us:8.2f}")
    print(f"\nthe worker's CPU per job, {args.drain_jobs:,} jobs, medians of {args.rounds} rounds")
    for name, value in drains:
        print(f"  {name:<50} {value:>8}")


if __name__ == "__main__":
    main()
