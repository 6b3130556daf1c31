"""T19 probe at CI size: sends while the producer's connection to its broker is blackholed.

A producer app reaches the broker through a ``FaultProxy`` with ``unavailable_after_s`` (NATS:
``unavailable_after``) of ``BOUND_S``. The proxy blackholes it for ``OUTAGE_S``; meanwhile
``SENDS`` sends start, paced evenly, each on a thread of its own. Every call must either return
(and its job is stored) or raise ``BrokerUnavailableError``, and none may take longer than
``BOUND_S`` plus a slack for the loaded machine. No call may fail another way, and no
returned send may be missing from the broker (a silent drop). RELIABILITY.md, T19.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from servers import NatsServer, PostgresServer, RedisServer
from taskmill import App, BrokerUnavailableError
from taskmill.testing import wait_until

from .proxy import FaultProxy

SENDS = 100
OUTAGE_S = 5.0
BOUND_S = 2.0
THREADS = 50
"""Sending threads, reused (each thread that sends holds a connection of its own)."""
SLACK_S = 1.5
"""How much later than ``BOUND_S`` a call may return on a loaded 2-core machine."""

pytestmark = pytest.mark.timeout(120)


@dataclass
class Call:
    n: int
    started: float  # s after the outage began
    took_s: float = -1.0
    job_id: str | None = None
    error: BaseException | None = None


def _noop(n: int) -> int:
    return n


def probe(url: str, host: str, port: int) -> tuple[list[Call], set[str]]:
    with FaultProxy(host, port) as proxy:
        app = App(proxy.url(url))
        task = app.task(name="t19")(_noop)
        direct = App(url)
        try:
            task.send(-1)  # connections open before the outage
            calls = [Call(n, started=0.0) for n in range(SENDS)]

            def send(call: Call) -> None:
                began = time.monotonic()
                try:
                    call.job_id = task.send(call.n).id
                except BaseException as exc:
                    call.error = exc
                call.took_s = time.monotonic() - began

            pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="t19-send")
            futures = []
            proxy.blackhole()
            outage_began = time.monotonic()
            for call in calls:
                # paced over the outage (the only sleeps: the pacing and the outage's length)
                time.sleep(max(0.0, outage_began + call.n * OUTAGE_S / SENDS - time.monotonic()))
                call.started = time.monotonic() - outage_began
                futures.append(pool.submit(send, call))
            time.sleep(max(0.0, outage_began + OUTAGE_S - time.monotonic()))
            proxy.heal()
            deadline = time.monotonic() + BOUND_S + SLACK_S + 5
            concurrent.futures.wait(futures, timeout=max(0.0, deadline - time.monotonic()))
            pool.shutdown(wait=False)
            blocked = [c.n for c in calls if c.took_s < 0]
            assert not blocked, f"calls still blocked: {blocked}"
            direct.open()
            ok = {c.job_id for c in calls if c.job_id is not None}

            def stored() -> set[str]:
                jobs = direct.run_sync(direct.broker.list_jobs(limit=1_000_000))
                return {j.id for j in jobs}

            if ok:
                wait_until(
                    lambda: ok <= stored(), what="every acknowledged send stored", timeout=10
                )
            return calls, stored()
        finally:
            app.close()
            direct.close()


def check(broker: str, calls: list[Call], stored: set[str]) -> None:
    ok = [c for c in calls if c.job_id is not None]
    unavailable = [c for c in calls if isinstance(c.error, BrokerUnavailableError)]
    other = [c for c in calls if c.error is not None and c not in unavailable]
    slowest = max(c.took_s for c in calls)
    late = [
        (c.n, round(c.started, 2), round(c.took_s, 2), "ok" if c.error is None else repr(c.error))
        for c in calls
        if c.took_s > BOUND_S + SLACK_S
    ]
    print(
        f"\nT19 {broker}: {len(ok)} ok, {len(unavailable)} BrokerUnavailableError, "
        f"{len(other)} other errors; slowest call {slowest:.2f} s (bound {BOUND_S:g} s); "
        f"late {late}; "
        f"acknowledged but missing {len([c for c in ok if c.job_id not in stored])}"
    )
    assert not other, [(c.n, repr(c.error)) for c in other]
    assert not late, f"calls past the bound of {BOUND_S} s (+{SLACK_S} s slack): {late}"
    assert all(c.job_id in stored for c in ok), "a silent drop"
    assert len(ok) + len(unavailable) == SENDS


def test_t19_redis(redis_server: RedisServer) -> None:
    url = f"{redis_server.url}?prefix=t19{uuid.uuid4().hex[:8]}:&unavailable_after_s={BOUND_S:g}"
    check("redis", *probe(url, redis_server.host, redis_server.port))


def test_t19_postgres(postgres_server: PostgresServer) -> None:
    base = postgres_server.create_database(f"t19_{uuid.uuid4().hex[:8]}")
    url = f"{base}?unavailable_after_s={BOUND_S:g}"
    check("postgres", *probe(url, postgres_server.host, postgres_server.port))


def test_t19_nats(nats_server: NatsServer) -> None:
    url = f"{nats_server.url}?prefix=t19{uuid.uuid4().hex[:8]}&unavailable_after={BOUND_S:g}"
    check("nats", *probe(url, nats_server.host, nats_server.port))


def test_threads_that_send_one_after_another_never_exhaust_redis_connections(
    redis_server: RedisServer,
) -> None:
    app = App(f"{redis_server.url}?prefix=t19threads{uuid.uuid4().hex[:8]}:")
    task = app.task(name="t19")(_noop)
    errors: list[BaseException] = []

    def send_once(n: int) -> None:
        try:
            task.send(n)
        except BaseException as exc:
            errors.append(exc)

    try:
        for n in range(110):  # one short-lived thread after another, as a thread pool recycles
            thread = threading.Thread(target=send_once, args=(n,))
            thread.start()
            thread.join(10)
            if errors:
                raise errors[0]
        assert sum(q.counts["queued"] for q in app.stats()) == 110
        broker: Any = app.broker
        # each ended thread's connection is closed, not kept until app.close()
        wait_until(
            lambda: len(broker._sync_connections) == 0,
            timeout=10,
            what=lambda: f"ended threads' connections closed ({len(broker._sync_connections)})",
        )
    finally:
        app.close()
