"""T3 (docs/reliability.md): the broker's server crashes and its connections are killed while
jobs flow, on each server broker.

One ``taskmill worker -p 2 -c 8 --lease 5`` supervisor and a producer sending jobs of 0-50 ms
evenly over the fault phase. The server is killed (Redis: SIGKILL with ``appendonly yes`` and
``appendfsync always``; PostgreSQL: an immediate shutdown, as ``pg_ctl -m immediate``, with
``fsync`` on; NATS: SIGKILL with ``sync_interval: always``) and started again after ~1 s, every
``EVERY_S``; between crashes the workers' connections are killed (Redis ``CLIENT KILL``,
PostgreSQL ``pg_terminate_backend``, NATS: the fault proxy the workers connect through resets
every connection). Every fault is recorded in the ledger (a crash with the time the server
accepted connections again), so the checker can explain a duplicate by it. Pass: lost 0,
unexpected 0, stuck 0, every duplicate explained; each worker process starts a job within
``RESUME_BOUND_S`` of each restart; no worker process goes ``IDLE_BOUND_S`` without starting
a job while the producer sends; no worker process exits. The ``redis-everysec`` case runs the
same with ``appendfsync everysec`` and reports its figures without gating them (a crash may
lose the last second of writes).
"""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from faults import jobs
from faults.checker import BROKER_KILL, CONNECTION_KILL, TERMINAL_STATES, check
from faults.harness import Producer, Supervisor, final_states
from faults.ledger import Ledger, Outcome
from faults.proxy import FaultProxy
from faults.schedule import SEED_ENV, seed_from_env
from faults.sizes import sized
from servers import NatsServer, PostgresServer, RedisServer
from taskmill import App
from taskmill.testing import wait_until

CRASHES = sized(ci=3, full=40)
EVERY_S = sized(ci=4.0, full=15.0)
"""A crash every this many seconds (the plan's 15 s at full size); a tail as long follows the
last one, so every restart is followed by jobs."""
CONNECTION_KILLS_BETWEEN = sized(ci=1, full=2)
"""Connection kills evenly spaced after each crash (the plan: every 5 s)."""
DOWN_S = 1.0
JOBS = sized(ci=1_100, full=50_000)
PROCESSES = 2
CONCURRENCY = 8
LEASE_S = 5.0
"""The plan's test profile (heartbeat a third of it)."""
RESUME_BOUND_S = 5.0
IDLE_BOUND_S = 10.0
DRAIN_S = sized(ci=75.0, full=600.0)
"""Long enough for a job on NATS that waits for the 30 s sweep (T1)."""

BROKERS = ["redis", "postgres", "nats", "redis-everysec"]
GATED = {"redis", "postgres", "nats"}


@dataclass
class Target:
    """One server under test: its URL for the app and the workers, how to crash it and how to
    kill the workers' connections."""

    url: str
    worker_url: str
    crash: Callable[[], None]
    """Kill the server, keep it down ``DOWN_S``, start it again (returns once it answers)."""
    kill_connections: Callable[[], int]
    cleanup: list[Callable[[], None]] = field(default_factory=list)


class EverysecRedis(RedisServer):
    """``appendonly yes`` with ``appendfsync everysec``: a crash may lose up to a second."""

    def args(self) -> list[str]:
        args = super().args()
        args[args.index("always")] = "everysec"
        return args


def _redis(server: RedisServer) -> Target:
    server.start()
    url = f"{server.url}?prefix=t3{uuid.uuid4().hex[:8]}:"
    admin = server.client()

    def kill_connections() -> int:
        return int(admin.client_kill_filter(_type="normal", skipme=True))

    target = Target(url, url, lambda: server.restart(kill=True, down_s=DOWN_S), kill_connections)
    target.cleanup += [admin.close, server.kill]
    return target


def _postgres(server: PostgresServer) -> Target:
    database = f"t3_{uuid.uuid4().hex[:12]}"
    url = server.create_database(database)

    def kill_connections() -> int:
        with server.connect() as admin:
            row = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            ).fetchone()
        return int(row[0]) if row else 0

    # SIGQUIT: PostgreSQL's immediate shutdown (no checkpoint: the next start replays the WAL)
    return Target(url, url, lambda: server.restart(kill=True, down_s=DOWN_S), kill_connections)


def _nats(server: NatsServer) -> Target:
    url = f"{server.url}?prefix=t3{uuid.uuid4().hex[:10]}&ack_wait=2"
    # nats-server kills no client on request without a system account: the workers connect
    # through the fault proxy, which resets every connection (as a kick would)
    proxy = FaultProxy(server.host, server.port).start()
    target = Target(
        url,
        proxy.url(url),
        lambda: server.restart(kill=True, down_s=DOWN_S),
        proxy.drop_connections,
    )
    target.cleanup.append(proxy.close)
    return target


