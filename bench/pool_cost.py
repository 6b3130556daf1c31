"""What a job costs the worker processes, by pool: CPU time and context switches per job.

    python -m bench.pool_cost [--jobs 20000] [--workload io|noop] [--rounds 2]

taskmill only, on a ``redis-server`` this script starts (the measuring server of the
comparisons, which the I/O workload's ``INCR`` also goes to). Each round drains ``--jobs``
jobs, enqueued first, with ``taskmill worker -p 2 -c 16`` three ways in turn: a sync task in
the thread pool (the default), the async task on the event loop, and the sync task called on
the loop itself (``--pool async``: no hand-off at all). From the first job seen to the last,
it reads from ``/proc`` the CPU time (user + system) of the worker processes, the context
switches of all their threads (voluntary and not) and the CPU time of ``redis-server``, and
prints them per job with the drain rate. Linux only (``/proc``).

The drain rate moves a lot on a shared machine; the CPU time per job much less, so compare
that between versions (docs/benchmarks.md, "The thread pool's cost per job").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import redis

from bench._harness import (
    TREE_PATH,
    WORKLOAD_TITLES,
    exit_on_sigterm,
    git_describe,
    redis_server,
    run_json,
    spawn,
    stop,
    stop_all,
    wait_for,
)
from bench.peers._common import WORKLOADS, drain_status

MODES = {
    "thread": ("sync", "thread"),  # name: (task variant, --pool)
    "async task": ("async", "thread"),
    "inline": ("sync", "async"),
}


def usage(pids: list[int]) -> tuple[float, int]:
    """(CPU seconds, context switches of every thread) of the processes ``pids``."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu, switches = 0.0, 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu += (int(fields[11]) + int(fields[12])) / tick
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/status") as f:
                switches += sum(int(line.split()[1]) for line in f if "ctxt_switches:" in line)
    return cpu, switches


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def drain(mode: str, port: int, redis_pid: int, tmp: str, args: argparse.Namespace) -> str:
    variant, pool = MODES[mode]
    env = {
        **os.environ,
        "PYTHONPATH": TREE_PATH,
        "CMP_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "TASKMILL_URL": f"redis://127.0.0.1:{port}/0?prefix=bench:",
        "CMP_WORKLOAD": args.workload,
        "CMP_TASKMILL_VARIANT": variant,
    }
    client = redis.Redis(port=port, decode_responses=True)
    client.flushall()
    log = os.path.join(tmp, f"{mode.replace(' ', '-')}.log")
    run_json(
        [sys.executable, "-m", "bench.peers.taskmill_app", "enqueue", str(args.jobs)],
        env, args.timeout, log,
    )  # fmt: skip
    cmd = [
        sys.executable, "-m", "taskmill", "worker", "bench.peers.taskmill_app:app",
        "-p", "2", "-c", "16", "--pool", pool, "--log-level", "warning",
    ]  # fmt: skip
    worker = spawn(cmd, env, log)
    snapshot: list[tuple[int, list[int], tuple[float, int], float]] = []

    def first(count: int) -> None:
        pids = children(worker.pid)
        snapshot.append((count, pids, usage(pids), usage([redis_pid])[0]))

    try:
        wait_for(
            lambda: drain_status(client)[0], args.jobs, [worker], [log],
            args.timeout, 30.0, "drain", first,
        )  # fmt: skip
        count, pids, (cpu0, switches0), redis0 = snapshot[0]
        cpu1, switches1 = usage(pids)
        redis1 = usage([redis_pid])[0]
    finally:
        stop(worker)
    done, earliest, latest = drain_status(client)
    jobs = done - count
    return (
        f"{mode:<10}  {done / (latest - earliest):>7,.0f} jobs/s  "
        f"worker CPU {(cpu1 - cpu0) / jobs * 1e6:>4.0f} µs/job  "
        f"context switches {(switches1 - switches0) / jobs:>4.1f}/job  "
        f"redis-server CPU {(redis1 - redis0) / jobs * 1e6:>3.0f} µs/job"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--workload", choices=WORKLOADS, default="io")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    exit_on_sigterm()
    print(
        f"{args.jobs:,} {WORKLOAD_TITLES[args.workload]} per drain, taskmill worker -p 2 -c 16 on"
        f" Redis; taskmill {git_describe() or '?'}; {time.strftime('%Y-%m-%d %H:%M')}"
    )
    with tempfile.TemporaryDirectory(prefix="taskmill-pool-cost-") as tmp:
        try:
            with redis_server(tmp) as (port, _):
                redis_pid = int(redis.Redis(port=port).info("server")["process_id"])
                for _ in range(args.rounds):
                    for mode in MODES:
                        print(drain(mode, port, redis_pid, tmp, args), flush=True)
        finally:
            stop_all()


if __name__ == "__main__":
    main()
