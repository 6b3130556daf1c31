"""The admin API at size: what a dashboard asks of a broker holding 1,000,000 finished jobs
and 100,000 waiting ones.

    python -m bench.dashboard                      # SQLite, Redis and PostgreSQL
    python -m bench.dashboard --brokers sqlite --finished 200000 --waiting 20000 --calls 30

For each broker: a fresh store (a SQLite file in a temporary directory, a ``redis-server``
and a PostgreSQL cluster of their own, started like the test suite's, `tests/servers.py`) is
loaded directly, fast and behind taskmill's back (SQL ``executemany`` / ``COPY``, Redis
pipelines writing the layout the Lua scripts write); the schema itself is made by taskmill on
first open, so migrations run as they do for a user. Then the timed calls go through the
public admin API only (``App.astats``, ``alist_jobs``, ``aget_job``, ``athroughput``), each
``--calls`` times after a warm-up, and the table gives p50 and p95 in milliseconds. The target
(issue 12) is every call under 100 ms at p95 on every broker.

The data: four queues (40/30/20/10 % of the jobs), two tasks each. The finished jobs finished
over the last 24 hours at an even pace (about 700 a minute), stored in that order: 96 %
succeeded, 3 % failed, 1 % cancelled. Of the waiting jobs, 90 % are queued (sent over the last
hour) and 10 % scheduled (due over the next day). PostgreSQL's table is vacuumed and analyzed
after the load, as autovacuum would have done on a live system; SQLite gets no ``ANALYZE``,
as taskmill runs none.

The calls:
- ``stats``: ``astats()``, counts per queue and state, oldest waiting age, paused flags;
- ``list failed``: ``alist_jobs(state="failed", queue="mail")``, the first page of 50 and its
  total (what the jobs page shows first);
- ``list failed, deep``: the same filter, page 101 (5,000 rows in) from its cursor;
- ``list queued``: ``alist_jobs(state="queued", queue="default")``, first page and total;
- ``list by task``: ``alist_jobs(task="reports.task1")``, first page and total (a filter no
  broker indexes: its total is read from a bounded number of jobs, or estimated);
- ``get job``: ``aget_job(id)`` of jobs picked at random among all;
- ``throughput``: ``athroughput(60)``, the overview's chart.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import redis

from taskmill import App
from taskmill._ids import uuid7

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from servers import PostgresServer, RedisServer  # noqa: E402 - tests/servers.py

QUEUES = [("default", 40), ("mail", 30), ("reports", 20), ("billing", 10)]
TARGET_P95_MS = 100.0
WARMUP = 3
SPAN_S = 24 * 3600.0
BATCH = 20_000
PAYLOAD = b'[[42, "report"], {}]'
ERROR = '{"type": "ValueError", "message": "card declined", "traceback": ""}'


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the data ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Row:
    id: str
    task: str
    queue: str
    state: str
    run_at: float
    enqueued_at: float
    started_at: float | None
    finished_at: float | None
    attempt: int
    result: bytes | None
    error: str | None


def _queue_of(n: int) -> str:
    slot = n % 100
    for queue, share in QUEUES:
        if slot < share:
            return queue
        slot -= share
    raise AssertionError(slot)


def _finished_state(n: int) -> str:
    if n % 100 < 3:
        return "failed"
    return "cancelled" if n % 100 == 3 else "succeeded"


def rows(finished: int, waiting: int, now: float) -> Iterator[Row]:
    """The finished jobs in the order they finished, then the waiting ones."""
    rng = random.Random(12)
    for n in range(finished):
        at = now - SPAN_S + SPAN_S * n / finished
        state = _finished_state(rng.randrange(100))
        queue = _queue_of(rng.randrange(100))
        yield Row(
            id=uuid7(),
            task=f"{queue}.task{n % 2}",
            queue=queue,
            state=state,
            run_at=at - 2.0,
            enqueued_at=at - 2.0,
            started_at=None if state == "cancelled" else at - 1.0,
            finished_at=at,
            attempt=0 if state == "cancelled" else 1,
            result=b"null" if state == "succeeded" else None,
            error=ERROR if state == "failed" else None,
        )
    for n in range(waiting):
        queue = _queue_of(rng.randrange(100))
        scheduled = n % 10 == 0
        sent = now - 3600.0 + 3600.0 * n / waiting
        yield Row(
            id=uuid7(),
            task=f"{queue}.task{n % 2}",
            queue=queue,
            state="scheduled" if scheduled else "queued",
            run_at=sent + rng.uniform(0, SPAN_S) if scheduled else sent,
            enqueued_at=sent,
            started_at=None,
            finished_at=None,
            attempt=0,
            result=None,
            error=None,
        )


def batches(finished: int, waiting: int, now: float) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for row in rows(finished, waiting, now):
        batch.append(row)
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


# --- loading each broker -----------------------------------------------------------------------

COLUMNS = (
    "id, task, queue, state, payload, priority, attempt, max_attempts, run_at, enqueued_at, "
    "started_at, finished_at, result, error"
)


def create_schema(url: str) -> None:
    app = App(url)
    app.open()
    app.close()


def load_sqlite(url: str, finished: int, waiting: int, now: float) -> list[str]:
    create_schema(url)
    conn = sqlite3.connect(url.removeprefix("sqlite:///"))
    conn.execute("PRAGMA synchronous = OFF")
    sample: list[str] = []
    with conn:
        for batch in batches(finished, waiting, now):
            sample.append(batch[len(batch) // 2].id)
            conn.executemany(
                f"INSERT INTO taskmill_jobs ({COLUMNS}) VALUES "
                "(?, ?, ?, ?, ?, 0, ?, 4, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.id,
                        r.task,
                        r.queue,
                        r.state,
                        PAYLOAD,
                        r.attempt,
                        r.run_at,
                        r.enqueued_at,
                        r.started_at,
                        r.finished_at,
                        r.result,
                        r.error,
                    )
                    for r in batch
                ],
            )
    conn.close()
    return sample


def _ts(at: float | None) -> datetime | None:
    return None if at is None else datetime.fromtimestamp(at, UTC)


def load_postgres(url: str, finished: int, waiting: int, now: float) -> list[str]:
    create_schema(url)
    sample: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.cursor() as cur, cur.copy(f"COPY taskmill.jobs ({COLUMNS}) FROM STDIN") as copy:
            for batch in batches(finished, waiting, now):
                sample.append(batch[len(batch) // 2].id)
                for r in batch:
                    copy.write_row(
                        (r.id, r.task, r.queue, r.state, PAYLOAD, 0, r.attempt, 4, _ts(r.run_at),
                         _ts(r.enqueued_at), _ts(r.started_at), _ts(r.finished_at), r.result,
                         r.error)
                    )  # fmt: skip
        conn.execute("VACUUM ANALYZE taskmill.jobs")
    return sample


def _ready_score(run_at: float) -> int:
    """``ready_score`` of ``lua/_common.lua``, priority 0."""
    return int(run_at * 1000 - 1735689600000)


def load_redis(url: str, finished: int, waiting: int, now: float) -> list[str]:
    create_schema(url)  # marks the key layout current, so the broker indexes nothing on open
    client = redis.Redis.from_url(url)
    sample: list[str] = []
    seq = 0
    for batch in batches(finished, waiting, now):
        sample.append(batch[len(batch) // 2].id)
        pipe = client.pipeline(transaction=False)
        queues = {r.queue for r in batch}
        pipe.sadd("taskmill:queues", *queues)
        for r in batch:
            seq += 1
            fields: dict[str, Any] = {
                "id": r.id, "task": r.task, "queue": r.queue, "state": r.state,
                "payload": PAYLOAD, "priority": 0, "max_attempts": 4, "run_at": r.run_at,
                "enqueued_at": r.enqueued_at,
            }  # fmt: skip
            if r.attempt:
                fields["attempt"] = r.attempt
            for name in ("started_at", "finished_at", "result", "error"):
                value = getattr(r, name)
                if value is not None:
                    fields[name] = value
            key = f"taskmill:job:{r.id}"
            pipe.hset(key, mapping=fields)
            pipe.zadd("taskmill:jobs", {r.id: seq})
            if r.finished_at is not None:
                pipe.zadd(f"taskmill:q:{r.queue}:{r.state}", {r.id: r.finished_at})
                pipe.expireat(key, int(r.finished_at + 7 * 24 * 3600))
            elif r.state == "scheduled":
                pipe.zadd(f"taskmill:q:{r.queue}:scheduled", {r.id: r.run_at})
            else:
                pipe.zadd(f"taskmill:q:{r.queue}:ready", {r.id: _ready_score(r.run_at)})
        pipe.execute()
    client.set("taskmill:seq", seq)
    client.close()
    return sample


# --- the servers -------------------------------------------------------------------------------


@contextmanager
def sqlite_store(tmp: Path) -> Iterator[str]:
    yield f"sqlite:///{tmp / 'jobs.db'}"


@contextmanager
def redis_store(tmp: Path) -> Iterator[str]:
    server = RedisServer(tmp / "redis")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@contextmanager
def postgres_store(tmp: Path) -> Iterator[str]:
    server = PostgresServer()
    try:
        server.start()
        yield server.url
    finally:
        server.cleanup()


BROKERS: dict[str, tuple[Callable[[Path], Any], Callable[[str, int, int, float], list[str]]]] = {
    "sqlite": (sqlite_store, load_sqlite),
    "redis": (redis_store, load_redis),
    "postgres": (postgres_store, load_postgres),
}


# --- measuring ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def timed(call: Callable[[], Awaitable[Any]], calls: int) -> tuple[float, float]:
    """p50 and p95 of ``calls`` calls, in ms, after a warm-up."""
    for _ in range(WARMUP):
        await call()
    spent = []
    for _ in range(calls):
        start = time.perf_counter()
        await call()
        spent.append((time.perf_counter() - start) * 1000)
    return percentile(spent, 50), percentile(spent, 95)


async def deep_cursor(app: App, pages: int) -> tuple[str, int]:
    """The cursor of page ``pages + 1`` of the failed jobs of ``mail`` (or of the last page,
    on a smaller store), and which page that is."""
    cursor: str | None = None
    depth = 0
    while depth < pages:
        page = await app.alist_jobs(state="failed", queue="mail", cursor=cursor, count=False)
        if page.next_cursor is None:
            break
        cursor, depth = page.next_cursor, depth + 1
    assert cursor is not None, "too few failed jobs for a second page"
    return cursor, depth + 1


async def measure(url: str, sample: list[str], calls: int) -> dict[str, tuple[float, float]]:
    app = App(url)
    await app.aopen()
    try:
        stats = await app.astats()
        total = sum(sum(s.counts.values()) for s in stats)
        log(f"  stored: {total:,} jobs in {len(stats)} queues")
        deep, depth = await deep_cursor(app, 100)
        log(f"  the deep page is page {depth} of the failed jobs of mail")
        picks = iter(random.Random(7).choices(sample, k=calls + WARMUP))
        figures = {
            "stats": await timed(app.astats, calls),
            "list failed": await timed(lambda: app.alist_jobs(state="failed", queue="mail"), calls),
            "list failed, deep": await timed(
                lambda: app.alist_jobs(state="failed", queue="mail", cursor=deep, count=False),
                calls,
            ),
            "list queued": await timed(
                lambda: app.alist_jobs(state="queued", queue="default"), calls
            ),
            "list by task": await timed(lambda: app.alist_jobs(task="reports.task1"), calls),
            "get job": await timed(lambda: app.aget_job(next(picks)), calls),
            "throughput": await timed(lambda: app.athroughput(60), calls),
        }
    finally:
        await app.aclose()
    return figures


def run_broker(
    name: str, finished: int, waiting: int, calls: int
) -> dict[str, tuple[float, float]]:
    store, load = BROKERS[name]
    with (
        tempfile.TemporaryDirectory(prefix=f"taskmill-dash-{name}-") as tmp,
        store(Path(tmp)) as url,
    ):
        log(f"{name}: loading {finished:,} finished and {waiting:,} waiting jobs")
        start = time.monotonic()
        sample = load(url, finished, waiting, time.time())
        log(f"{name}: loaded in {time.monotonic() - start:.0f} s; measuring")
        return asyncio.run(measure(url, sample, calls))


# --- the report --------------------------------------------------------------------------------


def table(results: dict[str, dict[str, tuple[float, float]]], markdown: bool) -> str:
    names = list(results)
    calls = list(next(iter(results.values())))
    header = ["call", *[f"{n} p50 / p95 ms" for n in names]]
    body = [
        [call, *[f"{results[n][call][0]:.1f} / {results[n][call][1]:.1f}" for n in names]]
        for call in calls
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *body]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", default="sqlite,redis,postgres")
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--waiting", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=60, help="timed calls of each kind (>= 50)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    names = [n.strip() for n in args.brokers.split(",") if n.strip()]
    unknown = [n for n in names if n not in BROKERS]
    if unknown:
        parser.error(f"unknown broker(s) {', '.join(unknown)}: choose among {', '.join(BROKERS)}")
    results = {n: run_broker(n, args.finished, args.waiting, args.calls) for n in names}
    print(table(results, args.markdown))
    missed = [
        f"{n}: {call} ({p95:.0f} ms)"
        for n, figures in results.items()
        for call, (_, p95) in figures.items()
        if p95 >= TARGET_P95_MS
    ]
    print(f"\ntarget: every call under {TARGET_P95_MS:.0f} ms at p95: ", end="")
    print("met" if not missed else "missed by " + "; ".join(missed))


if __name__ == "__main__":
    main()
