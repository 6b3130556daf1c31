"""taskmill and Huey (``SqliteHuey``) side by side on SQLite.

    python -m bench.compare_sqlite [--jobs 20000] [--rate 200] [--seconds 10] [--markdown]
    python -m bench.compare_sqlite --only taskmill,huey --workload io   # a subset

What it does, in one invocation (the harness is `bench/_harness.py`, shared with
`bench.compare_redis` and `bench.compare_postgres`; the phases and figures are the same):

1. Creates, once, Huey's virtualenv under ``bench/.peers/`` (git-ignored) and installs it there,
   pinned (`PEER_VENVS`): not a taskmill dependency; redis-py and hiredis for the probes.
2. Starts a ``redis-server`` for the measurements only (no job goes through it): the task bodies
   and producers record into it with the same code for every library
   (`bench/peers/_common.py`), and the I/O workload's ``INCR`` goes to it.
3. For each workload (``--workload``: ``noop``, ``io`` or ``both``, the default, in that order)
   and each library: a fresh SQLite file in a temporary directory, ``--jobs`` jobs enqueued
   first (timed: taskmill ``send_many`` in batches of 1,000; Huey has no bulk enqueue, so a
   loop of task calls), then 2 worker processes drain them (drain = jobs / (latest -
   earliest task body start), so worker start-up is not counted). An I/O job's body does one
   ``INCR`` on the measuring Redis first (redis-py's sync client in a sync task,
   ``redis.asyncio`` in an async one).
4. Latency, on the same (now idle) workers: ``--seconds`` of jobs sent at a steady ``--rate``
   by a timed loop, after a 20-job warm-up and a 1 s pause.

Worker configurations (logging at WARNING for all; every other setting at its default):

- taskmill: ``taskmill worker bench.peers.taskmill_app:app -p 2 -c 16`` (a supervisor and 2
  worker processes) on ``sqlite:///<file>``: WAL, ``synchronous=NORMAL``, its defaults. With a
  sync task (thread pool; the reference row) and an async task. "taskmill inline" (only when
  named in ``--only``): the sync task with ``--pool async``, called on the loop.
- Huey: ``huey_consumer bench.peers.huey_app.huey -k process -w 2 -q``: one consumer whose 2
  worker processes run the jobs (Huey's way to run N processes). "huey threads":
  ``-k thread -w 16``, one process with 16 worker threads. ``SqliteHuey``'s defaults: WAL,
  SQLite's default ``synchronous`` (FULL: a sync of the WAL per commit, where taskmill's
  NORMAL syncs at checkpoints), polling an empty queue every 0.1 s growing by 1.15x to 10 s.

Robustness: every phase has a timeout, a drain that makes no progress for 30 s fails early,
every subprocess runs in its own process group and is killed at the end, and a library that
fails is reported as "failed: reason" while the others still run.
"""

from __future__ import annotations

import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
from functools import partial

from bench._harness import (
    PEERS_DIR,
    WORKLOAD_TITLES,
    Lib,
    Row,
    arg_parser,
    ensure_venvs,
    exit_on_sigterm,
    git_describe,
    log,
    pins,
    print_report,
    redis_server,
    run_lib,
    select,
    stop_all,
    sync_versus_async,
    venv_python,
    versus_fastest_peer,
    workloads,
)

# Pinned to the current release (checked with `pip index versions` on 2026-12-06); redis-py
# and hiredis at the versions of the other peers' virtualenvs.
PEER_VENVS: dict[str, list[str]] = {
    "venv-huey": ["huey==3.5.4", "redis==8.1.0", "hiredis==3.5.0"],
}

TARGET_DRAIN_X = 4.0  # issue 11: taskmill's SQLite default (sync) drain ÷ SqliteHuey's


def database(tmp: str, lib: Lib) -> str:
    return os.path.join(tmp, "".join(c if c.isalnum() else "_" for c in lib.name) + ".db")


