"""What every benchmarked library's task body and producer share (stdlib and redis-py only).

Imported by the peers' apps in the peers' virtualenvs and by taskmill's app in the project's, so
the measuring code is the same for every library:

- a drain probe keeps, per process, a count of task bodies run and the earliest and latest
  ``time.time()`` at which one ran (a lock and three assignments); a daemon thread writes the
  three to a Redis hash field of that process every 50 ms (``tally``, the default). So the
  measurement costs no round trip per job. Where a process ends after each job (RQ's forking
  worker) or with ``CMP_PROBE=redis``, the body instead runs one Lua script per job doing the
  same in Redis (one round trip each);
- the job's own work, by ``CMP_WORKLOAD``: ``noop`` (nothing) or ``io`` (one ``INCR`` of
  ``cmp:io`` on the measuring Redis, with redis-py's synchronous client in a sync body and
  ``redis.asyncio`` in an async one: a client of its own per process, or per event loop, never
  the library's); the drain probe runs it first, so every library's body is the same;
- a latency probe takes the wall-clock time taken just before its send call and pushes
  ``now - sent`` (seconds, taken as the body starts) onto a Redis list;
- a producer CLI (`run_cli`): ``enqueue N`` (timed), ``pace RATE SECONDS`` (a steady send loop).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis

URL_ENV = "CMP_REDIS_URL"
FIRST, LAST, DONE, LAT = "cmp:first", "cmp:last", "cmp:done", "cmp:lat"
TALLY = "cmp:tally"  # hash: pid -> "count first last"
IO_KEY = "cmp:io"  # what the io workload INCRs
WORKLOADS = ("noop", "io")
FLUSH_EVERY = 0.05

# KEYS: first, last, done; ARGV: now. min/max, not plain SET, since bodies run concurrently.
RECORD_LUA = """
local f = redis.call('GET', KEYS[1])
if not f or tonumber(ARGV[1]) < tonumber(f) then redis.call('SET', KEYS[1], ARGV[1]) end
local l = redis.call('GET', KEYS[2])
if not l or tonumber(ARGV[1]) > tonumber(l) then redis.call('SET', KEYS[2], ARGV[1]) end
return redis.call('INCR', KEYS[3])
"""


def redis_url() -> str:
    return os.environ[URL_ENV]


def per_job() -> bool:
    """Record each job in Redis as it runs (its process may not outlive the job)?"""
    return os.environ.get("CMP_PROBE", "tally") == "redis" or bool(os.environ.get("CMP_FORKED"))


def workload() -> str:
    """What a drain job's body does before its probe: ``noop`` or ``io`` (``CMP_WORKLOAD``)."""
    name = os.environ.get("CMP_WORKLOAD", "noop")
    if name not in WORKLOADS:
        raise SystemExit(f"CMP_WORKLOAD={name!r}: expected one of {', '.join(WORKLOADS)}")
    return name


_IO = workload() == "io"
_io_sync: dict[int, Any] = {}
_io_async: dict[int, Any] = {}


def work() -> None:
    """The job's own work in a sync body: one ``INCR`` for the io workload. One client per
    process (pid-keyed: a forked child connects anew); redis-py's pool gives each thread its
    own connection."""
    if not _IO:
        return
    pid = os.getpid()
    client = _io_sync.get(pid)
    if client is None:
        client = _io_sync[pid] = redis.Redis.from_url(redis_url())
    client.incr(IO_KEY)


async def awork() -> None:
    """The job's own work in an async body: one ``INCR`` with ``redis.asyncio`` (a client per
    event loop: a client is bound to its loop)."""
    if not _IO:
        return
    import redis.asyncio

    key = id(asyncio.get_running_loop())
    client = _io_async.get(key)
    if client is None:
        client = _io_async[key] = redis.asyncio.Redis.from_url(redis_url())
    await client.incr(IO_KEY)


class _Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.first = float("inf")
        self.last = 0.0


_tallies: dict[int, _Tally] = {}
_tallies_lock = threading.Lock()


def _flusher(pid: int, tally: _Tally) -> None:
    client = redis.Redis.from_url(redis_url())
    flushed = 0
    while True:
        time.sleep(FLUSH_EVERY)
        with tally.lock:
            count, first, last = tally.count, tally.first, tally.last
        if count != flushed:
            client.hset(TALLY, str(pid), f"{count} {first!r} {last!r}")
            flushed = count


def tally() -> None:
    """The default drain probe: in-process, flushed to Redis by a thread every 50 ms."""
    now = time.time()
    pid = os.getpid()
    t = _tallies.get(pid)
    if t is None:  # first job in this process (pid-keyed: a forked pool child starts afresh)
        with _tallies_lock:
            t = _tallies.get(pid)
            if t is None:
                t = _tallies[pid] = _Tally()
                threading.Thread(target=_flusher, args=(pid, t), daemon=True).start()
    with t.lock:
        t.count += 1
        if now < t.first:
            t.first = now
        if now > t.last:
            t.last = now


