"""The library-independent part of the side-by-side benchmarks (`bench.compare_redis`,
`bench.compare_postgres`): subprocesses, the peers' virtualenvs, the measuring Redis, one
library's phases (enqueue, drain, latency) and the table.

Every library is measured by the same code: the task bodies and producers record into a Redis
server that this harness starts (`bench/peers/_common.py`), whatever the broker under test.
Every phase has a timeout; every subprocess runs in its own process group and is killed at the
end (`stop_all`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import redis

from bench.peers._common import IO_KEY, LAT, WORKLOADS, drain_status
from taskmill.testing import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_DIR = os.path.join(ROOT, "bench", ".peers")
TREE_PATH = os.pathsep.join([os.path.join(ROOT, "src"), ROOT])
"""The workers' ``PYTHONPATH``: this tree's taskmill whichever the virtualenv installed, so a
run from a worktree of an older commit measures that commit."""

WARMUP = 20


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


def exit_on_sigterm() -> None:
    """Make SIGTERM (``timeout``, ``kill``) a ``SystemExit``, so the ``finally`` blocks still
    stop the workers and servers instead of leaving them behind."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            text = [line.strip() for line in f.read().splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def run(cmd: list[str], env: dict[str, str], timeout: float, logfile: str) -> bytes:
    """Run a command to its end (stdout returned, stderr to ``logfile``); killed (whole group)
    on timeout, an error if it exits non-zero."""
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
    return out


def run_json(cmd: list[str], env: dict[str, str], timeout: float, logfile: str) -> dict[str, Any]:
    """Run a producer command; its last stdout line is JSON. Killed (whole group) on timeout."""
    out = run(cmd, env, timeout, logfile)
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


# --- set-up ------------------------------------------------------------------------------------


def venv_python(name: str) -> str:
    """The python of the peers' virtualenv ``bench/.peers/<name>`` (made by `ensure_venv`)."""
    return os.path.join(PEERS_DIR, name, "bin", "python")


def ensure_venvs(libs: list[Lib], venvs: dict[str, list[str]]) -> None:
    """`ensure_venv` for each of ``venvs`` that one of ``libs`` runs from (``--only taskmill``
    installs no peer)."""
    commands = [cmd for lib in libs for cmd in ([lib.python], *lib.setup, *lib.workers)]
    for name, requirements in venvs.items():
        bindir = os.path.dirname(venv_python(name))
        if any(os.path.dirname(cmd[0]) == bindir for cmd in commands):
            ensure_venv(name, requirements)


def ensure_venv(name: str, requirements: list[str]) -> str:
    """``bench/.peers/<name>`` with ``requirements`` installed; reused while they are unchanged."""
    path = os.path.join(PEERS_DIR, name)
    python = venv_python(name)
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
    """A ``redis-server`` on a free loopback port, no persistence: (port, version)."""
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


# --- one library -------------------------------------------------------------------------------


@dataclass
class Lib:
    name: str
    configuration: str
    python: str
    module: str  # the producer module, run as ``python -m module``
    workers: list[list[str]]  # one command line per process started by this script
    env: dict[str, str] = field(default_factory=dict)
    setup: list[list[str]] = field(default_factory=list)  # run before the enqueue (a schema)
    default: bool = True  # run unless ``--only`` leaves it out; False: only when named there


@dataclass
class Row:
    lib: Lib
    enqueue: float | None = None
    enqueue_api: str = ""
    drain: float | None = None
    cpu_us: float | None = None  # the workers' CPU time per job during the drain
    p50: float | None = None
    p99: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def group_cpu_s(leaders: list[subprocess.Popen[bytes]]) -> float | None:
    """CPU time (user + system, in seconds) of every process in the process groups that
    ``leaders`` lead, including their reaped children's (a forked work horse's); None where
    there is no Linux ``/proc``."""
    groups = {proc.pid for proc in leaders}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return None
    total = 0
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[2]) in groups:  # pgrp; then utime, stime, cutime, cstime
            total += sum(int(v) for v in fields[11:15])
    return total / tick


