"""What the poison tests (T9, T10, T11, T23) share: a worker supervisor running
``faults.poison_app:app``, a broker of each test's own, bad records written straight into each
broker's storage, and the figures (throughput, peak RSS, restarts) read from outside."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgspec
import pytest
import redis

from faults.ledger import LEDGER_ENV, Ledger
from faults.processes import worker_children
from servers import NatsServer, PostgresServer, RedisServer
from taskmill import App
from taskmill.brokers.sqlite.schema import PAYLOAD_APART_BYTES
from taskmill.job import Job, JobState
from taskmill.task import Task
from taskmill.testing import wait_until

TESTS = Path(__file__).resolve().parent.parent
BROKERS = ["sqlite", "redis", "postgres", "nats"]
APP_PATH = "faults.poison_app:app"


class PoisonSupervisor:
    """``taskmill worker --app faults.poison_app:app ARGS`` in a process group of its own
    (killed with its children on close), logging to ``NAME.log`` in ``tmp_path``."""

    def __init__(
        self, tmp_path: Path, url: str, ledger: Ledger, *args: str, name: str = "worker"
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
        env["TASKMILL_URL"] = url
        env[LEDGER_ENV] = str(ledger.path)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        self.log_path = tmp_path / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taskmill", "worker", "--app", APP_PATH, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )

    def children(self) -> list[int]:
        return worker_children(self.proc.pid)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def restarts(self) -> int:
        """Worker processes the supervisor saw die (its log says so for each)."""
        return self.output().count("died unexpectedly")

    def peak_rss_kib(self) -> int:
        """The largest peak resident set (``VmHWM``) of the live worker processes."""
        peaks = [vm_hwm_kib(pid) for pid in self.children()]
        return max(peaks, default=0)

    def stop(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log.close()


def vm_hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def broker_url(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A broker of the test's own: an SQLite file, a Redis prefix, a PostgreSQL database or a
    NATS prefix on the session's servers (``ack_wait=2``: a dispatch message a dead claimer
    held comes back after 2 s, not 30)."""
    tag = uuid.uuid4().hex[:10]
    if name == "sqlite":
        yield f"sqlite:///{tmp_path / 'broker.db'}"
    elif name == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        prefix = f"p-{tag}:"
        yield f"{server.url}?prefix={prefix}"
        client = redis.Redis(server.host, server.port)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    elif name == "postgres":
        postgres: PostgresServer = request.getfixturevalue("postgres_server")
        database = f"p_{tag}"
        yield postgres.create_database(database)
        with postgres.connect() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    else:
        nats: NatsServer = request.getfixturevalue("nats_server")
        yield f"{nats.url}?prefix=p{tag}&ack_wait=2"


def all_jobs(app: App) -> list[Job]:
    return app.run_sync(app.broker.list_jobs(limit=1_000_000))


READ_CHUNK = 500


def wait_finished(app: App, ids: set[str], *, timeout: float, interval: float = 0.25) -> list[Job]:
    """Until every job of ``ids`` is finished; then the jobs, read once. A poll reads the
    pending jobs by id a chunk at a time and stops at the first chunk with one still pending,
    so the test's own reads stay small: listing every stored job each poll (what the poison
    tests did first) made the test process the machine's busiest at full size, where 2,500
    of the 30,000 stored jobs are 200-260 KB, and halved the workers' throughput it measured."""
    pending = sorted(ids)

    def read(chunk: list[str]) -> list[Job | None]:
        return app.run_sync(app.broker.get_many(chunk))

    states = _states_reader(app) or (lambda chunk: [j and j.state for j in read(chunk)])

    def poll() -> bool:
        nonlocal pending
        while pending:
            chunk, rest = pending[:READ_CHUNK], pending[READ_CHUNK:]
            found = states(chunk)
            still = [i for i, s in zip(chunk, found, strict=True) if s is None or not s.finished]
            pending = rest + still  # the rest first: a slow job does not hold up the scan
            if still:
                return False
        return True

    def what() -> str:
        states: dict[str, int] = {}
        for j in read(pending[:READ_CHUNK]):
            state = "missing" if j is None else str(j.state)
            states[state] = states.get(state, 0) + 1
        return f"{len(ids)} jobs to finish, {len(pending)} pending (of the first few: {states})"

    wait_until(poll, what=what, timeout=timeout, interval=interval)
    ordered = sorted(ids)
    return [
        job
        for start in range(0, len(ordered), READ_CHUNK)
        for job in read(ordered[start : start + READ_CHUNK])
        if job is not None
    ]


