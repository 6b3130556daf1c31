"""T9, records that cannot be read as a job at all (docs/reliability.md), on each broker.

Not a bad payload (test_t09_poison_messages.py): a bad record, one no send would write and
another tool, a bug or damage might. Each broker's own kinds, written straight into its
storage among good jobs: SQLite rows whose payload is TEXT (valid JSON, and not UTF-8), whose
id is not UTF-8, whose payload is a REAL; Redis job hashes without ``id``, with a priority
that is not a number, without ``task``; a NATS KV record that is not a record. PostgreSQL's
typed columns (``bytea`` payload, ``NOT NULL`` text in the server's encoding) admit none, so
it is not a case here.

One ``taskmill worker -p 2 -c 4`` runs them. Pass: every good job succeeds; a record that
reads as a job once its text is taken as UTF-8 runs; every other one ends ``failed`` with
``SerializationError`` naming the record, without running, logged once; claims, listing and
recovery go on (the test lists the jobs throughout; the Redis listing leaves out a hash it
cannot read, so those are read straight from their hashes); no worker dies.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from faults.ledger import Ledger
from faults.poison import (
    all_jobs,
    broker_url,
    make_app,
    redis_client,
    run_until_finished,
    send_good,
)
from faults.schedule import SEED_ENV, seed_from_env
from faults.sizes import sized
from taskmill import App
from taskmill.job import ErrorInfo, JobState

GOOD = sized(ci=200, full=5_000)
PAUSE_MS = 5
ARGS = ("-p", "2", "-c", "4", "--lease", "5")
SERIALIZATION = "taskmill.errors.SerializationError"
UNREADABLE = "cannot be read as a job"


@dataclass(frozen=True)
class Expect:
    """What a bad record must end as: its state, and a text its error must contain."""

    kind: str
    state: JobState
    says: str = ""


@pytest.fixture(params=["sqlite", "redis", "nats"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    name: str = request.param
    for url in broker_url(name, request, tmp_path):
        yield name, url


def _write_sqlite(url: str, tag: str) -> dict[str, Expect]:
    """Rows ``sqlite3`` or ``job_from_row`` cannot read as written. The row whose id is not
    UTF-8 has no id to name it by: it is set aside as ``unreadable-SEQ`` (looked up after)."""
    now = time.time()
    rows = {
        f"u-text-{tag}": ("CAST(? AS TEXT)", b"[[1], {}]",
                          Expect("payload as TEXT", JobState.SUCCEEDED)),
        f"u-utf8-payload-{tag}": ("CAST(? AS TEXT)", b'[["\xff\xfe"], {}]',
                                  Expect("payload TEXT, not UTF-8", JobState.FAILED, "payload")),
        f"u-real-{tag}": ("?", 1.5, Expect("payload as REAL", JobState.FAILED, "float")),
    }  # fmt: skip
    conn = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for job_id, (expr, payload, _) in rows.items():
            conn.execute(
                "INSERT INTO taskmill_jobs (id, task, queue, state, payload, priority,"
                " max_attempts, run_at, enqueued_at)"
                f" VALUES (?, 'poison.good', 'default', 'queued', {expr}, 0, 1, ?, ?)",
                (job_id, payload, now, now),
            )
        conn.execute(
            "INSERT INTO taskmill_jobs (id, task, queue, state, payload, priority,"
            " max_attempts, run_at, enqueued_at) VALUES (CAST(? AS TEXT), 'poison.good',"
            " 'default', 'queued', ?, 0, 1, ?, ?)",
            (b"u-utf8-id-\xff\xfe" + tag.encode(), b"[[1], {}]", now, now),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    expect = {job_id: e for job_id, (_, _, e) in rows.items()}
    expect["unreadable-?"] = Expect("id TEXT, not UTF-8", JobState.FAILED, "id ")
    return expect


def _write_redis(url: str, tag: str) -> dict[str, Expect]:
    """Job hashes, each in ``q:default:ready`` and the ``jobs`` index, with a field missing
    or unreadable (the layout ``lua/enqueue.lua`` writes, otherwise)."""
    client, p = redis_client(url)
    now = time.time()
    base = {
        "task": "poison.good",
        "queue": "default",
        "state": "queued",
        "payload": b"[[1], {}]",
        "priority": 0,
        "max_attempts": 1,
        "run_at": repr(now),
        "enqueued_at": repr(now),
    }
    records: dict[str, tuple[dict[str, object], Expect]] = {
        f"u-no-id-{tag}": (base, Expect("no id field", JobState.SUCCEEDED)),
        f"u-priority-{tag}": (
            {**base, "id": f"u-priority-{tag}", "priority": "high"},
            Expect("priority not a number", JobState.FAILED, "high"),
        ),
        f"u-no-task-{tag}": (
            {k: v for k, v in {**base, "id": f"u-no-task-{tag}"}.items() if k != "task"},
            Expect("no task field", JobState.FAILED, "task"),
        ),
    }
    try:
        score = int(now * 1000 - 1735689600000)
        seq = int(client.incrby(f"{p}seq", len(records))) - len(records)
        pipe = client.pipeline(transaction=True)
        for i, (job_id, (fields, _)) in enumerate(records.items()):
            pipe.hset(f"{p}job:{job_id}", mapping=fields)  # type: ignore[arg-type]
            pipe.zadd(f"{p}q:default:ready", {job_id: score})
            pipe.zadd(f"{p}jobs", {job_id: seq + i + 1})
        pipe.sadd(f"{p}queues", "default")
        pipe.execute()
    finally:
        client.close()
    return {job_id: e for job_id, (_, e) in records.items()}


def _redis_state(url: str, job_id: str) -> tuple[JobState, ErrorInfo | None]:
    """A record's state and error read from its hash (the listing leaves out what it cannot
    read)."""
    from taskmill.brokers._rows import decode_error

    client, p = redis_client(url)
    try:
        state, error = client.hmget(f"{p}job:{job_id}", ["state", "error"])
    finally:
        client.close()
    return JobState((state or b"?").decode()), decode_error(error)


def _write_nats(app: App, tag: str) -> dict[str, Expect]:
    """A KV record that is not a record (bytes ``record_encoder`` never writes), with its
    dispatch pointer, through the broker's own writer of new jobs."""
    from taskmill.brokers.nats.records import Record

    broker = app.broker
    job_id = f"u-garbage-{tag}"

    async def write() -> None:
        now = await broker._fresh_now()  # type: ignore[attr-defined]
        record = Record(
            id=job_id, task="poison.good", queue="default", state=JobState.QUEUED,
            payload=b"[[1], {}]", run_at=now, enqueued_at=now, seq=time.time_ns(),
        )  # fmt: skip
        await broker._ensure_lane("default", 0)  # type: ignore[attr-defined]
        await broker._store_new([record], {job_id: b"\x00not a record"})  # type: ignore[attr-defined]

    loop = broker._io_loop()  # type: ignore[attr-defined]
    asyncio.run_coroutine_threadsafe(write(), loop).result(timeout=30)
    return {job_id: Expect("KV record not a record", JobState.FAILED, job_id)}


