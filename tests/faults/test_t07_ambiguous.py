"""T7 (docs/reliability.md): ambiguous outcomes, on each server broker.

The producer reaches the broker through one ``FaultProxy``, the ``taskmill worker -p 2 -c 8``
supervisor through another. Now and then (a schedule drawn from the seed) a proxy drops the
broker's replies for a short window, then heals (which resets the connections that lost a
reply): the producer's window is longer than its ``unavailable_after_s`` (``BOUND_S``), so
sends in it fail with ``BrokerUnavailableError`` although the broker applied them; the
workers' windows are shorter than a lease, so claims, heartbeats and outcomes lose their
replies. The producer sends each job with an id chosen beforehand, and resends a send whose
outcome is unknown with the same id (``job_id=`` is taskmill's idempotency key) until the
broker acknowledges it; a resend the broker answers with ``existing`` says the unknown attempt
had committed (the checker's ``recovered``). Pass: 0 duplicate jobs in the broker, lost 0,
unexpected 0, stuck 0, every duplicate execution explained by a window of dropped replies.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from faults import jobs
from faults.checker import DROP_REPLIES, TERMINAL_STATES, check
from faults.harness import Supervisor
from faults.ledger import Enqueue, Ledger, Outcome
from faults.proxy import FaultProxy, Mode
from faults.schedule import SEED_ENV, seed_from_env
from faults.sizes import sized
from servers import NatsServer, PostgresServer, RedisServer
from taskmill import App, BrokerUnavailableError
from taskmill.testing import wait_until

JOBS = sized(ci=1_000, full=20_000)
OVER_S = sized(ci=16.0, full=400.0)
WINDOWS = sized(ci=4, full=100)
"""Windows of dropped replies, for the producer and for the workers each."""
BOUND_S = 1.0
"""The producer's ``unavailable_after_s``: a send waits this long for a reply."""
PRODUCER_WINDOW_S = 1.5
WORKER_WINDOW_S = 0.6
LEASE_S = 5.0
RESENDS = 30
DRAIN_S = sized(ci=60.0, full=600.0)

pytestmark = pytest.mark.timeout(sized(ci=150, full=1_800))


@pytest.fixture(params=["redis", "postgres", "nats"])
def broker(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, str, int]]:
    """(name, URL without the producer's bound, host, port) of a store of this test's own."""
    name: str = request.param
    if name == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        yield name, f"{redis.url}?prefix=t7{uuid.uuid4().hex[:8]}:", redis.host, redis.port
    elif name == "postgres":
        pg: PostgresServer = request.getfixturevalue("postgres_server")
        database = f"t7_{uuid.uuid4().hex[:12]}"
        yield name, pg.create_database(database), pg.host, pg.port
        with pg.connect() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    else:
        nats: NatsServer = request.getfixturevalue("nats_server")
        url = f"{nats.url}?prefix=t7{uuid.uuid4().hex[:10]}&ack_wait=2"
        yield name, url, nats.host, nats.port


def with_bound(name: str, url: str) -> str:
    option = "unavailable_after" if name == "nats" else "unavailable_after_s"
    return f"{url}{'&' if '?' in url else '?'}{option}={BOUND_S:g}"


@dataclass
class Window:
    at_s: float
    length_s: float


def windows(rng: random.Random, length_s: float) -> list[Window]:
    """``WINDOWS`` windows spread over the run, one in each slice of it, at a random place."""
    slice_s = OVER_S / WINDOWS
    return [
        Window(round(i * slice_s + rng.uniform(0.2, slice_s - length_s - 0.2), 3), length_s)
        for i in range(WINDOWS)
    ]


def drop_replies(
    proxy: FaultProxy, plan: list[Window], start: float, on_window: Callable[[float, float], None]
) -> None:
    for window in plan:
        delay = start + window.at_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the schedule's own timing
        began = time.time()
        proxy.drop_responses()
        time.sleep(window.length_s)  # the window's length: a fault of a given duration
        proxy.heal()
        on_window(began, time.time())


@dataclass
class Sends:
    unknown: int = 0
    resent_ok: int = 0
    existing: int = 0
    other_errors: list[str] = field(default_factory=list)


def produce(
    app: App,
    ledger: Ledger,
    rng: random.Random,
    start: float,
    sends: Sends,
    healed: Callable[[], bool],
) -> None:
    """``JOBS`` sends evenly over ``OVER_S``; a send that fails with ``BrokerUnavailableError``
    (its outcome unknown) is sent again with the same id, once the window is over, until
    acknowledged. (Resent inside the window, a resend's own lost reply would be retried by
    the broker's client, which then finds the job stored without saying whose attempt
    stored it: the count of unknown attempts that committed would be blurred.)"""
    batch: list[Enqueue] = []
    for i in range(JOBS):
        delay = start + i * OVER_S / JOBS - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing the load
        job_id = f"f-{uuid.uuid4().hex[:16]}"
        args = [rng.randrange(51)]
        for attempt in range(RESENDS):
            try:
                handle = app.send_task("faults.work", args, job_id=job_id)
            except BrokerUnavailableError as exc:
                batch.append(Enqueue(job_id, time.time(), Outcome.UNKNOWN, repr(exc)[:200]))
                sends.unknown += 1
                wait_until(healed, what="the producer's window to end", timeout=30)
                continue
            except Exception as exc:  # not an outcome the test allows
                sends.other_errors.append(repr(exc))
                batch.append(Enqueue(job_id, time.time(), Outcome.ERROR, repr(exc)[:200]))
                break
            outcome = Outcome.EXISTING if handle.existing else Outcome.OK
            sends.existing += outcome is Outcome.EXISTING
            sends.resent_ok += attempt > 0 and outcome is Outcome.OK
            batch.append(Enqueue(job_id, time.time(), outcome))
            break
        if len(batch) >= 100:
            ledger.record_enqueues(batch)
            batch = []
    ledger.record_enqueues(batch)