def _states_reader(app: App) -> Callable[[list[str]], list[JobState | None]] | None:
    """On NATS, the jobs' states read from their records alone: ``get_many`` also reads the
    payloads stored apart, and the polls of a wait would read the 200-260 KB payloads of the
    bad records again and again (the test process competing with the workers it measures)."""
    from taskmill.brokers.nats import NatsBroker
    from taskmill.brokers.nats.config import token
    from taskmill.brokers.nats.records import record_decoder

    broker = app.broker
    if not isinstance(broker, NatsBroker):
        return None

    async def states(chunk: list[str]) -> list[JobState | None]:
        entries = await broker._get_many("jobs", [token(i) for i in chunk])
        return [
            None if e is None or e.deleted else record_decoder.decode(e.value).state
            for e in entries
        ]

    return lambda chunk: asyncio.run_coroutine_threadsafe(states(chunk), broker._io_loop()).result(
        timeout=60
    )


def throughput(jobs: Sequence[Job]) -> float:
    """Jobs per second from the first start to the last finish of ``jobs``."""
    starts = [j.started_at for j in jobs if j.started_at is not None]
    ends = [j.finished_at for j in jobs if j.finished_at is not None]
    if not starts or not ends:
        return 0.0
    return len(jobs) / max(max(ends) - min(starts), 1e-3)


# --- bad records, straight into each broker's storage -------------------------------------


@dataclass(frozen=True)
class Bad:
    """A record no send would write: its id, its class (what the test expects its error to
    name), and its stored task name and payload bytes."""

    id: str
    kind: str
    task: str
    payload: bytes