def wait_for(
    check: Any, target: int, workers: list[subprocess.Popen[bytes]], logs: list[str],
    timeout: float, stall: float, what: str, on_first: Callable[[int], None] | None = None,
) -> None:  # fmt: skip
    """Poll ``check()`` until it reaches ``target``; fail on timeout, on no progress for
    ``stall`` seconds, or when a worker process exits. ``on_first(count)``: called once, when
    the count first moves (polled every 10 ms until then, for the start's time; 100 ms after)."""
    seen, changed = -1, time.monotonic()
    deadline = changed + timeout

    def reached() -> bool:
        nonlocal seen, changed, on_first
        got = int(check())
        if got and on_first is not None:
            on_first(got)
            on_first = None
        if got >= target:
            return True
        now = time.monotonic()
        if got != seen:
            seen, changed = got, now
        for proc, logfile in zip(workers, logs, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited {proc.returncode} ({what}): {tail(logfile)}")
        if now - changed > stall:
            raise RuntimeError(f"{what}: no progress for {stall:.0f} s at {got:,}/{target:,}")
        return False

    def describe() -> str:
        return f"{what}: {seen:,}/{target:,}"

    if on_first is not None:
        wait_until(lambda: reached() or on_first is None, timeout=timeout, interval=0.01,
                   what=describe)  # fmt: skip
    left = max(0.0, deadline - time.monotonic())
    wait_until(reached, timeout=left, interval=0.1, what=describe)


def run_lib(
    lib: Lib, port: int, tmp: str, args: argparse.Namespace,
    prepare: Callable[[Lib], None] | None = None, workload: str = "noop",
) -> Row:  # fmt: skip
    """One library's phases: ``prepare(lib)`` and ``lib.setup`` (a fresh store), the timed
    enqueue of ``--jobs``, the drain by freshly started workers, then the latency at ``--rate``
    on the same workers. ``port``: the measuring Redis, ``FLUSHALL``ed first. ``workload``:
    what each drain job's body does (``bench/peers/_common.py``: ``noop`` or ``io``)."""
    row = Row(lib)
    slug = f"{workload}-{lib.name.replace(' ', '-')}"
    env = {
        **os.environ,
        "PYTHONPATH": TREE_PATH,
        "CMP_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "CMP_PROBE": args.probe,
        "CMP_WORKLOAD": workload,
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
        if prepare is not None:
            prepare(lib)
        for cmd in lib.setup:
            run(cmd, env, args.timeout, os.path.join(tmp, f"{slug}-setup.log"))

        out = run_json([*producer, "enqueue", str(args.jobs)], env, args.timeout, producer_log)
        row.enqueue, row.enqueue_api = float(out["rate"]), str(out["api"])
        log(f"{lib.name}: enqueued {args.jobs:,} in {out['seconds']:.2f} s")

        started = time.time()
        for i, cmd in enumerate(lib.workers):
            logs.append(os.path.join(tmp, f"{slug}-worker{i}.log"))
            workers.append(spawn(cmd, env, logs[-1]))
        # CPU time from the first job seen to the last: a noisy machine's time-sharing moves
        # drain rates far more than the CPU time a job costs
        cpu_from: list[tuple[int, float | None]] = []
        wait_for(
            lambda: drain_status(client)[0], args.jobs, workers, logs,
            args.timeout, 30.0, "drain", lambda n: cpu_from.append((n, group_cpu_s(workers))),
        )  # fmt: skip
        cpu_to = group_cpu_s(workers)
        if cpu_from and cpu_from[0][1] is not None and cpu_to is not None:
            done_from, cpu_start = cpu_from[0]
            jobs = drain_status(client)[0] - done_from
            row.cpu_us = (cpu_to - (cpu_start or 0.0)) / max(jobs, 1) * 1e6
        _, first, last = drain_status(client)
        if workload == "io" and int(client.get(IO_KEY) or 0) < args.jobs:
            raise RuntimeError(f"the io workload made {client.get(IO_KEY)} INCRs, not {args.jobs}")
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


# --- the command line and the output -----------------------------------------------------------


def arg_parser(description: str) -> argparse.ArgumentParser:
    """The options every comparison takes."""
    parser = argparse.ArgumentParser(description=description)
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
    parser.add_argument(
        "--workload",
        choices=[*WORKLOADS, "both"],
        default="both",
        help="what each drain job does: nothing (noop), one Redis INCR with the library's kind"
        " of client (io: redis-py sync in sync tasks, redis.asyncio in async ones), or both in"
        " turn (default)",
    )
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    return parser


def workloads(args: argparse.Namespace) -> list[str]:
    """The workloads to run, in order: ``--workload both`` is no-op first, then io."""
    return list(WORKLOADS) if args.workload == "both" else [args.workload]


WORKLOAD_TITLES = {"noop": "no-op jobs", "io": "I/O jobs (each body: one Redis INCR)"}


def select(libs: list[Lib], only: str | None) -> list[Lib]:
    if not only:
        return [lib for lib in libs if lib.default]
    wanted = {n.strip() for n in only.split(",")}
    unknown = wanted - {lib.name for lib in libs}
    if unknown:
        known = ", ".join(lib.name for lib in libs)
        raise SystemExit(f"--only: no library named {', '.join(sorted(unknown))} (known: {known})")
    return [lib for lib in libs if lib.name in wanted]


def git_describe() -> str:
    return subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()


def pins(venvs: dict[str, list[str]]) -> str:
    """The pinned requirements of the peers' virtualenvs, once each, as ``name version``."""
    return ", ".join(dict.fromkeys(p.replace("==", " ") for r in venvs.values() for p in r))


HEADERS = [
    "library",
    "configuration",
    "enqueue jobs/s (API)",
    "drain jobs/s",
    "x taskmill",
    "worker CPU µs/job",
    "p50 ms",
    "p99 ms",
]


def cells(rows: list[Row]) -> list[list[str]]:
    ref = next((r.drain for r in rows if r.lib.name == "taskmill" and r.drain), None)
    table = []
    for r in rows:
        if r.error:
            table.append([r.lib.name, r.lib.configuration, f"failed: {r.error}", *[""] * 5])
            continue
        ratio = f"{r.drain / ref:.2f}" if r.drain and ref else "—"
        table.append(
            [
                r.lib.name,
                r.lib.configuration,
                f"{r.enqueue:,.0f} ({r.enqueue_api})" if r.enqueue else "—",
                f"{r.drain:,.0f}" if r.drain else "—",
                ratio,
                f"{r.cpu_us:,.0f}" if r.cpu_us is not None else "—",
                f"{r.p50:.2f}" if r.p50 is not None else "—",
                f"{r.p99:.2f}" if r.p99 is not None else "—",
            ]
        )
    return table


def plain(rows: list[Row]) -> str:
    table = [HEADERS, *cells(rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADERS))]
    right = {3, 4, 5, 6, 7}
    out = []
    for line in table:
        out.append(
            "  ".join(
                c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(line)
            )
        )
    return "\n".join(out)


def markdown(rows: list[Row]) -> str:
    out = ["| " + " | ".join(HEADERS) + " |", "|---|---|---|---:|---:|---:|---:|---:|"]
    out += ["| " + " | ".join(line) + " |" for line in cells(rows)]
    return "\n".join(out)


def versus_fastest_peer(rows: list[Row]) -> list[str]:
    """The taskmill (sync) drain against the fastest peer's, as a line (none if not both)."""
    tm = next((r for r in rows if r.lib.name == "taskmill"), None)
    peers = [r for r in rows if not r.lib.name.startswith("taskmill") and r.drain]
    if not (tm and tm.drain and peers):
        return []
    best = max(peers, key=lambda r: r.drain or 0)
    return [
        f"- taskmill drain vs the fastest peer ({best.lib.name}): "
        f"{tm.drain / (best.drain or 1):.2f}x"
    ]


def sync_versus_async(rows: list[Row]) -> list[str]:
    """taskmill's sync drain (thread pool) as a share of its async one (event loop)."""
    drains = {r.lib.name: r.drain for r in rows if r.drain}
    sync, async_ = drains.get("taskmill"), drains.get("taskmill async")
    if not (sync and async_):
        return []
    return [f"- taskmill sync drain ÷ taskmill async drain: {sync / async_:.0%}"]


def print_report(
    title: str, rows: list[Row], extra: list[str], as_markdown: bool, after: Sequence[str] = ()
) -> None:  # fmt: skip
    """The table, then ``extra`` lines, every row's notes and ``after``; the table and
    ``extra`` again as Markdown if asked."""
    print(f"\n{title}\n")
    print(plain(rows))
    print()
    for line in extra:
        print(line)
    for r in rows:
        for note in r.notes:
            print(f"- {r.lib.name}: {note}")
    for line in after:
        print(line)
    if as_markdown:
        print(f"\n{title}\n")
        print(markdown(rows))
        print()
        for line in extra:
            print(line)
