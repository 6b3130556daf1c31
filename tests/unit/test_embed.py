"""A worker inside another program (``app.worker()`` on the current loop, ``app.worker_thread()``
on a thread), worker names, and the worker's start while the broker cannot be reached.

The brokers here are memory brokers whose ``open`` (or ``attach``) fails on purpose: the retry
and error paths they drive are the worker's, the same for every broker.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Iterator, Sequence

import pytest

from taskmill import App, BrokerError, BrokerUnavailableError, ConfigurationError, JobState
from taskmill.brokers.base import HeartbeatReply
from taskmill.brokers.memory import MemoryBroker
from taskmill.job import Claim, WorkerInfo
from taskmill.testing import await_until, wait_until
from taskmill.worker import Worker, opening
from taskmill.worker.names import check_name, name_of
from taskmill.worker.process import worker_health
from taskmill.worker.supervisor import Pool, Supervisor

GATE_LIMIT_S = 20.0


class FlakyOpen(MemoryBroker):
    """A memory broker whose first ``failures`` opens raise ``error``."""

    def __init__(self, failures: int, error: BrokerError) -> None:
        super().__init__()
        self.failures = failures
        self.error = error
        self.opens = 0

    async def open(self) -> None:
        self.opens += 1
        if self.opens <= self.failures:
            raise self.error
        await super().open()


class AttachFailsOnCue(MemoryBroker):
    """Opens fine; ``attach`` (the worker's next step) fails once ``fail`` is set: an error
    that ends a worker after its start."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = asyncio.Event()

    async def attach(self) -> None:
        await self.fail.wait()
        raise RuntimeError("attach broke")


class HeartbeatOnCue(MemoryBroker):
    """Takes no heartbeat until ``beat`` is set (from any thread): a worker whose first
    heartbeat is slow, or that is stuck before it."""

    def __init__(self) -> None:
        super().__init__()
        self.beat = threading.Event()

    async def heartbeat(
        self, worker: WorkerInfo, claims: Sequence[Claim], lease_s: float
    ) -> HeartbeatReply:
        await asyncio.to_thread(self.beat.wait, GATE_LIMIT_S)
        return await super().heartbeat(worker, claims, lease_s)


@pytest.fixture
def app() -> Iterator[App]:
    app = App("memory://", heartbeat_s=0.2)
    yield app
    app.close()


def use_broker(app: App, broker: MemoryBroker) -> None:
    app.client.use_broker(broker)


@pytest.fixture
def quick_start_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(opening, "RETRY_FIRST_S", 0.01)


def start_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "cannot reach the broker at start" in r.getMessage()]


# --- async with app.worker() ----------------------------------------------------------------------


async def test_async_worker_runs_jobs_on_this_loop_and_drains_on_exit(app: App) -> None:
    go = threading.Event()

    @app.task(name="gate")
    def gate() -> str:
        return "done" if go.wait(GATE_LIMIT_S) else "gate never opened"

    @app.task(name="double")
    async def double(x: int) -> int:
        return 2 * x

    async with app.worker(concurrency=2) as w:
        assert w.running and w.worker.queues == app.queues()
        handle = await double.asend(21)
        assert await handle.aresult(timeout=5) == 42
        gated = await gate.asend()

        async def gate_running() -> bool:
            return await gated.astatus() is JobState.RUNNING

        await await_until(gate_running, what="the gate job to run")
        # the block exits while the job runs: leaving must wait for it (a drain), not hand
        # it back; the gate opens once the exit is under way
        asyncio.get_running_loop().call_later(0.2, go.set)
    assert not w.running and not w.healthy
    job = await gated.ainfo()
    assert (job.state, await gated.aresult(timeout=1)) == (JobState.SUCCEEDED, "done")
    assert await (await app.abroker()).list_workers() == []  # signed off


async def test_async_worker_start_error_raises_on_enter() -> None:
    app = App("nosuch://anywhere")
    with pytest.raises(ConfigurationError, match="nosuch"):
        async with app.worker():
            pytest.fail("the block must not run")


