"""Throughput and latency of taskmill on one broker (default: a fresh SQLite file).

    python -m bench.throughput                 # every mode, 20,000 jobs, 2 worker processes
    python -m bench.throughput --mode drain --jobs 50000 --task anoop
    python -m bench.throughput --mode drain --task add   # annotated (a: int, b: int) -> int
    python -m bench.throughput --mode drain --task fail  # raises: each job fails, no retry
    python -m bench.throughput --mode drain --task text --jobs 2000  # a 100 KB str argument

Modes:
- enqueue: bulk ``send_many`` in batches of 1,000, and a plain ``send()`` loop (the no-op task
  unless ``--task add``);
- drain: N no-op jobs (or ``add(1, 2)`` with ``--task add``, jobs that raise with
  ``--task fail``, or ``text(s)`` with ``--task text``, ``s`` of ``--text-bytes``)
  enqueued first, then 2 worker processes (``taskmill worker -p 2``) run them; jobs/s
  from the first start to the last finish, read back from the stored timestamps, and the
  workers' CPU µs per job;
- metrics: the drain ``--rounds`` times each without and with ``--metrics-port`` (the
  worker-side Prometheus metrics), alternating, and the ratio of their medians;
- latency: jobs sent at a steady rate (default 200/s) to idle workers; enqueue→start latency
  percentiles from the stored ``enqueued_at`` and ``started_at`` (one machine, one clock).

Prints a table; the figures go to docs/benchmarks.md. Timings are wall clock on a noisy
machine: compare ratios taken in the same run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench._harness import group_cpu_s
from taskmill.testing import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


@contextmanager
def workers(
    url: str,
    processes: int,
    concurrency: int,
    pool: str,
    log_level: str = "warning",
    extra: tuple[str, ...] = (),
) -> Iterator[subprocess.Popen[bytes]]:
    # this tree's taskmill, whichever the virtualenv installed: a run from a worktree of an
    # older commit measures that commit
    env = {**os.environ, "TASKMILL_URL": url, "PYTHONPATH": f"{ROOT}/src{os.pathsep}{ROOT}"}
    cmd = [
        sys.executable, "-m", "taskmill", "worker", "bench.noop_app:app",
        "-p", str(processes), "-c", str(concurrency), "--pool", pool, "--log-level", log_level,
        *extra,
    ]  # fmt: skip
    # the logs go to a file beside the database, as a real worker's go to a file or a pipe
    log_file = open(url.removeprefix("sqlite:///") + ".log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, start_new_session=True, stdout=log_file, stderr=log_file
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log_file.close()


def db_path(url: str) -> str:
    return url.removeprefix("sqlite:///")


def count_finished(path: str) -> int:
    with sqlite3.connect(path) as conn:
        (n,) = conn.execute(
            "SELECT count(*) FROM taskmill_jobs WHERE state IN ('succeeded','failed')"
        ).fetchone()
    return int(n)


def fresh_url(tmp: str, name: str) -> str:
    path = os.path.join(tmp, f"{name}.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    return f"sqlite:///{path}"


TEXT_BYTES = 100_000
"""``--task text``: the length of each job's argument (``--text-bytes``)."""


def producer_task(
    app: Any, task_name: str, text_bytes: int = TEXT_BYTES
) -> tuple[Any, tuple[Any, ...]]:
    """The task as the producer registers it, and the arguments each job gets: the producer
    of ``add`` has its annotations, so what checking them at send costs is measured."""
    if task_name == "text":
        return app.task(name="text", retries=0)(lambda text: None), ("x" * text_bytes,)
    if task_name == "add":

        def add(a: int, b: int) -> int:
            return a + b

        return app.task(name="add", retries=0)(add), (1, 2)
    return app.task(name=task_name, retries=0)(lambda: None), ()


