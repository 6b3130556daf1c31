"""T4 (docs/reliability.md): the broker came back empty, on Redis and NATS.

A ``taskmill worker -p 2 --metrics-port PORT`` supervisor runs jobs on a server of the test's
own; then the server loses its data: Redis is killed and started again without persistence,
NATS is killed, its store directory deleted, and started again. Each worker process must find
the store's epoch marker gone (``Broker.epoch``) and say so at CRITICAL within
``DETECT_BOUND_S`` of the server accepting connections, the metric
``taskmill_worker_broker_came_back_empty_total`` must count it, and the workers must keep
running: no worker process exits, and a job sent afterwards runs (on NATS, by a producer that
ran before the wipe: it must make the dispatch consumers it made before again). A plain restart
of a durable server (nothing lost) must raise no alarm. SQLite and PostgreSQL keep no marker: their
storage cannot vanish unnoticed (a missing file or schema fails every call).
"""

from __future__ import annotations

import re
import shutil
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from faults import jobs
from faults.harness import Supervisor
from faults.ledger import Ledger
from faults.sizes import sized
from servers import NatsServer, RedisServer, free_port
from taskmill import App
from taskmill.testing import wait_until

PROCESSES = 2
DETECT_BOUND_S = 5.0
ROUNDS = sized(ci=1, full=5)
"""Times the server loses its data in one run."""
CRITICAL = "the broker came back empty"
STARTED = " started: queues="
"""The log line of a worker that has opened the broker and is starting its loops."""
METRIC = "taskmill_worker_broker_came_back_empty_total"

pytestmark = pytest.mark.timeout(sized(ci=120, full=600))


@pytest.fixture(params=["redis", "nats"])
def server(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, str, Callable[[], None]]]:
    """(name, URL, wipe): ``wipe`` kills the server and starts it again with its data gone."""
    name: str = request.param
    if name == "redis":
        redis = RedisServer(tmp_path / "redis", appendonly=False)  # no persistence at all
        redis.start()
        yield (
            name,
            f"{redis.url}?prefix=t4{uuid.uuid4().hex[:8]}:",
            lambda: redis.restart(kill=True),
        )
        redis.kill()
    else:
        nats = NatsServer(tmp_path / "nats", sync_always=True)
        nats.start()

        def wipe() -> None:
            nats.kill()
            shutil.rmtree(nats.store_dir)
            nats.start()

        yield name, f"{nats.url}?prefix=t4{uuid.uuid4().hex[:8]}&ack_wait=2", wipe
        nats.kill()


def metric(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return -1.0
    found = re.search(rf"^{METRIC} (\S+)$", text, re.M)
    return float(found.group(1)) if found else -1.0


def test_a_broker_that_came_back_empty_is_reported(
    server: tuple[str, str, Callable[[], None]], tmp_path: Path
) -> None:
    name, url, wipe = server
    ledger = Ledger(tmp_path / "ledger.db")
    port = free_port()
    supervisor = Supervisor(
        tmp_path, url, ledger, "-p", str(PROCESSES), "--lease", "5", "--metrics-port", str(port)
    )
    app = App(url)
    work = app.task(name="faults.work", retries=10, backoff=0.05)(jobs.work)
    try:
        children = wait_until(
            lambda: pids if len(pids := supervisor.children()) == PROCESSES else None,
            what="the worker processes",
            timeout=30,
        )
        # each worker has opened the broker (and read the marker at its start) before the
        # wipe: a worker that opens after it finds the new store's marker and has nothing to say
        wait_until(
            lambda: supervisor.output().count(STARTED) >= PROCESSES,
            what=lambda: f"{PROCESSES} workers started:\n{supervisor.output()[-3000:]}",
            timeout=30,
        )
        assert work.send(1).result(timeout=30) is None
        wait_until(lambda: metric(port) == 0.0, what="the metric at 0", timeout=30)
        detections: list[float] = []
        for round_ in range(1, ROUNDS + 1):
            wipe()
            back = time.monotonic()

            def reported(expected: int = round_ * PROCESSES) -> bool:
                return supervisor.output().count(CRITICAL) >= expected

            wait_until(
                reported,
                what=lambda: f"each worker to report it:\n{supervisor.output()[-3000:]}",
                timeout=30,
                interval=0.05,
            )
            detections.append(time.monotonic() - back)
            want = round_ * PROCESSES
            wait_until(
                lambda want=want: metric(port) >= want,  # type: ignore[misc]
                what=lambda want=want: f"{METRIC} = {want} (now {metric(port)})",  # type: ignore[misc]
                timeout=10,
            )
            if name == "redis":  # the workers run on: a job sent now runs (NATS: below)
                assert work.send(2).result(timeout=30) is None
        lines = [line for line in supervisor.output().splitlines() if CRITICAL in line]
        print(
            f"T4 {name}: {ROUNDS} wipes, reported by each of {PROCESSES} worker processes after"
            f" {', '.join(f'{d:.2f}' for d in detections)} s (bound {DETECT_BOUND_S:g} s);"
            f" {METRIC} {metric(port):g}; worker exits 0;"
            f" e.g. {lines[0].split('] ', 1)[-1]!r}"
        )
        assert all("CRITICAL" in line for line in lines)
        assert max(detections) <= DETECT_BOUND_S
        assert supervisor.children() == children, "a worker process exited"
        assert supervisor.stop(timeout=60) == 0
    finally:
        app.close()
        supervisor.close()


def test_a_durable_restart_raises_no_alarm(redis_server_aof: RedisServer, tmp_path: Path) -> None:
    """Nothing lost, nothing said: the marker survives a restart with ``appendfsync always``."""
    url = f"{redis_server_aof.url}?prefix=t4aof{uuid.uuid4().hex[:8]}:"
    ledger = Ledger(tmp_path / "ledger.db")
    supervisor = Supervisor(tmp_path, url, ledger, "-p", "1", "--lease", "5")
    app = App(url)
    work = app.task(name="faults.work", retries=10, backoff=0.05)(jobs.work)
    try:
        assert work.send(1).result(timeout=30) is None
        redis_server_aof.restart(kill=True)
        assert work.send(2).result(timeout=30) is None
        # the marker is read every second: let three reads pass after the job ran
        deadline = time.monotonic() + 3
        wait_until(lambda: time.monotonic() >= deadline, what="three epoch reads", timeout=5)
        assert CRITICAL not in supervisor.output()
        assert supervisor.stop(timeout=60) == 0
    finally:
        app.close()
        supervisor.close()


def test_nats_a_job_sent_after_a_wipe_runs(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path / "nats", sync_always=True)
    nats.start()
    url = f"{nats.url}?prefix=t4run{uuid.uuid4().hex[:8]}&ack_wait=2"
    supervisor = Supervisor(tmp_path, url, Ledger(tmp_path / "ledger.db"), "-p", "1")
    app = App(url)
    work = app.task(name="faults.work", retries=10, backoff=0.05)(jobs.work)
    try:
        assert work.send(1).result(timeout=30) is None
        nats.kill()
        shutil.rmtree(nats.store_dir)
        nats.start()
        wait_until(lambda: CRITICAL in supervisor.output(), what="the report", timeout=30)
        assert work.send(2).result(timeout=15) is None
    finally:
        app.close()
        supervisor.close()
        nats.kill()
