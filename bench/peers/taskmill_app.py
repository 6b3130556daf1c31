"""taskmill's side of bench.compare_redis and bench.compare_postgres (run with the project's
virtualenv); the broker is whatever ``TASKMILL_URL`` says.

Workers: ``taskmill worker bench.peers.taskmill_app:app -p 2 -c 16`` with ``TASKMILL_URL`` set
(2 worker processes under one supervisor, 16 concurrent jobs each; sync tasks run in the thread
pool, async ones on the worker's event loop).
Producer: ``python -m bench.peers.taskmill_app enqueue N | pace RATE SECONDS | extras N |
extras-postgres N``;
``CMP_TASKMILL_VARIANT=async`` sends the async probes instead of the sync ones.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import redis

from bench.peers import _common
from taskmill import App

app = App(os.environ.get("TASKMILL_URL", "redis://127.0.0.1:6379/0?prefix=bench:"))
ASYNC = os.environ.get("CMP_TASKMILL_VARIANT", "sync") == "async"


@app.task(name="drain_probe", retries=0)
def drain_probe() -> None:
    _common.drain()


@app.task(name="lat_probe", retries=0)
def lat_probe(sent: float) -> None:
    _common.record_latency(sent)


@app.task(name="adrain_probe", retries=0)
async def adrain_probe() -> None:
    await _common.adrain()


@app.task(name="alat_probe", retries=0)
async def alat_probe(sent: float) -> None:
    await _common.arecord_latency(sent)


def enqueue(n: int) -> str:
    task: Any = adrain_probe if ASYNC else drain_probe
    for start in range(0, n, 1000):
        task.send_many([()] * min(1000, n - start))
    return "send_many, batches of 1,000"


def send_latency(sent: float) -> None:
    (alat_probe if ASYNC else lat_probe).send(sent)


def paced(rate: float, seconds: float) -> dict[str, Any]:
    """The steady send loop. ``CMP_OPEN_FIRST=1`` (bench.compare_postgres) opens the app
    first, as Procrastinate's producer opens its own: the first ``send()`` would otherwise
    connect (and import the broker) inside the timed loop."""
    if os.environ.get("CMP_OPEN_FIRST") == "1":
        app.open()
    return _common.pace(rate, seconds, send_latency)


_writes = [0]


def _count_writes() -> None:
    """Count redis-py's socket writes (one per command or pipeline sent: a round trip)."""
    import redis.asyncio.connection
    import redis.connection

    def patch(cls: Any) -> None:
        orig = cls.send_packed_command
        if inspect.iscoroutinefunction(orig):

            async def counted_async(self: Any, *args: Any, **kwargs: Any) -> Any:
                _writes[0] += 1
                return await orig(self, *args, **kwargs)

            cls.send_packed_command = counted_async
        else:

            def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
                _writes[0] += 1
                return orig(self, *args, **kwargs)

            cls.send_packed_command = counted

    patch(redis.asyncio.connection.AbstractConnection)
    patch(redis.connection.AbstractConnection)


# What any atomic enqueue that takes the server's clock must run, and nothing else: the time,
# the id check, the job's hash (the fields a claim needs), the ready index.
MINIMAL_ENQUEUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local jk = ARGV[1] .. 'job:' .. ARGV[2]
if redis.call('EXISTS', jk) == 1 then return 0 end
redis.call('HSET', jk, 'id', ARGV[2], 'task', ARGV[3], 'queue', ARGV[4], 'state', 'queued',
  'payload', ARGV[5], 'priority', ARGV[6], 'max_attempts', ARGV[7], 'run_at', now,
  'enqueued_at', now)
