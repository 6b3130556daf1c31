"""taskmill and its peers (Celery, Dramatiq, RQ, arq) side by side on one Redis.

    python -m bench.compare_redis [--jobs 20000] [--rate 200] [--seconds 10] [--markdown]
    python -m bench.compare_redis --only celery,rq       # a subset (names as in the table)

What it does, in one invocation:

1. Creates, once, the peers' virtualenvs under ``bench/.peers/`` (git-ignored) and installs the
   pinned peers there (`PEER_VENVS`): they are not taskmill dependencies. Two virtualenvs,
   because arq 0.28 requires redis-py < 6 while Celery 5.7 (kombu 5.7) requires >= 6.4.
2. Starts its own ``redis-server`` on a free loopback port in a temporary directory
   (``--save "" --appendonly no``), and ``FLUSHALL``s it before each library.
3. For each library, the same workload: ``--jobs`` no-op jobs are enqueued first (timed: each
   library's bulk API where it has one, listed in the "enqueue" column), then 2 worker processes
   are started and drain them.
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
- Celery: ``celery worker --pool prefork -c 2``: one worker node, whose main process consumes
  from Redis and hands tasks to 2 forked pool processes. That is Celery's default pool and its
  documented way to run 2 processes (2 nodes of ``-c 1`` would be 4 processes). Defaults
  otherwise: prefetch multiplier 4, ack on receipt, no result backend.
- Dramatiq: ``dramatiq --processes 2 --threads 8`` (8: Dramatiq's default), RedisBroker.
- RQ: 2 ``rq worker`` processes. RQ's default Worker forks a work horse for every job; the
  "rq SimpleWorker" row runs 2 ``rq worker -w rq.worker.SimpleWorker`` (no fork) for comparison.
- arq: 2 ``arq`` worker processes, arq's defaults (max_jobs 10, poll_delay 0.5 s).

taskmill only, also: the bulk enqueue rate (``send_many`` in batches of 1,000, the drain's own
enqueue) and a plain ``send()`` loop against one connection's round-trip ceiling (a loop of
``INCR`` with redis-py's sync client), measured back to back in one process.

Robustness: every phase has a timeout, a drain that makes no progress for 30 s fails early,
every subprocess runs in its own process group and is killed at the end, and a library that
fails is reported as "failed: reason" while the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import redis

from bench.peers._common import LAT, drain_status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_DIR = os.path.join(ROOT, "bench", ".peers")

# Pinned to the current releases (checked with `pip index versions` on 2026-11-23).
PEER_VENVS: dict[str, list[str]] = {
    "venv": ["celery[redis]==5.7.0", "dramatiq[redis]==2.2.1", "rq==3.0.0", "hiredis==3.5.0"],
    "venv-arq": ["arq==0.28.0", "hiredis==3.5.0"],
}

WARMUP = 20
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


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


# --- processes ---------------------------------------------------------------------------------

_live: list[subprocess.Popen[bytes]] = []


def spawn(cmd: list[str], env: dict[str, str], logfile: str) -> subprocess.Popen[bytes]:
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    _live.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM the leader (each library's own shutdown stops its children), then SIGKILL the
    whole process group, whatever is left of it, after at most ``grace`` seconds."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    # The leader may be gone while children of its group live on (a pool, a work horse).
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    if proc in _live:
        _live.remove(proc)


def stop_all() -> None:
    for proc in list(_live):
        stop(proc, grace=5.0)


def tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            text = [line.strip() for line in f.read().splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def run_json(cmd: list[str], env: dict[str, str], timeout: float, logfile: str) -> dict[str, Any]:
    """Run a producer command; its last stdout line is JSON. Killed (whole group) on timeout."""
    with open(logfile, "ab") as err:
        proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, start_new_session=True
        )
        _live.append(proc)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{' '.join(cmd[1:4])}: timed out after {timeout:.0f} s") from exc
        finally:
            stop(proc, grace=1.0)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:4])} exited {proc.returncode}: {tail(logfile)}")
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


# --- set-up ------------------------------------------------------------------------------------


def ensure_venv(name: str, requirements: list[str]) -> str:
    """``bench/.peers/<name>`` with ``requirements`` installed; reused while they are unchanged."""
    path = os.path.join(PEERS_DIR, name)
    python = os.path.join(path, "bin", "python")
    marker = os.path.join(path, "bench-requirements.txt")
    wanted = "\n".join(requirements) + "\n"
    with suppress(OSError), open(marker) as f:
        if f.read() == wanted and os.path.exists(python):
            return python
    log(f"creating {os.path.relpath(path, ROOT)}: {' '.join(requirements)}")
    shutil.rmtree(path, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    for cmd in (
        [base, "-m", "venv", path],
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            raise SystemExit(f"{' '.join(cmd[:4])} failed (exit {done.returncode})")
    with open(marker, "w") as f:
        f.write(wanted)
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_server(tmp: str) -> Iterator[tuple[int, str]]:
    port = free_port()
    cmd = [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp,
        "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
    ]  # fmt: skip
    logfile = os.path.join(tmp, "redis.log")
    proc = spawn(cmd, dict(os.environ), logfile)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"redis-server did not start: {tail(logfile)}") from None
            time.sleep(0.05)
    version = str(client.info("server")["redis_version"])
    client.close()
    try:
        yield port, version
    finally:
        stop(proc)


# --- libraries ---------------------------------------------------------------------------------


@dataclass
class Lib:
    name: str
    configuration: str
    python: str
    module: str  # the producer module, run as ``python -m module``
    workers: list[list[str]]  # one command line per process started by this script
    env: dict[str, str] = field(default_factory=dict)


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


@dataclass
class Row:
    lib: Lib
    enqueue: float | None = None
    enqueue_api: str = ""
    drain: float | None = None
    p50: float | None = None
    p99: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def wait_for(
    check: Any, target: int, workers: list[subprocess.Popen[bytes]], logs: list[str],
    timeout: float, stall: float, what: str,
) -> None:  # fmt: skip
    """Poll ``check()`` until it reaches ``target``; fail on timeout, on no progress for
    ``stall`` seconds, or when a worker process exits."""
    start = last_change = time.monotonic()
    last = -1
    while True:
        got = int(check())
        if got >= target:
            return
        now = time.monotonic()
        if got != last:
            last, last_change = got, now
        for proc, logfile in zip(workers, logs, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited {proc.returncode} ({what}): {tail(logfile)}")
        if now - start > timeout:
            raise RuntimeError(f"{what}: timed out after {timeout:.0f} s at {got:,}/{target:,}")
        if now - last_change > stall:
            raise RuntimeError(f"{what}: no progress for {stall:.0f} s at {got:,}/{target:,}")
        time.sleep(0.1)


def run_lib(lib: Lib, port: int, tmp: str, args: argparse.Namespace) -> Row:
    row = Row(lib)
    slug = lib.name.replace(" ", "-")
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "CMP_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "CMP_PROBE": args.probe,
        **lib.env,
    }
    env.pop("VIRTUAL_ENV", None)
    client = redis.Redis(port=port, decode_responses=True)
    client.flushall()
    producer_log = os.path.join(tmp, f"{slug}-producer.log")
    producer = [lib.python, "-m", lib.module]
    workers: list[subprocess.Popen[bytes]] = []
    logs: list[str] = []
    try:
        out = run_json([*producer, "enqueue", str(args.jobs)], env, args.timeout, producer_log)
        row.enqueue, row.enqueue_api = float(out["rate"]), str(out["api"])
        log(f"{lib.name}: enqueued {args.jobs:,} in {out['seconds']:.2f} s")

        started = time.time()
        for i, cmd in enumerate(lib.workers):
            logs.append(os.path.join(tmp, f"{slug}-worker{i}.log"))
            workers.append(spawn(cmd, env, logs[-1]))
        wait_for(
            lambda: drain_status(client)[0], args.jobs, workers, logs,
            args.timeout, 30.0, "drain",
        )  # fmt: skip
        _, first, last = drain_status(client)
        row.drain = args.jobs / (last - first)
        row.notes.append(f"first job ran {first - started:.2f} s after the workers were started")
        log(f"{lib.name}: drain {row.drain:,.0f} jobs/s ({last - first:.2f} s)")

        client.delete(LAT)
        run_json([*producer, "pace", str(WARMUP), "1"], env, 60, producer_log)
        wait_for(lambda: client.llen(LAT), WARMUP, workers, logs, 60, 30, "warm-up")
        time.sleep(1.0)  # idle workers: let every process settle into its idle wait
        client.delete(LAT)
        out = run_json(
            [*producer, "pace", str(args.rate), str(args.seconds)],
            env,
            args.seconds * 3 + 60,
            producer_log,
        )
        if out["max_behind_ms"] > 50:
            row.notes.append(f"the send loop fell {out['max_behind_ms']:.0f} ms behind schedule")
        if row.drain < args.rate:
            row.notes.append(
                f"drains {row.drain:,.0f} jobs/s, less than the offered {args.rate:.0f}/s: its"
                " latency includes a growing queue"
            )
        total = int(out["sent"])
        wait_for(lambda: client.llen(LAT), total, workers, logs, 120, 60, "latency")
        lat = [float(v) * 1000 for v in client.lrange(LAT, 0, -1)]
        row.p50, row.p99 = percentile(lat, 50), percentile(lat, 99)
        log(f"{lib.name}: latency p50 {row.p50:.2f} ms, p99 {row.p99:.2f} ms")
    except Exception as exc:
        row.error = str(exc).replace("\n", " ")[:300]
        log(f"{lib.name}: FAILED: {row.error}")
    finally:
        for proc in workers:
            stop(proc)
        client.close()
    return row


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


# --- output ------------------------------------------------------------------------------------

HEADERS = [
    "library",
    "configuration",
    "enqueue jobs/s (API)",
    "drain jobs/s",
    "x taskmill",
    "p50 ms",
    "p99 ms",
]


def cells(rows: list[Row]) -> list[list[str]]:
    ref = next((r.drain for r in rows if r.lib.name == "taskmill" and r.drain), None)
    table = []
    for r in rows:
        if r.error:
            table.append([r.lib.name, r.lib.configuration, f"failed: {r.error}", "", "", "", ""])
            continue
        ratio = f"{r.drain / ref:.2f}" if r.drain and ref else "—"
        table.append(
            [
                r.lib.name,
                r.lib.configuration,
                f"{r.enqueue:,.0f} ({r.enqueue_api})" if r.enqueue else "—",
                f"{r.drain:,.0f}" if r.drain else "—",
                ratio,
                f"{r.p50:.2f}" if r.p50 is not None else "—",
                f"{r.p99:.2f}" if r.p99 is not None else "—",
            ]
        )
    return table


def plain(rows: list[Row]) -> str:
    table = [HEADERS, *cells(rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADERS))]
    right = {3, 4, 5, 6}
    out = []
    for line in table:
        out.append(
            "  ".join(
                c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(line)
            )
        )
    return "\n".join(out)


def markdown(rows: list[Row]) -> str:
    out = ["| " + " | ".join(HEADERS) + " |", "|---|---|---|---:|---:|---:|---:|"]
    out += ["| " + " | ".join(line) + " |" for line in cells(rows)]
    return "\n".join(out)


def extras_lines(extras: dict[str, Any] | str, rows: list[Row]) -> list[str]:
    if isinstance(extras, str):
        return [f"- taskmill send() loop vs INCR ceiling: failed: {extras}"]
    tm = next((r for r in rows if r.lib.name == "taskmill"), None)
    lines = []
    if tm and tm.enqueue:
        lines.append(f"- taskmill bulk enqueue ({tm.enqueue_api}): {tm.enqueue:,.0f} jobs/s")
    ratio = extras["send_loop"] / extras["incr_loop"]
    lines.append(
        f"- taskmill plain send() loop: {extras['send_loop']:,.0f} jobs/s; one connection's "
        f"INCR loop (round-trip ceiling): {extras['incr_loop']:,.0f}/s; ratio {ratio:.0%} "
        f"(best of 2 rounds of {extras['n']:,} each, back to back); per send(): "
        f"{extras['writes_per_send']:.2f} socket writes (round trips), "
        f"{extras['commands_per_send']:.2f} Redis commands (including those run by Lua)"
    )
    peers = [r for r in rows if not r.lib.name.startswith("taskmill") and r.drain]
    if tm and tm.drain and peers:
        best = max(peers, key=lambda r: r.drain or 0)
        lines.append(
            f"- taskmill drain vs the fastest peer ({best.lib.name}): "
            f"{tm.drain / (best.drain or 1):.2f}x"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=420.0, help="per phase (s)")
    parser.add_argument("--only", help="comma-separated library names (default: all)")
    parser.add_argument("--send-loop-jobs", type=int, default=5000)
    parser.add_argument(
        "--probe",
        choices=["tally", "redis"],
        default="tally",
        help="drain probe: in-process tally flushed every 50 ms (default), or a Redis round"
        " trip per job",
    )
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = parser.parse_args()

    t_start = time.monotonic()
    os.makedirs(PEERS_DIR, exist_ok=True)
    peers_py = ensure_venv("venv", PEER_VENVS["venv"])
    arq_py = ensure_venv("venv-arq", PEER_VENVS["venv-arq"])
    rows: list[Row] = []
    extras: dict[str, Any] | str = "not run"
    version = "?"
    with tempfile.TemporaryDirectory(prefix="taskmill-cmp-") as tmp:
        try:
            with redis_server(tmp) as (port, version):
                log(f"redis-server {version} on 127.0.0.1:{port}")
                libs = libraries(port, peers_py, arq_py)
                if args.only:
                    wanted = {n.strip() for n in args.only.split(",")}
                    libs = [lib for lib in libs if lib.name in wanted]
                for lib in libs:
                    rows.append(run_lib(lib, port, tmp, args))
                if any(lib.name == "taskmill" for lib in libs):
                    try:
                        extras = taskmill_extras(port, tmp, args.send_loop_jobs, args.timeout)
                    except Exception as exc:
                        extras = str(exc)
        finally:
            stop_all()
            if os.environ.get("CMP_KEEP_LOGS"):
                shutil.copytree(tmp, os.environ["CMP_KEEP_LOGS"], dirs_exist_ok=True)

    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    pins = ", ".join(dict.fromkeys(p.replace("==", " ") for r in PEER_VENVS.values() for p in r))
    title = (
        f"{args.jobs:,} no-op jobs, 2 worker processes, latency at {args.rate:.0f} jobs/s for "
        f"{args.seconds:.0f} s; redis-server {version}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}, {time.monotonic() - t_start:.0f} s\n"
        f"taskmill {commit or '?'}; peers: {pins.replace('[redis]', '')}"
    )
    print(f"\n{title}\n")
    print(plain(rows))
    print()
    for line in extras_lines(extras, rows):
        print(line)
    for r in rows:
        for note in r.notes:
            print(f"- {r.lib.name}: {note}")
    if args.markdown:
        print(f"\n{title}\n")
        print(markdown(rows))
        print()
        for line in extras_lines(extras, rows):
            print(line)


if __name__ == "__main__":
    main()
