"""A blocking send packs its command with hiredis in one call: the bytes must be those redis-py
would send, and a URL that asks redis-py for another encoding keeps redis-py's packer."""

from __future__ import annotations

import redis

from taskmill.brokers.redis import SHAS, _enqueue_args, _packed
from taskmill.job import NewJob

JOBS = [
    NewJob(id="0193-a", task="app.charge", queue="default", payload=b'[[1],{"x":"\\u00e9"}]'),
    NewJob(
        id="0193-b", task="app.fête", queue="q", payload=b"[[],{}]", priority=-3, run_at=1.5,
        delay_s=0.25, max_attempts=4, timeout_s=2.5, key="k-é", meta={"tenant": "ü", "n": 3},
    ),
]  # fmt: skip


def command() -> tuple[object, ...]:
    return ("EVALSHA", SHAS["enqueue"], 0, "taskmill:", *_enqueue_args(JOBS, "return"))


def test_the_bytes_are_those_redis_py_would_send() -> None:
    conn = redis.Redis().connection_pool.make_connection()  # not connected: packing only
    assert b"".join(_packed(conn, *command())) == b"".join(conn.pack_command(*command()))


def test_another_encoding_keeps_redis_pys_packer() -> None:
    conn = redis.Redis(encoding="latin-1").connection_pool.make_connection()
    packed = b"".join(_packed(conn, *command()))
    assert packed == b"".join(conn.pack_command(*command()))
    assert "fête".encode("latin-1") in packed and "fête".encode() not in packed
