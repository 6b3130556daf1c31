"""T14 (docs/reliability.md): leases renewed while a worker drains, on each broker.

Supervisor A (``taskmill worker -p 1 -c 8 --lease 2 --drain-timeout 30``) runs 8 jobs of 10 s
(5 x lease) and gets SIGTERM once its 8 runs have started: it drains, and its runs outlive
their lease several times over. Supervisor B starts right after the signal (it must not start
before: it would take jobs from A) and runs beside the drain, its lease recovery scanning
every second, ready to take any job whose lease expires. Pass: every job succeeds, on A,
once: 0 reclaimed by B, 0 duplicates (the Celery < 5.6 failure: a draining worker stopped
renewing, and its jobs ran twice).
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from faults.checker import check
from faults.harness import Supervisor, final_states
from faults.lease_support import BROKERS, jobs_of, own_broker, wait_workers
from faults.ledger import Enqueue, Ledger, Outcome
from faults.schedule import SEED_ENV, seed_from_env
from faults.sizes import sized
from taskmill import App, JobState
from taskmill.testing import wait_until

JOBS = sized(ci=8, full=16)
JOB_S = sized(ci=10.0, full=30.0)
LEASE_S = sized(ci=2.0, full=5.0)
DRAIN_S = sized(ci=30.0, full=60.0)
"""Longer than the jobs: the drain waits for them all."""


@pytest.fixture(params=BROKERS)
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from own_broker(request, tmp_path, "t14")


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], None]]]:
    calls: list[Callable[[], None]] = []
    yield calls
    for call in reversed(calls):
        call()


@pytest.mark.timeout(sized(ci=120, full=300))
def test_a_draining_worker_keeps_its_leases(
    broker_url: str, tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    seed = seed_from_env()  # no random schedule here: printed for the suite's uniformity
    print(f"T14 seed {seed} (replay: {SEED_ENV}={seed})")
    ledger = Ledger(tmp_path / "ledger.db")
    app = App(broker_url)
    app.open()
    cleanup.append(app.close)
    lease = ["--lease", f"{LEASE_S:g}"]
    (tmp_path / "a").mkdir()
    a = Supervisor(
        tmp_path / "a", broker_url, ledger, "-p", "1", "-c", str(JOBS), *lease,
        "--drain-timeout", f"{DRAIN_S:g}",
    )  # fmt: skip
    cleanup.append(a.close)
    a_pids = wait_workers(app, a, 1)

    ids = [f"f-{uuid.uuid4().hex[:16]}" for _ in range(JOBS)]
    for job_id in ids:
        app.send_task("faults.work", [int(JOB_S * 1000)], job_id=job_id)
    ledger.record_enqueues([Enqueue(i, time.time(), Outcome.OK) for i in ids])
    wait_until(
        lambda: {e.job_id for e in ledger.read().executions if e.pid in a_pids} >= set(ids),
        what=f"A to run all {JOBS} jobs",
        timeout=30,
    )
    first_start = min(e.t_start for e in ledger.read().executions)
    termed = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    (tmp_path / "b").mkdir()
    b = Supervisor(tmp_path / "b", broker_url, ledger, "-p", "1", "-c", str(JOBS), *lease)
    cleanup.append(b.close)
    b_pids = wait_workers(app, b, 1)
    b_up = time.time()
    a_code = a.proc.wait(timeout=DRAIN_S + 15)
    drained_s = time.monotonic() - termed
    assert a_code == 0, a.output()
    jobs = jobs_of(app, ids)
    records = ledger.read()
    result = check(records, final_states(app))
    by_b = [e.job_id for e in records.executions if e.pid in b_pids]
    assert b.stop() == 0, b.output()
    ran_s = max(e.t_end or 0.0 for e in records.executions) - first_start
    print(
        f"T14 {broker_url.split(':', 1)[0]}: {JOBS} jobs of {JOB_S:g} s, lease {LEASE_S:g} s; "
        f"A drained for {drained_s:.1f} s ({drained_s / LEASE_S:.1f} x lease), B up "
        f"{b_up - first_start:.1f} s after the first start, jobs ran "
        f"{ran_s:.1f} s from the first start; reclaimed by B {len(by_b)}; duplicates "
        f"{result.duplicates}; {result.summary()}"
    )
    # B watched long enough: up before the jobs' leases would have expired twice over
    assert drained_s > 2 * LEASE_S, "the drain did not outlast two leases: nothing was tested"
    assert b_up - first_start < JOB_S - 2 * LEASE_S, "B came up too late to reclaim anything"
    assert not by_b, f"B ran {by_b}"
    assert result.ok and result.duplicates == 0, result.summary()
    assert all(jobs[i].state is JobState.SUCCEEDED and jobs[i].attempt == 1 for i in ids), jobs
    assert all(jobs[i].lost_leases == 0 for i in ids), jobs