def drain(connection: Any = None) -> None:
    """A sync drain job's body: its work (`work`), then the drain probe. ``connection``: the
    library's own client, if any (for the probe only)."""
    work()
    if per_job():
        record_drain(connection)
    else:
        tally()


async def adrain(connection: Any = None) -> None:
    """An async drain job's body: its work (`awork`), then the drain probe."""
    await awork()
    if per_job():
        await arecord_drain(connection)
    else:
        tally()


def drain_status(client: Any) -> tuple[int, float, float]:
    """(jobs done, earliest start, latest start) from both probes' keys."""
    done = int(client.get(DONE) or 0)
    first = float(client.get(FIRST) or "inf")
    last = float(client.get(LAST) or 0)
    for value in client.hvals(TALLY):
        count, earliest, latest = value.split()
        done += int(count)
        first, last = min(first, float(earliest)), max(last, float(latest))
    return done, first, last


_sync: dict[int, tuple[Any, Any]] = {}


def _client(connection: Any = None) -> tuple[Any, Any]:
    """A sync client and the registered script, one per process (pid-keyed: safe after fork)."""
    pid = os.getpid()
    got = _sync.get(pid)
    if got is None:
        client = connection if connection is not None else redis.Redis.from_url(redis_url())
        got = _sync[pid] = (client, client.register_script(RECORD_LUA))
    return got


def record_drain(connection: Any = None) -> None:
    """Drain probe for a sync task body. ``connection``: the library's own client, if it has one."""
    now = time.time()
    client, script = _client(connection)
    script(keys=[FIRST, LAST, DONE], args=[repr(now)], client=connection or client)


def record_latency(sent: float, connection: Any = None) -> None:
    now = time.time()
    client, _ = _client(connection)
    (connection or client).rpush(LAT, repr(now - sent))


_async: dict[int, tuple[Any, Any]] = {}


def _aclient(connection: Any = None) -> tuple[Any, Any]:
    import redis.asyncio

    # The library's connection, else one client per event loop (a client is bound to its loop).
    key = id(connection) if connection is not None else id(asyncio.get_running_loop())
    got = _async.get(key)
    if got is None:
        client = connection if connection is not None else redis.asyncio.Redis.from_url(redis_url())
        got = _async[key] = (client, client.register_script(RECORD_LUA))
    return got


async def arecord_drain(connection: Any = None) -> None:
    """Drain probe for an async task body (one client per process, or the library's own)."""
    now = time.time()
    client, script = _aclient(connection)
    await script(keys=[FIRST, LAST, DONE], args=[repr(now)], client=client)


async def arecord_latency(sent: float, connection: Any = None) -> None:
    now = time.time()
    client, _ = _aclient(connection)
    await client.rpush(LAT, repr(now - sent))


def pace(rate: float, seconds: float, send: Callable[[float], Any]) -> dict[str, Any]:
    """Call ``send(sent_at)`` ``rate`` times a second for ``seconds``; ``sent_at`` is taken just
    before the call. Returns how many were sent and how far the loop fell behind its schedule."""
    total = int(rate * seconds)
    interval = 1.0 / rate
    next_at = time.perf_counter()
    behind = 0.0
    for _ in range(total):
        now = time.perf_counter()
        if next_at > now:
            time.sleep(next_at - now)
        else:
            behind = max(behind, now - next_at)
        send(time.time())
        next_at += interval
    return {"sent": total, "max_behind_ms": behind * 1000}


async def apace(
    rate: float, seconds: float, send: Callable[[float], Awaitable[Any]]
) -> dict[str, Any]:
    """`pace` for an async send call (the same schedule, ``asyncio.sleep`` between sends)."""
    total = int(rate * seconds)
    interval = 1.0 / rate
    next_at = time.perf_counter()
    behind = 0.0
    for _ in range(total):
        now = time.perf_counter()
        if next_at > now:
            await asyncio.sleep(next_at - now)
        else:
            behind = max(behind, now - next_at)
        await send(time.time())
        next_at += interval
    return {"sent": total, "max_behind_ms": behind * 1000}


def run_cli(
    enqueue: Callable[[int], str], send_latency: Callable[[float], Any] | None = None,
    paced: Callable[[float, float], dict[str, Any]] | None = None,
) -> None:  # fmt: skip
    """``enqueue N``: time ``enqueue(N)`` (returns a description of the API used);
    ``pace RATE SECONDS``: steady latency probes, by ``send_latency(sent_at)`` or the app's own
    ``paced(rate, seconds)``. Prints one JSON line."""
    cmd = sys.argv[1]
    if cmd == "enqueue":
        n = int(sys.argv[2])
        t0 = time.perf_counter()
        api = enqueue(n)
        elapsed = time.perf_counter() - t0
        out: dict[str, Any] = {"jobs": n, "seconds": elapsed, "rate": n / elapsed, "api": api}
    elif cmd == "pace":
        rate, seconds = float(sys.argv[2]), float(sys.argv[3])
        if paced is not None:
            out = paced(rate, seconds)
        else:
            assert send_latency is not None
            out = pace(rate, seconds, send_latency)
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    print(json.dumps(out), flush=True)