def test_ambiguous_enqueue_and_finish_replies(
    broker: tuple[str, str, str, int], tmp_path: Path
) -> None:
    name, url, host, port = broker
    seed = seed_from_env()
    print(f"T7 seed {seed} (replay: {SEED_ENV}={seed})")
    rng = random.Random(seed)
    producer_plan = windows(rng, PRODUCER_WINDOW_S)
    worker_plan = windows(rng, WORKER_WINDOW_S)
    ledger = Ledger(tmp_path / "ledger.db")
    cleanup: list[Callable[[], None]] = []
    try:
        to_producer = FaultProxy(host, port).start()
        cleanup.append(to_producer.close)
        to_workers = FaultProxy(host, port).start()
        cleanup.append(to_workers.close)
        app = App(to_producer.url(with_bound(name, url)))
        app.task(name="faults.work", retries=10, backoff=0.05)(jobs.work)
        app.open()
        cleanup.append(app.close)
        direct = App(url)
        direct.open()
        cleanup.append(direct.close)
        supervisor = Supervisor(
            tmp_path,
            to_workers.url(url),
            ledger,
            *("-p", "2", "-c", "8", "--lease", str(LEASE_S)),
        )
        cleanup.append(supervisor.close)
        wait_until(
            lambda: len(direct.run_sync(direct.broker.list_workers())) >= 2,
            what="the worker processes to register",
            timeout=30,
        )

        def worker_window(began: float, ended: float) -> None:
            ledger.record_fault(DROP_REPLIES, 0, "worker connections", t=began, t_end=ended)

        def producer_window(began: float, ended: float) -> None:
            ledger.record_fault("drop producer replies", 0, "producer", t=began, t_end=ended)

        start = time.monotonic()
        sends = Sends()
        threads = [
            threading.Thread(
                target=drop_replies, args=(to_producer, producer_plan, start, producer_window)
            ),
            threading.Thread(
                target=drop_replies, args=(to_workers, worker_plan, start, worker_window)
            ),
        ]
        for thread in threads:
            thread.start()
        produce(app, ledger, rng, start, sends, lambda: to_producer.mode is Mode.FORWARD)
        for thread in threads:
            thread.join(30)
        records = ledger.read()
        acknowledged = {
            e.job_id for e in records.enqueues if e.outcome in (Outcome.OK, Outcome.EXISTING)
        }

        def listed() -> list[str]:
            return [j.id for j in direct.run_sync(direct.broker.list_jobs(limit=1_000_000))]

        def drained() -> dict[str, str] | None:
            jobs_now = direct.run_sync(direct.broker.list_jobs(limit=1_000_000))
            states = {j.id: str(j.state) for j in jobs_now}
            done = all(s in TERMINAL_STATES for s in states.values())
            return states if done and acknowledged <= states.keys() else None

        states = wait_until(drained, what="every acknowledged job to finish", timeout=DRAIN_S)
        ids = listed()
        duplicate_jobs = len(ids) - len(set(ids))
        assert supervisor.proc.poll() is None, supervisor.output()[-5000:]
        assert supervisor.stop(timeout=60) == 0, supervisor.output()[-5000:]
        elapsed = time.monotonic() - start
        result = check(ledger.read(), states)
        unknown_ids = {e.job_id for e in records.enqueues if e.outcome is Outcome.UNKNOWN}
        dropped = to_producer.stats().dropped_down, to_workers.stats().dropped_down
        print(
            f"T7 {name}: {result.summary()}; sends {JOBS}, unknown-outcome attempts"
            f" {sends.unknown} ({len(unknown_ids)} jobs, {len(unknown_ids) / JOBS:.1%}):"
            f" recovered {len(result.recovered)} (resend found it stored), resent and stored"
            f" {sends.resent_ok}; duplicate jobs {duplicate_jobs}; reply bytes dropped"
            f" producer {dropped[0]}, workers {dropped[1]}; {elapsed:.1f} s"
        )
        assert not sends.other_errors, sends.other_errors[:5]
        assert duplicate_jobs == 0
        assert result.ok, result.summary()
        assert acknowledged == {e.job_id for e in records.enqueues}, "a job never acknowledged"
        assert len(result.recovered) == sends.existing
        assert len(result.recovered) + sends.resent_ok == len(unknown_ids)
        assert unknown_ids, "no send had an unknown outcome: the test tried nothing"
    finally:
        for call in reversed(cleanup):
            call()
