"""taskmill and Procrastinate side by side on one PostgreSQL server.

    python -m bench.compare_postgres [--jobs 20000] [--rate 200] [--seconds 10] [--markdown]
    python -m bench.compare_postgres --only taskmill,procrastinate   # a subset (table names)
    python -m bench.compare_postgres --only "taskmill churn,taskmill churn vacuumed"

What it does, in one invocation (the harness is `bench/_harness.py`, shared with
`bench.compare_redis`; the phases and figures are the same as there):

1. Creates, once, Procrastinate's virtualenv under ``bench/.peers/`` (git-ignored) and installs
   it there, pinned (`PEER_VENVS`): not a taskmill dependency. psycopg with its C build
   (``psycopg[binary]``), the same version as taskmill's, so both drive PostgreSQL through the
   same client library; redis-py for the measuring probes.
2. Starts its own PostgreSQL server: ``initdb`` in a temporary directory, a free loopback port,
   the server's default durability (``fsync`` and ``synchronous_commit`` on: every commit waits
   for its WAL flush), as the ``postgres`` system user when run as root (`tests/servers.py`'s
   ``PostgresServer``, the test suite's). Before each library: a fresh database (the previous
   one dropped), its schema applied by the library's own command (``taskmill migrate``,
   ``procrastinate schema --apply``), then a ``CHECKPOINT``.
3. Starts a ``redis-server`` for the measurements only (no job goes through it): the task
   bodies and producers record into it with the same code for every library
   (`bench/peers/_common.py`, as in `bench.compare_redis`), so no library is measured by
   its own bookkeeping.
4. For each workload (``--workload``: ``noop``, ``io`` or ``both``, the default, in that order)
   and each library: ``--jobs`` jobs are enqueued first (timed, with each library's bulk
   API: taskmill ``send_many``, Procrastinate ``batch_defer``, batches of 1,000), then 2 worker
   processes are started and drain them (drain = jobs / (latest - earliest task body start),
   so worker start-up is not counted). An I/O job's body does one ``INCR`` on the measuring
   Redis first (redis-py's sync client in a sync task, ``redis.asyncio`` in an async one),
   the same code for both libraries (`bench/peers/_common.py`).
5. Latency, on the same (now idle) workers: ``--seconds`` of jobs sent at a steady ``--rate``
   by a timed loop, after a 20-job warm-up and a 1 s pause; each body pushes
   ``time.time() - sent`` (the producer's clock just before the send call) to Redis. Both
   producers open their app (connection pool) before the loop: Procrastinate's
   ``with app.open()``, taskmill's ``app.open()`` (``CMP_OPEN_FIRST``), so the first send
   does not connect inside the timed loop. Procrastinate's sync pool checks a connection
   (one more round trip) each time it hands it out: its default.

6. The churn case (``--churn-rows``, 1,000,000 by default; 0 leaves it out), taskmill's sync
   row twice more: before the enqueue, that many queued jobs are loaded and vacuumed, then all
   marked succeeded in one ``UPDATE`` (as a bulk cancel or an outside "mark done" would). The
   old row versions and their entries in the claims' index are dead until a vacuum removes
   them. "taskmill churn" drains right after the change (autovacuum on, as on any server);
   "taskmill churn vacuumed" after a manual ``VACUUM``, the reference. Issue #11's target: the
   first within 2x of the second.

Worker configurations (logging at WARNING for all: per-job INFO lines would measure the logger):

- taskmill: ``taskmill worker bench.peers.taskmill_app:app -p 2 -c 16`` (a supervisor and 2
  worker processes), with a sync task (thread pool; the reference row) and an async task.
  "taskmill inline" (only when named in ``--only``): the sync task with ``--pool async``.
- Procrastinate: 2 ``procrastinate --app bench.peers.procrastinate_app.app worker`` processes
  with its defaults (concurrency 1: "by default, each worker only takes one job at a time";
  more throughput is "multiple workers, each using their own process"), LISTEN/NOTIFY on, a
  sync task (its usual style: Procrastinate runs it in a thread). Also with
  ``--concurrency 16`` (taskmill's ``-c``), sync and async task.

taskmill only, also: the bulk enqueue rate, and a plain ``send()`` loop against one psycopg
connection's ceilings (a ``SELECT 1`` loop, and a loop of one-row ``INSERT`` commits, each
waiting for its WAL flush as a ``send()`` does), measured back to back in one process.

Robustness: every phase has a timeout, a drain that makes no progress for 30 s fails early,
every subprocess runs in its own process group and is killed at the end (the PostgreSQL server
is shut down and its directory removed), and a library that fails is reported as
"failed: reason" while the others still run.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

sys.path.insert(0, os.path.join(ROOT, "tests"))
from servers import PostgresServer, ServerMissingError  # tests/servers.py

# Pinned to the current releases (checked with `pip index versions` on 2026-11-23); psycopg,
# psycopg-pool, redis-py and hiredis at the versions of the project's virtualenv.
PEER_VENVS: dict[str, list[str]] = {
    "venv-procrastinate": [
        "procrastinate==3.10.0",
        "psycopg[binary,pool]==3.3.9",
        "psycopg-pool==3.3.3",
        "redis==8.1.0",
        "hiredis==3.5.0",
    ],
}

# Issue #4's targets, checked at the end of the report.
TARGET_DRAIN_X = 8.0  # taskmill sync drain ÷ Procrastinate's
TARGET_P50_MS, TARGET_P99_MS = 3.0, 20.0
TARGET_BULK = 30_000.0


def dbname(lib: Lib) -> str:
    return "cmp_" + "".join(c if c.isalnum() else "_" for c in lib.name)


@contextmanager
def postgres_server() -> Iterator[tuple[PostgresServer, dict[str, str]]]:
    """The server, started, and its version and durability settings; shut down and removed
    at the end."""
    try:
        server = PostgresServer()
    except ServerMissingError as exc:
        raise SystemExit(f"{exc} (make test-deps)") from None
    try:
        server.start()
        settings = {}
        with server.connect() as conn:
            for name in ("server_version", "fsync", "synchronous_commit"):
                row = conn.execute(f"SHOW {name}").fetchone()
                settings[name] = str(row[0]) if row else "?"
        yield server, settings
    finally:
        server.cleanup()


def fresh_database(server: PostgresServer, lib: Lib) -> None:
    """Drop the earlier libraries' databases, create this one's, and checkpoint, so each
    library starts from an empty store and no checkpoint is owed for the one before."""
    with server.connect() as conn:
        for (name,) in conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'cmp\\_%'"
        ).fetchall():
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{dbname(lib)}"')
        conn.execute("CHECKPOINT")


def libraries(server: PostgresServer, procrastinate_py: str) -> list[Lib]:
    tm_worker = [
        sys.executable, "-m", "taskmill", "worker", "bench.peers.taskmill_app:app",
        "-p", "2", "-c", "16", "--pool", "thread", "--log-level", "warning",
    ]  # fmt: skip
    tm_migrate = [sys.executable, "-m", "taskmill", "migrate"]
    pc_bin = os.path.join(os.path.dirname(procrastinate_py), "procrastinate")
    pc_cli = [pc_bin, "--app", "bench.peers.procrastinate_app.app", "--log-level", "warning"]
    pc_schema = [*pc_cli, "schema", "--apply"]
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
            "procrastinate",
            "2 x `procrastinate worker` (default concurrency 1), sync task (run in a thread)",
            procrastinate_py,
            "bench.peers.procrastinate_app",
            [[*pc_cli, "worker"]] * 2,
            {"CMP_PROCRASTINATE_VARIANT": "sync"},
            [pc_schema],
        ),
        Lib(
            "procrastinate c16",
            "2 x `procrastinate worker --concurrency 16`, sync task (run in a thread)",
            procrastinate_py,
            "bench.peers.procrastinate_app",
            [[*pc_cli, "worker", "--concurrency", "16"]] * 2,
            {"CMP_PROCRASTINATE_VARIANT": "sync"},
            [pc_schema],
        ),
        Lib(
            "procrastinate async c16",
            "2 x `procrastinate worker --concurrency 16`, async task on the event loop",
            procrastinate_py,
            "bench.peers.procrastinate_app",
            [[*pc_cli, "worker", "--concurrency", "16"]] * 2,
            {"CMP_PROCRASTINATE_VARIANT": "async"},
            [pc_schema],
        ),
    ]
    for lib in libs:
        url = server.url_for(dbname(lib))
        if lib.name.startswith("taskmill"):
            lib.env.update(TASKMILL_URL=url, CMP_OPEN_FIRST="1")  # open before the send loop
        else:
            lib.env["CMP_PG_URL"] = url
    return libs


# --- the churn case ----------------------------------------------------------------------------
# A million jobs whose state changed in one statement just before the drain (queued, then all
# marked succeeded, as a bulk cancel or an outside "mark done" would), before any vacuum:
# their old row versions are dead, and so are their entries at the head of the ready index
# that every claim walks in order. Measured twice: without, then (the reference) with a manual
# VACUUM after the change; autovacuum is left on, as on any server.

CHURN_CASES = {
    "taskmill churn": False,  # the case: no VACUUM after the bulk change
    "taskmill churn vacuumed": True,  # the reference: a VACUUM after it
}

# Queued jobs, as send() leaves them: time-ordered ids (UUIDv7-shaped, older than any new
# job's), 4 per millisecond over the last minutes.
CHURN_LOAD = """
INSERT INTO taskmill.jobs (id, task, queue, state, payload, max_attempts, run_at, enqueued_at)
SELECT substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-7' || lpad(to_hex(mod(g, 4096)), 3, '0')
       || '-8' || substr(r, 1, 3) || '-' || substr(r, 4, 12),
       'drain_probe', 'default', 'queued', '[[],{}]'::bytea, 1, t, t
