"""taskmill and its peers (Celery, Dramatiq, RQ, arq) side by side on one Redis.

    python -m bench.compare_redis [--jobs 20000] [--rate 200] [--seconds 10] [--markdown]
    python -m bench.compare_redis --only celery,rq       # a subset (names as in the table)
    python -m bench.compare_redis --workload io          # only the I/O workload

What it does, in one invocation:

1. Creates, once, the peers' virtualenvs under ``bench/.peers/`` (git-ignored) and installs the
   pinned peers there (`PEER_VENVS`): they are not taskmill dependencies. Two virtualenvs,
   because arq 0.28 requires redis-py < 6 while Celery 5.7 (kombu 5.7) requires >= 6.4.
2. Starts its own ``redis-server`` on a free loopback port in a temporary directory
   (``--save "" --appendonly no``), and ``FLUSHALL``s it before each library.
3. For each workload (``--workload``: ``noop``, ``io`` or ``both``, the default, in that
   order) and each library: ``--jobs`` jobs are enqueued first (timed: each library's bulk API
   where it has one, listed in the "enqueue" column), then 2 worker processes are started and
   drain them. A no-op job's body does nothing but the probe; an I/O job's body first does one
   ``INCR`` on this Redis with a client of its own (redis-py's synchronous client in a sync
   task, ``redis.asyncio`` in an async one), the same code for every library.
4. Latency, on the same (now idle) workers: jobs are sent at a steady ``--rate`` for
   ``--seconds`` by a timed loop; after a 20-job warm-up and a 1 s pause.

How each figure is taken (identical for every library; the code is `bench/peers/_common.py`):

- **drain jobs/s**: every task body notes ``time.time()`` in a per-process tally (count,
  earliest, latest) that a daemon thread writes to Redis every 50 ms, so the probe costs no
  round trip per job. Drain rate = jobs / (latest - earliest over all processes), so worker
  start-up is not counted. RQ's forking worker runs each job in a process that exits right
  after it, so there the body records itself in Redis with one Lua script call per job
  (``--probe redis`` does that for every library: one extra round trip per job for all).
- **latency**: the producer takes ``time.time()`` just before the send call and passes it as
  the task's argument; the task body takes ``time.time()`` as it starts and ``RPUSH``es the
  difference to a list that this script reads back. p50 and p99 are of those values (one
  machine, one clock).

Worker configurations (each library's normal way to run 2 processes; logging at WARNING for
all, since per-job INFO lines would measure the logger):

- taskmill: ``taskmill worker bench.peers.taskmill_app:app -p 2 -c 16`` (a supervisor and 2
  worker processes). Run twice: with a sync task (thread pool) and an async task (event loop);
  the sync row is the reference for the ratio, since Celery, Dramatiq and RQ run sync functions.
  "taskmill inline" (only when named in ``--only``): the sync task with ``--pool async``, called
  on the event loop itself, one job at a time: what the thread pool's hand-off costs.
- Celery: ``celery worker --pool prefork -c 2``: one worker node, whose main process consumes
  from Redis and hands tasks to 2 forked pool processes. That is Celery's default pool and its
  documented way to run 2 processes (2 nodes of ``-c 1`` would be 4 processes). Defaults
  otherwise: prefetch multiplier 4, ack on receipt, no result backend.
- Dramatiq: ``dramatiq --processes 2 --threads 8`` (8: Dramatiq's default), RedisBroker.
- RQ: 2 ``rq worker`` processes. RQ's default Worker forks a work horse for every job; the
  "rq SimpleWorker" row runs 2 ``rq worker -w rq.worker.SimpleWorker`` (no fork) for comparison.
- arq: 2 ``arq`` worker processes, arq's defaults (max_jobs 10, poll_delay 0.5 s).

taskmill only, also: the bulk enqueue rate (``send_many`` in batches of 1,000, the drain's own
enqueue) and a plain ``send()`` loop against one connection's ceiling: a loop of ``EVALSHA`` of
an empty script with redis-py's sync client (a round trip and a script call, as a ``send()``
is), with an ``INCR`` loop as a second reference and a loop of the least script an atomic enqueue
with the server's clock must run (``MINIMAL_ENQUEUE`` in bench/peers/taskmill_app.py: TIME,
EXISTS, HSET of the job, ZADD of the ready index): the floor for any enqueue that keeps both,
measured back to back in one process.

Robustness: every phase has a timeout, a drain that makes no progress for 30 s fails early,
every subprocess runs in its own process group and is killed at the end, and a library that
fails is reported as "failed: reason" while the others still run. The harness (processes,
phases, table) is `bench/_harness.py`, shared with `bench.compare_postgres`.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any

import redis

from bench._harness import (
    PEERS_DIR,
    ROOT,
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
    run_json,
    run_lib,
    select,
    stop_all,
    sync_versus_async,
    venv_python,
    versus_fastest_peer,
    workloads,
)

# Pinned to the current releases (checked with `pip index versions` on 2026-11-23).
PEER_VENVS: dict[str, list[str]] = {
    "venv": ["celery[redis]==5.7.0", "dramatiq[redis]==2.2.1", "rq==3.0.0", "hiredis==3.5.0"],
    "venv-arq": ["arq==0.28.0", "hiredis==3.5.0"],
}

CELERY_ARGS = [
    "-A",
    "bench.peers.celery_app",
    "worker",
    "--pool",
    "prefork",
    "-c",
    "2",
    "--loglevel",
    "WARNING",
]
DRAMATIQ_ARGS = ["bench.peers.dramatiq_app", "--processes", "2", "--threads", "8"]
TARGET_SEND = 0.9  # issue #11: send() loop ÷ the empty-script EVALSHA loop


def libraries(port: int, peers_py: str, arq_py: str) -> list[Lib]:
    url = f"redis://127.0.0.1:{port}/0"
    bindir = os.path.dirname(peers_py)
    tm_worker = [
        sys.executable, "-m", "taskmill", "worker", "bench.peers.taskmill_app:app",
        "-p", "2", "-c", "16", "--pool", "thread", "--log-level", "warning",
    ]  # fmt: skip
    tm_env = {"TASKMILL_URL": f"{url}?prefix=bench:"}
    rq_worker = [os.path.join(bindir, "rq"), "worker", "-u", url, "--logging_level", "WARNING"]
    arq_worker = [
        os.path.join(os.path.dirname(arq_py), "arq"), "bench.peers.arq_app.WorkerSettings",
        "--custom-log-dict", "bench.peers.arq_app.LOG_CONFIG",
    ]  # fmt: skip
    return [
        Lib(
            "taskmill",
            "`taskmill worker -p 2 -c 16`, sync task in the thread pool",
            sys.executable,
            "bench.peers.taskmill_app",
            [tm_worker],
            {**tm_env, "CMP_TASKMILL_VARIANT": "sync"},
        ),
        Lib(
            "taskmill async",
            "`taskmill worker -p 2 -c 16`, async task on the event loop",
            sys.executable,
            "bench.peers.taskmill_app",
            [tm_worker],
            {**tm_env, "CMP_TASKMILL_VARIANT": "async"},
        ),
        Lib(
            "taskmill inline",
            "`taskmill worker -p 2 -c 16 --pool async`, sync task on the event loop",
            sys.executable,
            "bench.peers.taskmill_app",
            [[*tm_worker[:-3], "async", *tm_worker[-2:]]],
            {**tm_env, "CMP_TASKMILL_VARIANT": "sync"},
            default=False,
        ),
        Lib(
            "celery",
            "`celery worker --pool prefork -c 2` (1 consumer + 2 pool processes), prefetch x4",
            peers_py,
            "bench.peers.celery_app",
            [[os.path.join(bindir, "celery"), *CELERY_ARGS]],
        ),
        Lib(
            "dramatiq",
            "`dramatiq --processes 2 --threads 8`",
            peers_py,
            "bench.peers.dramatiq_app",
            [[os.path.join(bindir, "dramatiq"), *DRAMATIQ_ARGS]],
        ),
        Lib(
            "rq",
            "2 x `rq worker` (default Worker: forks per job)",
            peers_py,
            "bench.peers.rq_app",
            [[*rq_worker, "cmp"], [*rq_worker, "cmp"]],
            {"CMP_FORKED": "1"},  # the work horse exits after its job: record it per job
        ),
        Lib(
            "rq SimpleWorker",
            "2 x `rq worker -w rq.worker.SimpleWorker` (no fork)",
            peers_py,
            "bench.peers.rq_app",
            [[*rq_worker, "-w", "rq.worker.SimpleWorker", "cmp"]] * 2,
        ),
        Lib(
            "arq",
            "2 x `arq` worker (max_jobs 10, poll_delay 0.5 s)",
            arq_py,
            "bench.peers.arq_app",
            [arq_worker, arq_worker],
        ),
    ]


def taskmill_extras(port: int, tmp: str, n: int, timeout: float) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "CMP_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "TASKMILL_URL": f"redis://127.0.0.1:{port}/0?prefix=bench:",
    }
    redis.Redis(port=port).flushall()
    cmd = [sys.executable, "-m", "bench.peers.taskmill_app", "extras", str(n)]
    return run_json(cmd, env, timeout, os.path.join(tmp, "taskmill-extras.log"))


def extras_lines(extras: dict[str, Any] | str | None, rows: list[Row]) -> list[str]:
    """The lines under a workload's table: taskmill's bulk enqueue and its drain ratios, and
    the ``send()`` loop's figures (``extras``; None: not under this table)."""
    tm = next((r for r in rows if r.lib.name == "taskmill"), None)
    lines = []
    if tm and tm.enqueue:
        lines.append(f"- taskmill bulk enqueue ({tm.enqueue_api}): {tm.enqueue:,.0f} jobs/s")
    lines += versus_fastest_peer(rows) + sync_versus_async(rows)
    if extras is None:
        return lines
    if isinstance(extras, str):
        return [*lines, f"- taskmill send() loop vs one connection's ceiling: failed: {extras}"]
    send, ceiling, incr = extras["send_loop"], extras["evalsha_loop"], extras["incr_loop"]
    lines.append(
        f"- taskmill plain send() loop: {send:,.0f} jobs/s; one connection's loop of EVALSHA of "
        f"an empty script (the ceiling: a round trip and a script call): {ceiling:,.0f}/s, "
        f"ratio {send / ceiling:.0%} (target ≥ {TARGET_SEND:.0%}: "
        f"{'met' if send / ceiling >= TARGET_SEND else 'NOT met'}); its INCR loop: "
        f"{incr:,.0f}/s, ratio {send / incr:.0%} ({extras['n']:,} calls each, the four loops "
        f"taking turns in tenths); the least atomic enqueue script with the server's clock "
        f"(TIME, EXISTS, HSET, ZADD; bench/peers/taskmill_app.py MINIMAL_ENQUEUE): "
        f"{extras['minimal_loop']:,.0f}/s, {extras['minimal_loop'] / ceiling:.0%} of the "
        f"ceiling, send() at {send / extras['minimal_loop']:.0%} of it; per send(): "
        f"{extras['writes_per_send']:.2f} socket writes "
        f"(round trips), {extras['commands_per_send']:.2f} Redis commands (including those run "
        f"by Lua), {extras['script_us']:.1f} us of server time in the enqueue script"
    )
    return lines


