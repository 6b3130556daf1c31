"""T14 (docs/reliability.md): leases renewed while a worker drains, on each broker.

Supervisor B (``taskmill worker -p 2 -c 4 --lease 2``) starts first, its 8 slots filled with
jobs of its own (``faults.gated``) so that it takes none of A's. Supervisor A (``taskmill
worker -p 1 -c 8 --lease 2 --drain-timeout 30``) then runs 8 jobs of 8 s (4 x lease) and gets
SIGTERM once its 8 runs have started: it drains, its runs outliving their lease several times
over; at the signal B's own jobs are released, so B, its lease recovery scanning every second,
has free slots for any job whose lease expires. Pass: every job succeeds, on A,
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

from faults import jobs
from faults.checker import check
from faults.harness import Supervisor, final_states
from faults.lease_support import BROKERS, jobs_of, own_broker, wait_workers
from faults.ledger import Enqueue, Ledger, Outcome
from faults.schedule import SEED_ENV, seed_from_env
from faults.sizes import sized
from taskmill import App, JobState
from taskmill.testing import wait_until

JOBS = sized(ci=8, full=16)
JOB_S = sized(ci=8.0, full=30.0)
LEASE_S = sized(ci=2.0, full=5.0)
DRAIN_S = sized(ci=30.0, full=60.0)
"""Longer than the jobs: the drain waits for them all."""


@pytest.fixture(params=BROKERS)
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from own_broker(request, tmp_path, "t14", ack_wait_s=LEASE_S)


@pytest.mark.timeout(sized(ci=120, full=300))
def test_a_draining_worker_keeps_its_leases(
    broker_url: str,
    tmp_path: Path,
    cleanup: list[Callable[[], None]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed = seed_from_env()  # no random schedule here: printed for the suite's uniformity
    print(f"T14 seed {seed} (replay: {SEED_ENV}={seed})")
    gate = tmp_path / "gate"
    gate.mkdir()
    monkeypatch.setenv(jobs.GATE_ENV, str(gate))
    ledger = Ledger(tmp_path / "ledger.db")
    app = App(broker_url)
    app.open()
    cleanup.append(app.close)
    lease = ["--lease", f"{LEASE_S:g}"]

    # B first, its slots filled with jobs of its own: up and scanning, taking none of A's
    (tmp_path / "b").mkdir()
    b = Supervisor(tmp_path / "b", broker_url, ledger, "-p", "2", "-c", str(JOBS // 2), *lease)
    cleanup.append(b.close)
    b_pids = wait_workers(app, b, 2)
    fillers = send(app, ledger, "faults.gated", [], JOBS)
    wait_until(lambda: started_in(ledger, b_pids) >= set(fillers), what="B full", timeout=30)

    (tmp_path / "a").mkdir()
    a = Supervisor(
        tmp_path / "a", broker_url, ledger, "-p", "1", "-c", str(JOBS), *lease,
        "--drain-timeout", f"{DRAIN_S:g}",
    )  # fmt: skip
    cleanup.append(a.close)
    a_pids = wait_workers(app, a, 1)
    ids = send(app, ledger, "faults.work", [int(JOB_S * 1000)], JOBS)
    wait_until(
        lambda: started_in(ledger, a_pids) >= set(ids), what=f"A to run {JOBS} jobs", timeout=30
    )
    first_start = min(e.t_start for e in ledger.read().executions if e.job_id in ids)
    termed = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    (gate / f"release-{b.proc.pid}").touch()  # B's slots free: it takes what comes back
    a_code = a.proc.wait(timeout=DRAIN_S + 15)
    drained_s = time.monotonic() - termed
    assert a_code == 0, a.output()
    got = jobs_of(app, ids)
    wait_until(
        lambda: all(j.state is JobState.SUCCEEDED for j in jobs_of(app, fillers).values()),
        what="B's own jobs to finish",
        timeout=30,
    )
    assert b.stop() == 0, b.output()
    records = ledger.read()
    result = check(records, final_states(app))
    by_b = [e.job_id for e in records.executions if e.pid in b_pids and e.job_id in ids]
    ran_s = max(e.t_end or 0.0 for e in records.executions if e.job_id in ids) - first_start
    print(
        f"T14 {broker_url.split(':', 1)[0]}: {JOBS} jobs of {JOB_S:g} s, lease {LEASE_S:g} s; "
        f"A drained for {drained_s:.1f} s ({drained_s / LEASE_S:.1f} x lease), jobs ran "
        f"{ran_s:.1f} s from the first start; reclaimed by B {len(by_b)}; duplicates "
        f"{result.duplicates}; {result.summary()}"
    )
    assert drained_s > 2 * LEASE_S, "the drain did not outlast two leases: nothing was tested"
    assert not by_b, f"B ran {by_b}"
    assert result.ok and result.duplicates == 0, result.summary()
    assert all(got[i].state is JobState.SUCCEEDED and got[i].attempt == 1 for i in ids), got
    assert all(got[i].lost_leases == 0 for i in ids), got


def send(app: App, ledger: Ledger, task: str, args: list[object], count: int) -> list[str]:
    """Send ``count`` jobs of ``task``, recorded in the ledger; their ids."""
    ids = [f"f-{uuid.uuid4().hex[:16]}" for _ in range(count)]
    for job_id in ids:
        app.send_task(task, args, job_id=job_id)
    ledger.record_enqueues([Enqueue(i, time.time(), Outcome.OK) for i in ids])
    return ids


def started_in(ledger: Ledger, pids: list[int]) -> set[str]:
    """The jobs with an execution started in one of ``pids``."""
    return {e.job_id for e in ledger.read().executions if e.pid in pids}