@pytest.fixture(params=BROKERS)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Target]]:
    name: str = request.param
    if name == "redis":
        target = _redis(request.getfixturevalue("redis_server_aof"))
    elif name == "redis-everysec":
        target = _redis(EverysecRedis(tmp_path / "redis-everysec", appendonly=True))
    elif name == "postgres":
        target = _postgres(request.getfixturevalue("postgres_server_own"))
    else:
        target = _nats(request.getfixturevalue("nats_server_own"))
    yield name, target
    for call in reversed(target.cleanup):
        call()


@dataclass(frozen=True)
class Event:
    at_s: float
    kind: str  # BROKER_KILL or CONNECTION_KILL


def fault_schedule(seed: int) -> list[Event]:
    """A crash every ``EVERY_S`` (± 0.5 s) and ``CONNECTION_KILLS_BETWEEN`` connection kills
    evenly spaced after each."""
    rng = random.Random(seed)
    events = []
    for i in range(1, CRASHES + 1):
        crash = i * EVERY_S + rng.uniform(-0.5, 0.5)
        events.append(Event(round(crash, 3), BROKER_KILL))
        for k in range(1, CONNECTION_KILLS_BETWEEN + 1):
            at = i * EVERY_S + k * EVERY_S / (CONNECTION_KILLS_BETWEEN + 1)
            events.append(Event(round(at + rng.uniform(-0.3, 0.3), 3), CONNECTION_KILL))
    return sorted(events, key=lambda e: e.at_s)


@dataclass
class Injected:
    restarts: list[float] = field(default_factory=list)
    """time.time() at which the server accepted connections again, one per crash."""
    outages: list[tuple[float, float]] = field(default_factory=list)
    """(killed, accepting connections again), one per crash."""
    down_s: list[float] = field(default_factory=list)
    """From each kill to the server accepting connections."""
    connections_killed: list[int] = field(default_factory=list)


def inject(target: Target, ledger: Ledger, schedule: list[Event], start: float) -> Injected:
    injected = Injected()
    for event in schedule:
        delay = start + event.at_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the schedule's own timing, not a wait for some state
        if event.kind == BROKER_KILL:
            began = time.time()
            target.crash()
            back = time.time()
            ledger.record_fault(BROKER_KILL, 0, "broker", t=began, t_end=back)
            injected.restarts.append(back)
            injected.outages.append((began, back))
            injected.down_s.append(back - began)
        else:
            injected.connections_killed.append(target.kill_connections())
            ledger.record_fault(CONNECTION_KILL, 0, "worker connections", t=time.time())
    return injected


def resume_times(
    starts: dict[int, list[float]], outages: list[tuple[float, float]], end: float
) -> tuple[list[float], int]:
    """For each restart and each worker process: the restart -> its first job start before
    the next crash (or the producer's end). A process that started none by then fails (inf)
    if the server stayed up ``RESUME_BOUND_S`` or longer, and is not measured if it was down
    again sooner (a slow restart brings the next crash sooner). Also how many (restart,
    process) pairs could not be measured."""
    times, unmeasured = [], 0
    for i, (_, back) in enumerate(outages):
        until = outages[i + 1][0] if i + 1 < len(outages) else end
        for pid_starts in starts.values():
            first = min((t for t in pid_starts if back <= t < until), default=None)
            if first is not None:
                times.append(first - back)
            elif until - back >= RESUME_BOUND_S:
                times.append(float("inf"))
            else:
                unmeasured += 1
    return times, unmeasured


def longest_idle(
    starts: dict[int, list[float]], begin: float, end: float, outages: list[tuple[float, float]]
) -> float:
    """The longest span in [begin, end] in which a worker process started no job, less the
    time the server was down within it (no worker can claim then)."""
    longest = 0.0
    for pid_starts in starts.values():
        inside = sorted(t for t in pid_starts if begin <= t <= end)
        for a, b in itertools.pairwise([begin, *inside, end]):
            down = sum(max(0.0, min(b, up) - max(a, gone)) for gone, up in outages)
            longest = max(longest, b - a - down)
    return longest