FROM generate_series(1, %(rows)s) AS g,
     LATERAL (SELECT clock_timestamp() - make_interval(secs => (%(rows)s - g) / 4000.0) AS t,
                     md5(g::text) AS r) AS x,
     LATERAL (SELECT lpad(to_hex((date_part('epoch', t) * 1000)::bigint), 12, '0') AS h) AS y
"""
CHURN_CHANGE = """
UPDATE taskmill.jobs SET state = 'succeeded', attempt = 1, started_at = clock_timestamp(),
    finished_at = clock_timestamp(), result = 'null'
WHERE state = 'queued'
"""
TARGET_CHURN = 0.5  # issue #11: the churn drain within 2x of the vacuumed one
CHANGED_AT: dict[str, float] = {}  # per case: when the bulk change committed (server clock)


def churn_libraries(server: PostgresServer, rows: int) -> list[Lib]:
    """The churn case's two runs of the sync taskmill row (same workers, same drain)."""
    libs = []
    for name, vacuum in CHURN_CASES.items():
        after = "then VACUUM" if vacuum else "no VACUUM"
        lib = Lib(
            name,
            f"as taskmill, {rows:,} queued jobs marked succeeded in one UPDATE just before, "
            f"{after}",
            sys.executable,
            "bench.peers.taskmill_app",
            libraries(server, "")[0].workers,
            {"CMP_TASKMILL_VARIANT": "sync"},
        )
        lib.env.update(TASKMILL_URL=server.url_for(dbname(lib)), CMP_OPEN_FIRST="1")
        libs.append(lib)
    return libs