def write_sqlite(url: str, records: Sequence[Bad], queue: str = "default") -> None:
    path = url.removeprefix("sqlite:///")
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        now = time.time()
        long = {r.id for r in records if len(r.payload) > PAYLOAD_APART_BYTES}
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO taskmill_jobs (id, task, queue, state, payload, priority,"
            " max_attempts, run_at, enqueued_at) VALUES (?, ?, ?, 'queued', ?, 0, 1, ?, ?)",
            [(r.id, r.task, queue, b"" if r.id in long else r.payload, now, now) for r in records],
        )
        conn.executemany(  # stored where the broker stores a long payload (schema 7)
            "INSERT INTO taskmill_payloads (seq, payload)"
            " SELECT seq, ? FROM taskmill_jobs WHERE id = ?",
            [(r.payload, r.id) for r in records if r.id in long],
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def write_postgres(url: str, records: Sequence[Bad], queue: str = "default") -> None:
    import psycopg

    with psycopg.connect(url, autocommit=False) as conn:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO taskmill.jobs (id, task, queue, state, payload, priority,"
                " max_attempts, run_at, enqueued_at)"
                " VALUES (%s, %s, %s, 'queued', %s, 0, 1, now(), now())",
                [(r.id, r.task, queue, r.payload) for r in records],
            )
        conn.commit()


def redis_client(url: str) -> tuple[redis.Redis, str]:
    plain, _, query = url.partition("?")
    prefix = dict(p.split("=", 1) for p in query.split("&") if p)["prefix"]
    return redis.Redis.from_url(plain), prefix


REDIS_LONG_PAYLOAD = 65536
"""``LONG_PAYLOAD`` of ``lua/_common.lua``."""


def write_redis(url: str, records: Sequence[Bad], queue: str = "default") -> None:
    """Each record as a job hash and a member of the queue's ready set (score: priority 0,
    run_at now: the layout ``lua/enqueue.lua`` writes) and of the ``jobs`` listing index."""
    client, p = redis_client(url)
    try:
        now = time.time()
        score = int(now * 1000 - 1735689600000)
        seq = client.incrby(f"{p}seq", len(records)) - len(records)
        pipe = client.pipeline(transaction=True)
        for i, r in enumerate(records):
            pipe.hset(
                f"{p}job:{r.id}",
                mapping={
                    "id": r.id,
                    "task": r.task,
                    "queue": queue,
                    "state": "queued",
                    "payload": r.payload,
                    "priority": 0,
                    "max_attempts": 1,
                    "run_at": repr(now),
                    "enqueued_at": repr(now),
                    # a long payload's mark, as the broker's send sets it (lua/_common.lua)
                    **({"long_payload": 1} if len(r.payload) > REDIS_LONG_PAYLOAD else {}),
                },
            )
            pipe.zadd(f"{p}q:{queue}:ready", {r.id: score})
            pipe.zadd(f"{p}jobs", {r.id: seq + i + 1})
        pipe.sadd(f"{p}queues", queue)
        pipe.execute()
    finally:
        client.close()


def write_nats(app: App, records: Sequence[Bad], queue: str = "default") -> None:
    """Each record as a KV record and its dispatch pointer, through the broker's own writer of
    new jobs (``_store_new``: the same pointer and record a send stores), with the bytes of
    the record's task and payload as given."""
    from taskmill.brokers.nats.records import Record

    broker = app.broker

    async def write() -> None:
        now = await broker._fresh_now()  # type: ignore[attr-defined]
        base = time.time_ns()
        made = [
            Record(
                id=r.id,
                task=r.task,
                queue=queue,
                state=JobState.QUEUED,
                payload=r.payload,
                run_at=now,
                enqueued_at=now,
                seq=base + i,
            )
            for i, r in enumerate(records)
        ]
        await broker._ensure_lane(queue, 0)  # type: ignore[attr-defined]
        # encoded as a send encodes them: a large payload is stored apart from its record
        encoded, apart = await broker._encoded_within_limit(made)  # type: ignore[attr-defined]
        await broker._store_new(made, encoded, apart)  # type: ignore[attr-defined]

    loop = broker._io_loop()  # type: ignore[attr-defined]
    asyncio.run_coroutine_threadsafe(write(), loop).result(timeout=30)


def write_bad(name: str, url: str, app: App, records: Sequence[Bad]) -> None:
    if name == "sqlite":
        write_sqlite(url, records)
    elif name == "redis":
        write_redis(url, records)
    elif name == "postgres":
        write_postgres(url, records)
    else:
        write_nats(app, records)


def decoded(value: bytes) -> object:
    return msgspec.json.decode(value)


def make_app(url: str) -> tuple[App, dict[str, Task[..., Any]]]:
    """A producer's app, open, with the poison tasks declared as the workers declare them."""
    from faults import poison_app

    app = App(url, max_payload_bytes=poison_app.MAX_PAYLOAD_BYTES)
    tasks = poison_app.register(app)
    app.open()
    return app, tasks


def send_good(tasks: dict[str, Task[..., Any]], count: int, pause_ms: int) -> list[str]:
    """``count`` good jobs, sent in batches of 500; their ids."""
    ids: list[str] = []
    for start in range(0, count, 500):
        n = min(500, count - start)
        ids += [h.id for h in tasks["poison.good"].send_many([(pause_ms,)] * n)]
    return ids


def run_until_finished(
    tmp_path: Path,
    url: str,
    ledger: Ledger,
    app: App,
    ids: set[str],
    *args: str,
    name: str,
    timeout: float,
) -> tuple[list[Job], int, int, str]:
    """A supervisor (``args``) until every job of ``ids`` is finished, then stopped (exit 0
    required): the jobs, the workers' peak RSS (KiB), the supervisor's restarts, its log."""
    supervisor = PoisonSupervisor(tmp_path, url, ledger, *args, name=name)
    try:
        jobs = wait_finished(app, ids, timeout=timeout)
        rss = supervisor.peak_rss_kib()
        restarts = supervisor.restarts()
        assert supervisor.proc.poll() is None, supervisor.output()
        assert supervisor.stop() == 0, supervisor.output()
        return jobs, rss, restarts, supervisor.output()
    finally:
        supervisor.close()