redis.call('ZADD', ARGV[1] .. 'q:' .. ARGV[4] .. ':ready', now, ARGV[2])
return 1
"""


def _reference_loops(client: redis.Redis) -> dict[str, Callable[[int], None]]:
    """The loops ``extras`` times, by name: each makes ``k`` calls."""
    empty = client.script_load("")
    minimal = client.script_load(MINIMAL_ENQUEUE)
    client.incr("cmp:ceiling")

    def evalsha_loop(k: int) -> None:
        for _ in range(k):
            client.evalsha(empty, 0)

    def incr_loop(k: int) -> None:
        for _ in range(k):
            client.incr("cmp:ceiling")

    def minimal_loop(k: int) -> None:
        for i in range(k):
            job_id = f"{k}-{i}-{time.time_ns()}"
            client.evalsha(minimal, 0, "cmp:min:", job_id, "drain_probe", "default", "[]", 0, 1)

    def send_loop(k: int) -> None:
        for _ in range(k):
            drain_probe.send()

    return {
        "evalsha_loop": evalsha_loop,
        "incr_loop": incr_loop,
        "minimal_loop": minimal_loop,
        "send_loop": send_loop,
    }


def extras(n: int) -> dict[str, Any]:
    """A plain ``send()`` loop against one connection's ceiling: a loop of ``EVALSHA`` of an
    empty script (a round trip plus a script call's overhead: a ``send()`` is one script call),
    an ``INCR`` loop as a second reference, and a loop of the least script an atomic enqueue
    with the server's clock can be (``MINIMAL_ENQUEUE``: the floor for any design that keeps
    both), all with redis-py's sync client. The four
    loops take turns in chunks of n/10 calls, so that a load that comes and goes on the machine
    weighs on each alike; each rate is its calls over its own time. Then, in a pass of its own,
    how many Redis commands (server side, counting those run inside Lua scripts) and socket
    writes (client side: round trips) one ``send()`` costs, and the server's time per call of
    the enqueue script (commandstats)."""
    _count_writes()
    client = redis.Redis.from_url(_common.redis_url())
    drain_probe.send()  # open the broker and load its scripts outside the timed part
    loops = _reference_loops(client)
    spent = dict.fromkeys(loops, 0.0)
    chunk = max(1, n // 10)
    for _ in range(10):
        for name, loop in loops.items():
            t0 = time.perf_counter()
            loop(chunk)
            spent[name] += time.perf_counter() - t0
    rates = {name: 10 * chunk / seconds for name, seconds in spent.items()}

    client.config_resetstat()
    before = client.info("stats")["total_commands_processed"]
    w0 = _writes[0]
    loops["send_loop"](chunk)
    writes = (_writes[0] - w0) / chunk
    # Redis commands per send() (nothing else talks to Redis now; minus our own INFO).
    commands = (client.info("stats")["total_commands_processed"] - before - 1) / chunk
    script_us = client.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]
    client.close()
    return {
        **rates,
        "commands_per_send": commands,
        "writes_per_send": writes,
        "script_us": script_us,
        "n": 10 * chunk,
    }


def extras_postgres(n: int) -> dict[str, Any]:
    """For a PostgreSQL broker: a plain ``send()`` loop against two ceilings of one psycopg
    connection (autocommit), measured back to back in this process, twice: a ``SELECT 1`` loop
    (a round trip) and a loop of one-row ``INSERT``s (a round trip and a durable commit: with
    ``synchronous_commit`` on, each waits for its WAL flush, as every ``send()`` does)."""
    import psycopg

    drain_probe.send()  # open the broker (pool, schema check) outside the timed part
    conn = psycopg.connect(os.environ["TASKMILL_URL"].split("?")[0], autocommit=True)
    conn.execute("CREATE TABLE IF NOT EXISTS cmp_ceiling (id bigint)")
    send_rates, select_rates, commit_rates = [], [], []
    for _ in range(2):
        t0 = time.perf_counter()
        for _ in range(n):
            conn.execute("SELECT 1")
        select_rates.append(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for i in range(n):
            conn.execute("INSERT INTO cmp_ceiling VALUES (%s)", (i,))
        commit_rates.append(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for _ in range(n):
            drain_probe.send()
        send_rates.append(n / (time.perf_counter() - t0))
    conn.close()
    return {
        "send_loop": max(send_rates),
        "select_loop": max(select_rates),
        "commit_loop": max(commit_rates),
        "n": n,
    }


if __name__ == "__main__":
    if sys.argv[1] == "extras":
        print(json.dumps(extras(int(sys.argv[2]))), flush=True)
    elif sys.argv[1] == "extras-postgres":
        print(json.dumps(extras_postgres(int(sys.argv[2]))), flush=True)
    else:
        _common.run_cli(enqueue, paced=paced)