def churn_prepare(server: PostgresServer, lib: Lib, rows: int) -> None:
    """A fresh database with taskmill's schema and ``rows`` queued jobs, vacuumed as a
    settled table would be; then one UPDATE of them all, and a VACUUM if the case says so."""
    t0 = time.monotonic()
    env = {**os.environ, "TASKMILL_URL": lib.env["TASKMILL_URL"]}
    migrate = [sys.executable, "-m", "taskmill", "migrate"]
    subprocess.run(migrate, env=env, check=True, timeout=60, stdout=subprocess.DEVNULL)
    with server.connect(dbname(lib)) as conn:
        conn.execute(CHURN_LOAD, {"rows": rows})
        conn.execute("VACUUM (ANALYZE) taskmill.jobs")
        conn.execute(CHURN_CHANGE)
        row = conn.execute("SELECT date_part('epoch', now())").fetchone()
        CHANGED_AT[lib.name] = float(row[0]) if row else math.nan
        if CHURN_CASES[lib.name]:
            conn.execute("VACUUM taskmill.jobs")
        conn.execute("CHECKPOINT")
    log(f"{lib.name}: {rows:,} jobs loaded and changed in {time.monotonic() - t0:.0f} s")


def vacuum_note(server: PostgresServer, lib: Lib) -> str:
    """The vacuums of the jobs table since the bulk change, and the dead rows left."""
    with server.connect(dbname(lib)) as conn:
        row = conn.execute(
            "SELECT vacuum_count, autovacuum_count, n_dead_tup, date_part('epoch', last_vacuum)"
            " FROM pg_stat_user_tables WHERE relid = 'taskmill.jobs'::regclass"
        ).fetchone()
    if row is None:
        return "no statistics for taskmill.jobs"
    ours = 2 if CHURN_CASES[lib.name] else 1  # the bench's own VACUUMs
    note = (
        f"vacuums of taskmill.jobs after the bulk change: {row[0] - ours} by taskmill, "
        f"{row[1]} by autovacuum; dead rows left: {row[2]:,}"
    )
    if row[0] > ours and row[3] is not None:
        note += f"; taskmill's last one ended {row[3] - CHANGED_AT[lib.name]:.1f} s after it"
    return note