def main() -> None:
    args = arg_parser((__doc__ or "").split("\n")[0]).parse_args()
    exit_on_sigterm()

    t_start = time.monotonic()
    os.makedirs(PEERS_DIR, exist_ok=True)
    peers_py, arq_py = venv_python("venv"), venv_python("venv-arq")
    rows: dict[str, list[Row]] = {}
    extras: dict[str, Any] | str = "not run"
    version = "?"
    with tempfile.TemporaryDirectory(prefix="taskmill-cmp-") as tmp:
        try:
            with redis_server(tmp) as (port, version):
                log(f"redis-server {version} on 127.0.0.1:{port}")
                libs = select(libraries(port, peers_py, arq_py), args.only)
                ensure_venvs(libs, PEER_VENVS)
                for workload in workloads(args):
                    rows[workload] = [run_lib(lib, port, tmp, args, None, workload) for lib in libs]
                if any(lib.name == "taskmill" for lib in libs):
                    try:
                        extras = taskmill_extras(port, tmp, args.send_loop_jobs, args.timeout)
                    except Exception as exc:
                        extras = str(exc)
        finally:
            stop_all()
            if os.environ.get("CMP_KEEP_LOGS"):
                shutil.copytree(tmp, os.environ["CMP_KEEP_LOGS"], dirs_exist_ok=True)

    commit = git_describe()
    for workload, table in rows.items():
        title = (
            f"{args.jobs:,} {WORKLOAD_TITLES[workload]}, 2 worker processes, latency at "
            f"{args.rate:.0f} jobs/s for {args.seconds:.0f} s; redis-server {version}, Python "
            f"{platform.python_version()}, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}, "
            f"{time.monotonic() - t_start:.0f} s for the whole run\n"
            f"taskmill {commit or '?'}; peers: {pins(PEER_VENVS).replace('[redis]', '')}"
        )
        last = workload == list(rows)[-1]
        print_report(title, table, extras_lines(extras if last else None, table), args.markdown)


if __name__ == "__main__":
    main()