def fresh_file(tmp: str, lib: Lib) -> None:
    """Remove the library's SQLite file (and its WAL, shared memory and wake-up sockets) left
    by an earlier workload: each run starts from an empty store."""
    path = database(tmp, lib)
    for suffix in ("", "-wal", "-shm", "-journal"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    shutil.rmtree(path + "-wake", ignore_errors=True)


def libraries(tmp: str, huey_py: str) -> list[Lib]:
    tm_worker = [
        sys.executable, "-m", "taskmill", "worker", "bench.peers.taskmill_app:app",
        "-p", "2", "-c", "16", "--pool", "thread", "--log-level", "warning",
    ]  # fmt: skip
    tm_migrate = [sys.executable, "-m", "taskmill", "migrate"]
    consumer = [
        os.path.join(os.path.dirname(huey_py), "huey_consumer"), "bench.peers.huey_app.huey",
        "-q",
    ]  # fmt: skip
    libs = [
        Lib(
            "taskmill",
            "`taskmill worker -p 2 -c 16`, sync task in the thread pool",
            sys.executable,
            "bench.peers.taskmill_app",
            [tm_worker],
            {"CMP_TASKMILL_VARIANT": "sync"},
            [tm_migrate],
        ),
        Lib(
            "taskmill async",
            "`taskmill worker -p 2 -c 16`, async task on the event loop",
            sys.executable,
            "bench.peers.taskmill_app",
            [tm_worker],
            {"CMP_TASKMILL_VARIANT": "async"},
            [tm_migrate],
        ),
        Lib(
            "taskmill inline",
            "`taskmill worker -p 2 -c 16 --pool async`, sync task on the event loop",
            sys.executable,
            "bench.peers.taskmill_app",
            [[*tm_worker[:-3], "async", *tm_worker[-2:]]],
            {"CMP_TASKMILL_VARIANT": "sync"},
            [tm_migrate],
            default=False,
        ),
        Lib(
            "huey",
            "`huey_consumer -k process -w 2` (2 worker processes), SqliteHuey",
            huey_py,
            "bench.peers.huey_app",
            [[*consumer, "-k", "process", "-w", "2"]],
        ),
        Lib(
            "huey threads",
            "`huey_consumer -k thread -w 16` (1 process, 16 threads), SqliteHuey",
            huey_py,
            "bench.peers.huey_app",
            [[*consumer, "-k", "thread", "-w", "16"]],
        ),
    ]
    for lib in libs:
        path = database(tmp, lib)
        if lib.name.startswith("taskmill"):
            lib.env.update(TASKMILL_URL=f"sqlite:///{path}", CMP_OPEN_FIRST="1")
        else:
            lib.env["CMP_SQLITE_PATH"] = path
    return libs


def target_lines(rows: list[Row]) -> list[str]:
    """Issue 11's target against this run: taskmill's sync row against every Huey row."""
    tm = next((r for r in rows if r.lib.name == "taskmill" and r.drain), None)
    if tm is None or tm.drain is None:
        return []
    lines = []
    for r in rows:
        if r.lib.name.startswith("huey") and r.drain:
            x = tm.drain / r.drain
            met = "met" if x >= TARGET_DRAIN_X else "NOT met"
            lines.append(f"- drain ÷ {r.lib.name}: {x:.1f}x (≥ {TARGET_DRAIN_X:.0f}x: {met})")
    return ["", "Target (issue 11), taskmill sync row:", *lines] if lines else []


def main() -> None:
    args = arg_parser((__doc__ or "").split("\n")[0]).parse_args()
    exit_on_sigterm()

    t_start = time.monotonic()
    os.makedirs(PEERS_DIR, exist_ok=True)
    huey_py = venv_python("venv-huey")
    rows: dict[str, list[Row]] = {}
    redis_version = "?"
    with tempfile.TemporaryDirectory(prefix="taskmill-cmp-") as tmp:
        try:
            with redis_server(tmp) as (port, redis_version):
                log(f"SQLite files in {tmp}; measuring through redis-server {redis_version}")
                libs = select(libraries(tmp, huey_py), args.only)
                ensure_venvs(libs, PEER_VENVS)
                for workload in workloads(args):
                    rows[workload] = [
                        run_lib(lib, port, tmp, args, partial(fresh_file, tmp), workload)
                        for lib in libs
                    ]
        finally:
            stop_all()
            if os.environ.get("CMP_KEEP_LOGS"):
                shutil.copytree(tmp, os.environ["CMP_KEEP_LOGS"], dirs_exist_ok=True)

    for workload, table in rows.items():
        title = (
            f"{args.jobs:,} {WORKLOAD_TITLES[workload]}, 2 worker processes, latency at "
            f"{args.rate:.0f} jobs/s for {args.seconds:.0f} s; SQLite {sqlite3.sqlite_version}, "
            f"measured through redis-server {redis_version}; Python "
            f"{platform.python_version()}, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}, "
            f"{time.monotonic() - t_start:.0f} s for the whole run\n"
            f"taskmill {git_describe() or '?'}; peers: {pins(PEER_VENVS)}"
        )
        lines = versus_fastest_peer(table) + sync_versus_async(table)
        print_report(title, table, lines, args.markdown, target_lines(table))


if __name__ == "__main__":
    main()