def churn_lines(rows: list[Row]) -> list[str]:
    """The churn drain against the vacuumed one (issue #11's target)."""
    got = {r.lib.name: r.drain for r in rows if r.lib.name in CHURN_CASES and r.drain}
    churn, vacuumed = (got.get(name) for name in CHURN_CASES)
    if not (churn and vacuumed):
        return []
    ratio = churn / vacuumed
    met = "met" if ratio >= TARGET_CHURN else "NOT met"
    return [
        "",
        "Target (issue #11): the churn drain within 2x of the vacuumed one, without a VACUUM:",
        f"- {churn:,.0f} ÷ {vacuumed:,.0f} jobs/s = {ratio:.2f} (≥ {TARGET_CHURN}: {met})",
    ]


def prepare_for(server: PostgresServer, args: Any) -> Callable[[Lib], None]:
    """Each library's fresh database; the churn case's loaded and updated."""

    def prepare(lib: Lib) -> None:
        fresh_database(server, lib)
        if lib.name in CHURN_CASES:
            churn_prepare(server, lib, args.churn_rows)

    return prepare


def taskmill_extras(
    server: PostgresServer, redis_port: int, tmp: str, n: int, timeout: float
) -> dict[str, Any]:
    lib = Lib("extras", "", sys.executable, "", [])
    fresh_database(server, lib)
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "CMP_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "TASKMILL_URL": server.url_for(dbname(lib)),
    }
    redis.Redis(port=redis_port).flushall()
    cmd = [sys.executable, "-m", "bench.peers.taskmill_app", "extras-postgres", str(n)]
    return run_json(cmd, env, timeout, os.path.join(tmp, "taskmill-extras.log"))


def extras_lines(extras: dict[str, Any] | str | None, rows: list[Row]) -> list[str]:
    """The lines under a workload's table: taskmill's bulk enqueue and drain ratios, and the
    ``send()`` loop's figures (``extras``; None: not under this table)."""
    tm = next((r for r in rows if r.lib.name == "taskmill"), None)
    lines = []
    if tm and tm.enqueue:
        lines.append(f"- taskmill bulk enqueue ({tm.enqueue_api}): {tm.enqueue:,.0f} jobs/s")
    lines += versus_fastest_peer(rows) + sync_versus_async(rows)
    if extras is None:
        return lines
    if isinstance(extras, str):
        lines.append(f"- taskmill send() loop vs one connection's ceilings: failed: {extras}")
    else:
        lines.append(
            f"- taskmill plain send() loop: {extras['send_loop']:,.0f} jobs/s; one psycopg "
            f"connection's loop of one-row INSERT commits: {extras['commit_loop']:,.0f}/s "
            f"(ratio {extras['send_loop'] / extras['commit_loop']:.0%}), of SELECT 1: "
            f"{extras['select_loop']:,.0f}/s (best of 2 rounds of {extras['n']:,} each, "
            "back to back)"
        )
    return lines