@pytest.mark.timeout(sized(ci=90, full=1_800))
def test_unreadable_records(
    broker: tuple[str, str], tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    name, url = broker
    seed = seed_from_env()
    print(f"T9u seed {seed} (replay: {SEED_ENV}={seed})")
    ledger = Ledger(tmp_path / "ledger.db")
    app, tasks = make_app(url)
    cleanup.append(app.close)
    tag = uuid.uuid4().hex[:8]
    good_ids = set(send_good(tasks, GOOD // 2, PAUSE_MS))
    if name == "sqlite":
        expect = _write_sqlite(url, tag)
    elif name == "redis":
        expect = _write_redis(url, tag)
    else:
        expect = _write_nats(app, tag)
    good_ids |= set(send_good(tasks, GOOD - len(good_ids), PAUSE_MS))
    jobs, _, restarts, log = run_until_finished(
        tmp_path, url, ledger, app, good_ids, *ARGS, name="unreadable",
        timeout=sized(ci=60.0, full=1_500.0),
    )  # fmt: skip
    listed = {j.id: j for j in all_jobs(app)}  # the listing reads past them
    if "unreadable-?" in expect:  # found by the id it was given
        (set_aside,) = [i for i in listed if i.startswith("unreadable-")]
        expect[set_aside] = expect.pop("unreadable-?")
    ended: dict[str, tuple[JobState, ErrorInfo | None]] = {}
    for job_id in expect:
        if job_id in listed:
            ended[job_id] = (listed[job_id].state, listed[job_id].error)
        elif name == "redis":
            ended[job_id] = _redis_state(url, job_id)
    wrong = []
    for job_id, e in expect.items():
        state, error = ended.get(job_id, (None, None))
        ok = state is e.state and (
            e.state is JobState.SUCCEEDED
            or (
                error is not None
                and error.type == SERIALIZATION
                and UNREADABLE in error.message
                and e.says in error.message
            )
        )
        if not ok:
            wrong.append((e.kind, job_id, state, error))
    failing = sum(e.state is JobState.FAILED for e in expect.values())
    logged = log.count(UNREADABLE)
    outcomes = ", ".join(f"{e.kind}: {ended.get(i, (None,))[0]}" for i, e in expect.items())
    print(
        f"T9u {name}: {len(expect)} unreadable records ({outcomes}); logged {logged}; "
        f"listed {sum(i in listed for i in expect)} of them; good {len(jobs)} succeeded "
        f"{sum(j.state is JobState.SUCCEEDED for j in jobs)}; restarts {restarts}"
    )
    assert not wrong, wrong
    assert all(j.state is JobState.SUCCEEDED for j in jobs)
    assert logged == failing, log  # each unreadable record logged once
    assert restarts == 0, log
    assert "the worker failed running it" not in log, log
