"""T5 (docs/reliability.md): SQLite crash consistency under ``kill -9`` of random processes.

Several ``taskmill worker`` processes and producer processes (``faults.producer_main``) share
one SQLite file. About every 0.5 s (from a schedule drawn from the seed) one of them, chosen at
random, is killed with SIGKILL, wherever it is (mid-claim, mid-completion, mid-send, starting
up), and a new process of the same kind replaces it at once. After every kill the test runs
``PRAGMA integrity_check`` on the file; at the end the producers stop, the jobs drain and the
checker reads the ledger against the broker: every send that returned (ledger ``ok``) ran to
completion, nothing ran that was not sent, nothing is stuck, every duplicate is explained by a
kill. Run with taskmill's default ``synchronous=NORMAL`` and with ``synchronous=FULL``: for a
process crash they must hold alike (a commit is in the OS's page cache once it returns);
they differ only on power loss or an OS crash, which this test does not cause.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

from faults import jobs
from faults.checker import check
from faults.harness import drain
from faults.ledger import LEDGER_ENV, Ledger
from faults.processes import TESTS, Proc
from faults.producer_main import STOP_ENV
from faults.schedule import SEED_ENV, kill_schedule, seed_from_env
from faults.sizes import sized
from taskmill import App
from taskmill.testing import wait_until

KILLS = sized(ci=40, full=200)
EVERY_S = 0.5
WORKERS = 3
PRODUCERS = 2
CONCURRENCY = 4
LEASE_S = 2.0
DRAIN_S = sized(ci=60.0, full=180.0)


class Producer:
    """``python -m faults.producer_main SEED`` logging to a file in the test's directory."""

    def __init__(self, tmp_path: Path, url: str, ledger: Ledger, stop: Path, seed: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
        env.update(
            TASKMILL_URL=url,
            PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")])),
            PYTHONUNBUFFERED="1",
            **{LEDGER_ENV: str(ledger.path), STOP_ENV: str(stop)},
        )
        self.log_path = tmp_path / f"producer-{seed}.log"
        self._log: IO[bytes] = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "faults.producer_main", str(seed)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )
        self.pid = self.proc.pid

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._log.close()


def integrity(path: Path) -> str:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return "; ".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


@pytest.mark.parametrize("synchronous", ["normal", "full"])
@pytest.mark.timeout(sized(ci=150, full=900))
def test_t05_sqlite_survives_kill_9_of_random_processes(
    synchronous: str, tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    seed = seed_from_env()
    print(f"T5 seed {seed} (replay: {SEED_ENV}={seed})")
    rng = random.Random(seed)
    db = tmp_path / "broker.db"
    url = f"sqlite:///{db}?synchronous={synchronous}"
    ledger = Ledger(tmp_path / "ledger.db")
    stop = tmp_path / "stop"
    app = App(url)
    app.task(name="faults.work", retries=10, backoff=0.05)(jobs.work)
    app.open()  # the tables exist before the first process races to make them
    cleanup.append(app.close)

    workers: list[Proc] = []
    producers: list[Producer] = []
    spawned = 0

    def new_worker() -> None:
        nonlocal spawned
        spawned += 1
        args = ("-c", str(CONCURRENCY), "--lease", f"{LEASE_S:g}", "--drain-timeout", "5")
        proc = Proc(tmp_path, f"w{spawned}", url, ledger, "worker", "faults.crash_app:app", *args)
        cleanup.append(proc.close)
        workers.append(proc)

    def new_producer() -> None:
        producer = Producer(tmp_path, url, ledger, stop, rng.randrange(2**32))
        cleanup.append(producer.close)
        producers.append(producer)

    for _ in range(WORKERS):
        new_worker()
    for _ in range(PRODUCERS):
        new_producer()

    checks: list[str] = []
    killed = {"worker": 0, "producer": 0}
    start = time.monotonic()
    for kill in kill_schedule(seed, KILLS, every_s=EVERY_S, jitter_s=0.25):
        delay = start + kill.at_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the schedule's own timing, not a wait for some state
        live: list[tuple[str, int]] = [("worker", w.pid) for w in workers] + [
            ("producer", p.pid) for p in producers
        ]
        kind, pid = live[kill.target % len(live)]
        os.kill(pid, signal.SIGKILL)
        ledger.record_fault("kill -9", pid, kind, t=time.time())
        killed[kind] += 1
        if kind == "worker":
            workers[:] = [w for w in workers if w.pid != pid]
            new_worker()
        else:
            producers[:] = [p for p in producers if p.pid != pid]
            new_producer()
        checks.append(integrity(db))
    fault_s = time.monotonic() - start

    stop.touch()
    for producer in producers:
        producer.proc.wait(timeout=30)
    records = ledger.read()
    sent = {e.job_id for e in records.enqueues}
    states = drain(app, len(sent & set(_broker_ids(app))), timeout=DRAIN_S)
    # a worker that gets SIGTERM while it starts up exits -15: let each register first
    pids = {w.pid for w in workers}
    wait_until(
        lambda: pids <= {i.pid for i in app.run_sync(app.broker.list_workers())},
        what="the live workers to register",
        timeout=30,
    )
    for w in workers:
        w.proc.send_signal(signal.SIGTERM)
    codes = [w.proc.wait(timeout=30) for w in workers]
    final_check = integrity(db)
    mode = sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0]

    result = check(ledger.read(), states)
    jobs_now = app.run_sync(app.broker.list_jobs(limit=1_000_000))
    poisoned = sum(1 for j in jobs_now if j.lost_leases >= 3)
    bad = [c for c in checks if c != "ok"]
    print(
        f"T5 sqlite synchronous={synchronous} (journal {mode}): {KILLS} kills in "
        f"{fault_s:.1f} s ({killed['worker']} workers, {killed['producer']} producers); "
        f"integrity_check ok {len(checks) - len(bad)}/{len(checks)} during, final "
        f"{final_check!r}; {result.summary()}; jobs that lost 3+ leases (failed under the "
        f"default max_lost_leases) {poisoned}"
    )
    assert not bad, bad[:3]
    assert final_check == "ok"
    assert codes == [0] * len(codes)
    assert result.ok, result.summary()


def _broker_ids(app: App) -> list[str]:
    return [j.id for j in app.run_sync(app.broker.list_jobs(limit=1_000_000))]