@pytest.mark.timeout(sized(ci=200, full=2_400))
def test_broker_crash_and_connection_kills(target: tuple[str, Target], tmp_path: Path) -> None:
    name, t = target
    seed = seed_from_env()
    print(f"T3 seed {seed} (replay: {SEED_ENV}={seed})")
    ledger = Ledger(tmp_path / "ledger.db")
    app = App(t.url)
    app.task(name="faults.work", retries=10, backoff=0.05)(jobs.work)
    app.open()
    t.cleanup.append(app.close)
    supervisor = Supervisor(
        tmp_path,
        t.worker_url,
        ledger,
        *("-p", str(PROCESSES), "-c", str(CONCURRENCY), "--lease", str(LEASE_S)),
    )
    t.cleanup.append(supervisor.close)
    children = wait_until(
        lambda: pids if len(pids := supervisor.children()) == PROCESSES else None,
        what="the worker processes",
        timeout=30,
    )
    wait_until(
        lambda: len(app.run_sync(app.broker.list_workers())) >= PROCESSES,
        what="the worker processes to register",
        timeout=30,
    )

    schedule = fault_schedule(seed)
    over_s = (CRASHES + 1) * EVERY_S
    producer = Producer(app, ledger, JOBS, over_s=over_s, seed=seed)
    started, began = time.monotonic(), time.time()
    producer.start()
    injected = inject(t, ledger, schedule, start=started)
    producer.join(timeout=over_s + 60)
    assert not producer.is_alive(), "the producer did not finish"
    assert producer.error is None, f"the producer failed: {producer.error!r}"
    produced_until = time.time()

    records = ledger.read()
    acknowledged = {e.job_id for e in records.enqueues if e.outcome is Outcome.OK}
    last_states: dict[str, str] = {}

    def drained() -> dict[str, str] | None:
        states = final_states(app)
        done = {j for j in acknowledged if states.get(j) in TERMINAL_STATES}
        all_terminal = all(s in TERMINAL_STATES for s in states.values())
        if all_terminal and (done == acknowledged or name not in GATED):
            return states
        last_states.clear()
        last_states.update(states)
        return None

    try:
        states = wait_until(drained, what="every acknowledged job to finish", timeout=DRAIN_S)
    except TimeoutError:
        states = last_states  # the checker says what is missing
    elapsed = time.monotonic() - started
    assert supervisor.proc.poll() is None, f"the supervisor exited:\n{supervisor.output()}"
    assert supervisor.children() == children, "a worker process exited (or was restarted)"
    assert supervisor.stop(timeout=60) == 0, supervisor.output()[-5000:]

    records = ledger.read()
    result = check(records, states)
    starts: dict[int, list[float]] = {pid: [] for pid in children}
    for e in records.executions:
        starts.setdefault(e.pid, []).append(e.t_start)
    resumed, too_soon = resume_times(starts, injected.outages, end=produced_until)
    idle = longest_idle(starts, begin=began, end=produced_until, outages=injected.outages)
    unknown = sum(e.outcome is Outcome.UNKNOWN for e in records.enqueues)
    print(
        f"T3 {name}: {result.summary()}; crashes {len(injected.restarts)} (down"
        f" {min(injected.down_s):.2f}-{max(injected.down_s):.2f} s), connection kills"
        f" {len(injected.connections_killed)} ({sum(injected.connections_killed)} connections),"
        f" unknown-outcome sends {unknown}; resume after restart max"
        f" {max(resumed, default=float('nan')):.2f} s (median"
        f" {sorted(resumed)[len(resumed) // 2] if resumed else float('nan'):.2f} s, {too_soon}"
        f" not measured: down again first); longest idle (outages excluded) {idle:.2f} s;"
        f" worker exits 0; {elapsed:.1f} s"
    )
    assert len(injected.restarts) == CRASHES
    if name not in GATED:
        return  # reported, not gated
    assert result.ok, result.summary()
    assert len(resumed) >= len(children), "resuming was measured after fewer than one restart"
    assert max(resumed) <= RESUME_BOUND_S, ([round(r, 2) for r in resumed], injected.outages)
    assert idle <= IDLE_BOUND_S, idle


@pytest.mark.timeout(120)
def test_nats_listing_while_jobs_change_lists_each_job_once(nats_server: NatsServer) -> None:
    """Found by T3: a job written while ``list_jobs`` scanned the jobs bucket came twice (the
    scan's consumer goes on with new messages), and the sort then compared two records of one
    job: ``TypeError``. Each job listed is listed once, and the last listing has them all."""
    app = App(f"{nats_server.url}?prefix=t3list{uuid.uuid4().hex[:8]}")
    task = app.task(name="t3.noop")(lambda: None)
    try:
        ids = [h.id for h in task.send_many([()] * 400)]
        stop = threading.Event()

        def change() -> None:  # each cancel rewrites a job's record
            for job_id in ids:
                if stop.is_set():
                    return
                app.job(job_id).cancel()

        writer = threading.Thread(target=change, daemon=True)
        writer.start()
        try:
            while writer.is_alive():
                listed = [j.id for j in app.run_sync(app.broker.list_jobs(limit=1_000_000))]
                assert len(listed) == len(set(listed)) and set(listed) <= set(ids)
                # not == : a scan can still miss a job rewritten during it (seen once in four
                # runs; docs/reliability.md, T3)
        finally:
            stop.set()
            writer.join(30)
        states = {j.id: str(j.state) for j in app.run_sync(app.broker.list_jobs(limit=1000))}
        assert states.keys() == set(ids) and set(states.values()) == {"cancelled"}
    finally:
        app.close()
