"""``taskmill migrate`` on NATS, run as a real subprocess against the session's ``nats-server``
(under a prefix of the test's own): what it creates, with the settings it prints, and that it
leaves what exists as it is."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import pytest
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from servers import NatsServer
from taskmill import App

pytestmark = pytest.mark.timeout(60)

BUCKETS = ("jobs", "payloads", "keys", "leases", "workers", "queues", "misc", "workflows")


def _migrate(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
    return subprocess.run(
        [sys.executable, "-m", "taskmill", "migrate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=45,
    )


def test_migrate_creates_and_prints_every_stream(nats_server: NatsServer) -> None:
    prefix = f"m{uuid.uuid4().hex[:10]}"
    url = f"{nats_server.url}?prefix={prefix}"
    done = _migrate("--url", url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    where = nats_server.url.split("://", 1)[1]
    assert lines[0] == (
        f"stream {prefix}_dispatch: workqueue, file, 1 replica, subjects {prefix}.d.> "
        f"{prefix}.s.> {prefix}.t.>, duplicate window 120 s, no max age, scheduled messages, "
        "0 messages"
    )
    # the misc bucket holds the store's epoch marker from the start (Broker.epoch: T4)
    assert lines[1:-1] == [
        f"bucket {prefix}_{what} (stream KV_{prefix}_{what}): limits, file, 1 replica, "
        f"history 1, duplicate window 120 s, no max age, "
        f"{'1 message' if what == 'misc' else '0 messages'}"
        for what in BUCKETS
    ]
    assert lines[-1] == f"NATS at {where}: {1 + len(BUCKETS)} streams ready (prefix {prefix})"

    # as the server has them: explicit settings, not its defaults
    async def described() -> list[StreamConfig]:
        nc = await nats_server.connect()
        try:
            js = nc.jetstream()
            names = [f"{prefix}_dispatch", *(f"KV_{prefix}_{w}" for w in BUCKETS)]
            return [(await js.stream_info(n)).config for n in names]
        finally:
            await nc.close()

    dispatch, *buckets = asyncio.run(described())
    assert dispatch.retention == RetentionPolicy.WORK_QUEUE
    assert dispatch.discard == DiscardPolicy.NEW
    for bucket in buckets:
        assert bucket.storage == StorageType.FILE
        assert bucket.max_msgs_per_subject == 1

    # a job sent since: its pointer and its record are counted, nothing is created again
    app = App(url)
    try:
        app.task(name="note")(lambda n: n).send(1)
    finally:
        app.close()
    again = _migrate("--url", url)
    assert again.returncode == 0, again.stderr
    counts = {
        line.split(":", 1)[0]: line.rsplit(", ", 1)[1]
        for line in again.stdout.splitlines()
        if line.startswith(("stream ", "bucket "))
    }
    assert counts[f"stream {prefix}_dispatch"] == "1 message"
    assert counts[f"bucket {prefix}_jobs (stream KV_{prefix}_jobs)"] == "1 message"


def test_migrate_shows_the_urls_settings(nats_server: NatsServer) -> None:
    prefix = f"m{uuid.uuid4().hex[:10]}"
    done = _migrate("--url", f"{nats_server.url}?prefix={prefix}&storage=memory&schedules=workers")
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith(f"stream {prefix}_dispatch: workqueue, memory, 1 replica, ")
    assert "no scheduled messages" in first
    # a schema version means nothing on NATS: a usage error, not a silent no-op
    refused = _migrate("--url", f"{nats_server.url}?prefix={prefix}", "--to", "2")
    assert refused.returncode == 2
    assert "--to is for PostgreSQL" in refused.stderr