def target_lines(rows: list[Row]) -> list[str]:
    """Issue #4's targets against this run (the sync taskmill row, as for the ratio)."""
    tm = next((r for r in rows if r.lib.name == "taskmill" and not r.error), None)
    if tm is None or tm.drain is None:
        return []

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = ["", "Targets (issue #4), taskmill sync row:"]
    for r in rows:
        if r.lib.name.startswith("procrastinate") and r.drain:
            x = tm.drain / r.drain
            lines.append(
                f"- drain ÷ {r.lib.name}: {x:.1f}x (≥ {TARGET_DRAIN_X:.0f}x: "
                f"{met(x >= TARGET_DRAIN_X)})"
            )
    if tm.p50 is not None and tm.p99 is not None:
        lines.append(
            f"- latency p50 {tm.p50:.2f} ms (≤ {TARGET_P50_MS:.0f}: {met(tm.p50 <= TARGET_P50_MS)})"
            f", p99 {tm.p99:.2f} ms (≤ {TARGET_P99_MS:.0f}: {met(tm.p99 <= TARGET_P99_MS)})"
        )
    if tm.enqueue:
        lines.append(
            f"- bulk enqueue {tm.enqueue:,.0f} jobs/s (≥ {TARGET_BULK:,.0f}: "
            f"{met(tm.enqueue >= TARGET_BULK)})"
        )
    return lines


def main() -> None:
    parser = arg_parser((__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--churn-rows",
        type=int,
        default=1_000_000,
        help="jobs changed in bulk before the churn case's drain (0: no churn case)",
    )
    args = parser.parse_args()
    exit_on_sigterm()

    t_start = time.monotonic()
    os.makedirs(PEERS_DIR, exist_ok=True)
    procrastinate_py = venv_python("venv-procrastinate")
    rows: dict[str, list[Row]] = {}
    extras: dict[str, Any] | str = "not run"
    settings: dict[str, str] = {}
    redis_version = "?"
    with tempfile.TemporaryDirectory(prefix="taskmill-cmp-") as tmp:
        try:
            with postgres_server() as (server, settings), redis_server(tmp) as (port, rv):
                redis_version = rv
                log(
                    f"PostgreSQL {settings['server_version']} on {server.host}:{server.port} "
                    f"(fsync {settings['fsync']}, synchronous_commit "
                    f"{settings['synchronous_commit']}); measuring through redis-server "
                    f"{redis_version} on 127.0.0.1:{port}"
                )
                candidates = libraries(server, procrastinate_py)
                if args.churn_rows > 0:
                    candidates += churn_libraries(server, args.churn_rows)
                libs = select(candidates, args.only)
                ensure_venvs(libs, PEER_VENVS)
                for workload in workloads(args):
                    table = rows[workload] = []
                    for lib in libs:
                        if lib.name in CHURN_CASES and workload != "noop":
                            continue  # the churn cases measure the queue's own cost
                        prepare = prepare_for(server, args)
                        table.append(run_lib(lib, port, tmp, args, prepare, workload))
                        if lib.name in CHURN_CASES:
                            table[-1].notes.append(vacuum_note(server, lib))
                if any(lib.name == "taskmill" for lib in libs):
                    try:
                        extras = taskmill_extras(
                            server, port, tmp, args.send_loop_jobs, args.timeout
                        )
                    except Exception as exc:
                        extras = str(exc)
        finally:
            stop_all()
            if os.environ.get("CMP_KEEP_LOGS"):
                shutil.copytree(tmp, os.environ["CMP_KEEP_LOGS"], dirs_exist_ok=True)

    for workload, table in rows.items():
        title = (
            f"{args.jobs:,} {WORKLOAD_TITLES[workload]}, 2 worker processes, latency at "
            f"{args.rate:.0f} jobs/s for {args.seconds:.0f} s; PostgreSQL "
            f"{settings.get('server_version', '?')} (fsync {settings.get('fsync', '?')}, "
            f"synchronous_commit {settings.get('synchronous_commit', '?')}), measured through "
            f"redis-server {redis_version}; Python {platform.python_version()}, "
            f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}, "
            f"{time.monotonic() - t_start:.0f} s for the whole run\n"
            f"taskmill {git_describe() or '?'}; peers: {pins(PEER_VENVS)}"
        )
        last = workload == list(rows)[-1]
        print_report(
            title,
            table,
            extras_lines(extras if last else None, table),
            args.markdown,
            target_lines(table) + churn_lines(table),
        )


if __name__ == "__main__":
    main()