def run_enqueue(tmp: str, jobs: int, task_name: str) -> dict[str, float]:
    from taskmill import App

    url = fresh_url(tmp, "enqueue")
    app = App(url)
    task, call = producer_task(app, task_name)
    task.send(*call)  # open the broker and create the schema outside the timed part
    t0 = time.perf_counter()
    for start in range(0, jobs, 1000):
        task.send_many([call] * min(1000, jobs - start))
    bulk = jobs / (time.perf_counter() - t0)
    loop_jobs = max(1000, jobs // 4)
    t0 = time.perf_counter()
    for _ in range(loop_jobs):
        task.send(*call)
    single = loop_jobs / (time.perf_counter() - t0)
    app.close()
    return {"bulk send_many jobs/s": bulk, "send() loop jobs/s": single}


def run_drain(
    tmp: str,
    jobs: int,
    task_name: str,
    processes: int,
    conc: int,
    pool: str,
    log_level: str = "warning",
    extra: tuple[str, ...] = (),
    cpu_us: list[float] | None = None,
    text_bytes: int = TEXT_BYTES,
) -> float:
    """jobs/s; with ``cpu_us``, the workers' CPU µs per job is appended to it, measured from
    the 1,000th finished job to the last (start-up and shutdown left out)."""
    from taskmill import App

    url = fresh_url(tmp, f"drain-{task_name}-{pool}")
    app = App(url)
    task, call = producer_task(app, task_name, text_bytes)
    for start in range(0, jobs, 5000):
        task.send_many([call] * min(5000, jobs - start))
    app.close()
    path = db_path(url)
    with workers(url, processes, conc, pool, log_level, extra) as proc:
        if cpu_us is not None:
            n0 = wait_until(
                lambda: count_finished(path) >= 1000 and count_finished(path),
                timeout=600,
                interval=0.05,
                what="1,000 jobs to finish",
            )
            cpu0 = group_cpu_s([proc])
        wait_until(
            lambda: count_finished(path) >= jobs,
            timeout=600,
            interval=0.2,
            what=f"{jobs:,} jobs to finish",
        )
        if cpu_us is not None:
            cpu1 = group_cpu_s([proc])
            assert cpu0 is not None and cpu1 is not None, "needs Linux's /proc"
            cpu_us.append((cpu1 - cpu0) / (count_finished(path) - n0) * 1e6)
    with sqlite3.connect(path) as conn:
        first, last = conn.execute(
            "SELECT min(started_at), max(finished_at) FROM taskmill_jobs"
        ).fetchone()
    return jobs / (last - first)


def run_latency(tmp: str, rate: float, seconds: float, processes: int, conc: int) -> list[float]:
    from taskmill import App

    url = fresh_url(tmp, "latency")
    app = App(url)
    task = app.task(name="anoop", retries=0)(lambda: None)
    task.send()  # schema
    path = db_path(url)
    total = int(rate * seconds)
    with workers(url, processes, conc, "thread"):
        wait_until(lambda: count_finished(path) >= 1, timeout=30, what="the first job to finish")
        time.sleep(1.0)  # let both worker processes reach their idle wait
        interval = 1.0 / rate
        next_at = time.perf_counter()
        for _ in range(total):
            now = time.perf_counter()
            if next_at > now:
                time.sleep(next_at - now)
            task.send()
            next_at += interval
        wait_until(
            lambda: count_finished(path) >= total + 1,
            timeout=60,
            what=f"the {total:,} paced jobs to finish",
        )
    app.close()
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT (started_at - enqueued_at) * 1000 FROM taskmill_jobs ORDER BY seq"
        ).fetchall()
    return [r[0] for r in rows[1:]]


def run_metrics_cost(tmp: str, args: argparse.Namespace) -> list[tuple[str, str]]:
    """The drain without and with ``--metrics-port``, alternating (the machine's noise
    drifts: alternating spreads it over both): jobs/s, and the workers' CPU time per job,
    which time-sharing with other programs moves far less than it moves a rate."""
    task_name = args.task or "anoop"
    rates: dict[bool, list[float]] = {False: [], True: []}
    cpu_us: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for on in (False, True):
            extra = ("--metrics-port", "0") if on else ()
            rate = run_drain(
                tmp, args.jobs, task_name, args.processes, args.concurrency, args.pool,
                args.log_level, extra, cpu_us[on],
            )  # fmt: skip
            rates[on].append(rate)
    label = f"({task_name}, -p {args.processes} -c {args.concurrency})"
    rows = []
    measures = (("drain jobs/s", rates, ",.0f"), ("worker CPU µs/job", cpu_us, ".1f"))
    for what, values, fmt in measures:
        for on, name in ((False, "no metrics"), (True, "--metrics-port")):
            shown = " / ".join(format(v, fmt) for v in values[on])
            rows.append((f"{what} {label}, {name}", shown))
        ratio = statistics.median(values[True]) / statistics.median(values[False])
        rows.append((f"{what}: median with metrics / without", f"{ratio:.3f}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--mode", choices=["all", "enqueue", "drain", "latency", "metrics"], default="all"
    )
    parser.add_argument("--rounds", type=int, default=3, help="--mode metrics: drains of each")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--task", choices=["noop", "anoop", "add", "fail", "text"], default=None)
    parser.add_argument("--text-bytes", type=int, default=TEXT_BYTES, help="--task text")
    parser.add_argument("--pool", choices=["async", "thread", "process"], default="thread")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning"],
        default="warning",
        help="the workers' --log-level (info: one line per finished job, to a file)",
    )
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="taskmill-bench-") as tmp:
        if args.mode in ("all", "enqueue"):
            enqueue_task = "add" if args.task == "add" else "noop"
            for name, value in run_enqueue(tmp, args.jobs, enqueue_task).items():
                label = name if enqueue_task == "noop" else f"{name} ({enqueue_task})"
                rows.append((label, f"{value:,.0f}"))
        if args.mode in ("all", "drain"):
            for task_name in [args.task] if args.task else ["noop", "anoop"]:
                cpu_us: list[float] = []
                rate = run_drain(
                    tmp,
                    args.jobs,
                    task_name,
                    args.processes,
                    args.concurrency,
                    args.pool,
                    args.log_level,
                    cpu_us=cpu_us,
                    text_bytes=args.text_bytes,
                )
                label = f"({task_name}, -p {args.processes} -c {args.concurrency})"
                rows.append((f"drain jobs/s {label}", f"{rate:,.0f}"))
                rows.append((f"worker CPU µs/job {label}", f"{cpu_us[0]:.1f}"))
        if args.mode == "metrics":
            rows += run_metrics_cost(tmp, args)
        if args.mode in ("all", "latency"):
            lat = run_latency(tmp, args.rate, args.seconds, args.processes, args.concurrency)
            for q in (50, 95, 99):
                rows.append(
                    (f"latency p{q} ms at {args.rate:.0f} jobs/s", f"{percentile(lat, q):.2f}")
                )
            rows.append(("latency mean ms", f"{statistics.fmean(lat):.2f}"))
    width = max(len(r[0]) for r in rows)
    print(f"\ntaskmill on SQLite, {args.jobs:,} jobs, python {sys.version.split()[0]}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>10}")


if __name__ == "__main__":
    main()