async def test_async_worker_error_after_start_is_logged_at_once_and_raised_on_exit(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    broker = AttachFailsOnCue()
    use_broker(app, broker)
    w = await app.worker().start()
    broker.fail.set()
    assert w._task is not None
    await asyncio.wait([w._task], timeout=5)
    assert not w.running
    logged = [r for r in caplog.records if "stopped by an error" in r.getMessage()]
    assert logged and logged[0].levelno == logging.ERROR  # at once, not only on exit
    with pytest.raises(RuntimeError, match="attach broke"):
        await w.__aexit__(None, None, None)


async def test_the_blocks_own_error_wins_over_the_workers(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    broker = AttachFailsOnCue()
    use_broker(app, broker)

    async def block() -> None:
        async with app.worker() as w:
            broker.fail.set()
            assert w._task is not None
            await asyncio.wait([w._task], timeout=5)
            raise KeyError("the block's")

    with pytest.raises(KeyError, match="the block's"):
        await block()
    assert any("also failed while its block raised" in r.getMessage() for r in caplog.records)


async def test_async_worker_is_healthy_from_its_start_until_a_heartbeat_is_overdue(
    app: App,
) -> None:
    broker = HeartbeatOnCue()
    use_broker(app, broker)
    async with app.worker() as w:
        # a probe right after start-up: no heartbeat yet, but none is due yet either
        assert w.worker.last_heartbeat_ok is None and w.healthy
        # still none three intervals (0.6 s) later: stuck
        await await_until(lambda: not w.healthy, what="the worker to be overdue")
        broker.beat.set()
        await await_until(lambda: w.healthy, what="healthy after the first heartbeat")
    assert not w.healthy


# --- app.worker_thread() --------------------------------------------------------------------------


def test_thread_worker_runs_jobs_reports_health_and_stops(app: App) -> None:
    @app.task(name="double")
    def double(x: int) -> int:
        return 2 * x

    w = app.worker_thread(concurrency=2, name="embedded").start()
    try:
        assert w.running and name_of(w.id) == "embedded"
        assert double.send(21).result(timeout=5) == 42
        # the first heartbeat follows the start
        wait_until(lambda: w.healthy, timeout=5, what="the first heartbeat")
    finally:
        w.stop(timeout=10)
    assert not w.running and not w.healthy
    with pytest.raises(RuntimeError, match="started already"):
        w.start()


def test_thread_worker_is_healthy_from_its_start_until_a_heartbeat_is_overdue(app: App) -> None:
    broker = HeartbeatOnCue()
    use_broker(app, broker)
    with app.worker_thread() as w:
        assert w.worker.last_heartbeat_ok is None and w.healthy
        wait_until(lambda: not w.healthy, what="the worker to be overdue")
        broker.beat.set()
        wait_until(lambda: w.healthy, what="healthy after the first heartbeat")


def test_the_liveness_endpoints_status_counts_a_start_as_healthy(app: App) -> None:
    w = Worker(app)  # never run: no heartbeat comes
    status = worker_health(w)
    healthy, details = status()
    assert healthy and details["status"] == "starting"
    wait_until(lambda: not status()[0], what="the worker to be overdue")
    assert status()[1]["status"] == "no heartbeat"


def test_a_supervisors_new_child_is_healthy_until_its_heartbeat_is_overdue() -> None:
    child = [sys.executable, "-c", "import time; time.sleep(60)"]
    supervisor = Supervisor([Pool(child, 1)], heartbeat_max_age_s=0.5)
    slot = supervisor.slots[0]
    supervisor._spawn(slot)
    try:
        healthy, details = supervisor.health()
        assert healthy and details["processes"][0]["status"] == "starting"
        wait_until(lambda: not supervisor.health()[0], what="the child to be overdue")
        assert supervisor.health()[1]["processes"][0]["status"] == "no heartbeat"
    finally:
        supervisor._kill_all()


def test_thread_worker_start_error_raises_from_start() -> None:
    app = App("nosuch://anywhere")
    with pytest.raises(ConfigurationError, match="nosuch"), app.worker_thread():
        pytest.fail("the block must not run")


def test_thread_worker_stop_times_out_while_a_job_drains_then_stops(app: App) -> None:
    go = threading.Event()

    @app.task(name="gate")
    def gate() -> str:
        return "done" if go.wait(GATE_LIMIT_S) else "gate never opened"

    w = app.worker_thread().start()
    handle = gate.send()
    wait_until(lambda: handle.status() is JobState.RUNNING, timeout=5, what="the job to run")
    with pytest.raises(TimeoutError, match="still running"):
        w.stop(timeout=0.2)
    assert w.running
    go.set()
    assert handle.result(timeout=5) == "done"
    w.stop(timeout=10)
    assert not w.running


# --- the start: retry while unreachable, not otherwise --------------------------------------------


@pytest.mark.usefixtures("quick_start_retries")
def test_an_unreachable_broker_is_retried_at_start_with_a_warning_each_time(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    broker = FlakyOpen(2, BrokerUnavailableError("Redis at there did not answer"))
    use_broker(app, broker)

    @app.task(name="double")
    def double(x: int) -> int:
        return 2 * x

    with app.worker_thread():
        assert double.send(4).result(timeout=5) == 8
    assert broker.opens == 3
    warnings = start_warnings(caplog)
    assert [r.levelno for r in warnings] == [logging.WARNING] * 2
    assert all("Redis at there did not answer" in r.getMessage() for r in warnings)
    assert "retrying in 0.0 s" in warnings[0].getMessage()  # 0.01 s, then doubling


@pytest.mark.usefixtures("quick_start_retries")
def test_a_permanent_broker_error_at_start_is_raised_at_once(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    broker = FlakyOpen(5, BrokerError("the database file is read-only"))
    use_broker(app, broker)
    with pytest.raises(BrokerError, match="read-only"):
        app.worker_thread().start()
    assert broker.opens == 1 and start_warnings(caplog) == []


@pytest.mark.usefixtures("quick_start_retries")
def test_max_start_wait_gives_up(app: App) -> None:
    use_broker(app, FlakyOpen(10**6, BrokerUnavailableError("down")))
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match=r"gave up reaching the broker after 0.3 s"):
        app.worker_thread(max_start_wait_s=0.3).start()
    assert time.monotonic() - started < 5


async def test_a_stop_ends_the_start_retries_at_once(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(opening, "RETRY_FIRST_S", 30.0)
    broker = FlakyOpen(10**6, BrokerUnavailableError("down"))
    use_broker(app, broker)
    worker = Worker(app)
    task = asyncio.create_task(worker.run())
    await await_until(lambda: broker.opens, what="the worker's first try to open the broker")
    worker.stop()
    async with asyncio.timeout(5):  # not the 30 s back-off
        assert await task == 0
    assert not worker.connected.is_set()


# --- a lease of its own ---------------------------------------------------------------------------


def test_an_embedded_worker_may_take_a_lease_of_its_own() -> None:
    app = App("memory://")  # a 30 s lease, 2 s heartbeats
    go = threading.Event()

    @app.task(name="gate")
    def gate() -> bool:
        return go.wait(GATE_LIMIT_S)

    try:
        with app.worker_thread(lease_s=3) as w:
            # the heartbeat and recovery intervals follow the lease
            assert (w.worker.lease_s, w.worker.heartbeat_s) == (3, 1.0)
            assert w.worker.settings.effective_recover_interval_s == 1.5
            handle = gate.send()
            wait_until(lambda: handle.status() is JobState.RUNNING, what="the job to run")
            expires = handle.info().lease_expires_at
            assert expires is not None and 0 < expires - time.time() <= 3
            go.set()
            assert handle.result(timeout=10) is True
    finally:
        go.set()
        app.close()


def test_a_lease_the_settings_refuse_is_refused_by_name() -> None:
    app = App("memory://", heartbeat_s=2)
    with pytest.raises(ConfigurationError, match=r"shorter than lease_s \(here heartbeat_s=2, "):
        app.worker(lease_s=2)
    with pytest.raises(ConfigurationError, match="lease_s must be > 0"):
        app.worker_thread(lease_s=0)


# --- names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "two words", "a@b", "-leading", "x" * 65, "é"])
def test_invalid_worker_names_are_refused(app: App, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid worker name"):
        check_name(bad)
    with pytest.raises(ValueError, match="invalid worker name"):
        Worker(app, name=bad)


def test_a_named_workers_id_carries_its_name(app: App) -> None:
    a, b = Worker(app, name="render-1"), Worker(app, name="render-1")
    assert name_of(a.id) == name_of(b.id) == "render-1"
    assert a.id != b.id and a.id.startswith("render-1@")
    assert name_of(Worker(app).id) is None
