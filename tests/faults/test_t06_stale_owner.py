"""T6 (docs/reliability.md): a stale owner, fenced, on each broker.

Supervisor A (``taskmill worker -p 2 -c 8 --lease 2``) holds 16 running jobs
(``faults.gated``: each runs until the test releases A's runs). A's whole process group is
stopped (SIGSTOP) for at least 3 x lease; meanwhile supervisor B recovers the 16 jobs when
their leases expire and runs them to success. Still stopped, A's runs are released; then A is
resumed (SIGCONT): its 16 runs complete in the ledger, and each of their outcomes must be
refused, by the broker's fencing (``outcome ... rejected``) or by A itself (``lease lost``:
the heartbeat reply named the job lost, or A's own lease deadline had passed). Pass: 16
refused, 0 state regressions (every job's record as B left it), exactly 16 duplicate
executions in the ledger, each of them A's stale run.
"""

from __future__ import annotations

import contextlib
import os
import re
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
from faults.ledger import Enqueue, Execution, Ledger, Outcome
from faults.schedule import SEED_ENV, seed_from_env
from faults.sizes import sized
from taskmill import App, JobState
from taskmill.testing import wait_until

PROCESSES = 2
CONCURRENCY = 8
JOBS = PROCESSES * CONCURRENCY
"""Every slot of A: the plan's 16 jobs of one stopped node."""
LEASE_S = sized(ci=2.0, full=5.0)
STOP_S = 3 * LEASE_S
"""How long A stays stopped at least (3 x lease); longer if B has not finished by then."""
RECOVER_WAIT_S = sized(ci=45.0, full=120.0)


@pytest.fixture(params=BROKERS)
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from own_broker(request, tmp_path, "t6", ack_wait_s=LEASE_S)


def refusals(log: str, ids: list[str]) -> dict[str, str]:
    """Job id -> how A refused its own outcome: ``fencing`` (the broker rejected it), ``reply``
    (a heartbeat reply named the job lost) or ``deadline`` (A's own lease deadline passed)."""
    how: dict[str, str] = {}
    for job_id in ids:
        if re.search(rf"job {job_id}: outcome \w+ rejected", log):
            how[job_id] = "fencing"
        elif f"job {job_id} (faults.gated): lease lost (no heartbeat taken" in log:
            how[job_id] = "deadline"
        elif f"job {job_id} (faults.gated): lease lost;" in log:
            how[job_id] = "reply"
    return how


@pytest.mark.timeout(sized(ci=150, full=600))
def test_a_stopped_owner_s_late_outcomes_are_refused(
    broker_url: str,
    tmp_path: Path,
    cleanup: list[Callable[[], None]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed = seed_from_env()  # no random schedule here: printed for the suite's uniformity
    print(f"T6 seed {seed} (replay: {SEED_ENV}={seed})")
    gate = tmp_path / "gate"
    gate.mkdir()
    monkeypatch.setenv(jobs.GATE_ENV, str(gate))
    ledger = Ledger(tmp_path / "ledger.db")
    app = App(broker_url)
    app.open()
    cleanup.append(app.close)
    args = ["-p", str(PROCESSES), "-c", str(CONCURRENCY), "--lease", f"{LEASE_S:g}"]
    (tmp_path / "a").mkdir()
    a = Supervisor(tmp_path / "a", broker_url, ledger, *args)
    cleanup.append(a.close)
    a_pids = wait_workers(app, a, PROCESSES)

    ids = [f"f-{uuid.uuid4().hex[:16]}" for _ in range(JOBS)]
    for job_id in ids:
        app.send_task("faults.gated", [], job_id=job_id)
    ledger.record_enqueues([Enqueue(i, time.time(), Outcome.OK) for i in ids])

    def started_in(pids: list[int]) -> set[str]:
        return {e.job_id for e in ledger.read().executions if e.pid in pids}

    wait_until(
        lambda: started_in(a_pids) >= set(ids),
        what=lambda: f"A to run all {JOBS} jobs (running {len(started_in(a_pids))})",
        timeout=30,
    )
    (tmp_path / "b").mkdir()
    b = Supervisor(tmp_path / "b", broker_url, ledger, *args)
    cleanup.append(b.close)
    (gate / f"release-{b.proc.pid}").touch()  # B's runs end at once
    b_pids = wait_workers(app, b, PROCESSES)

    stopped = [a.proc.pid, *a.children()]
    os.killpg(a.proc.pid, signal.SIGSTOP)
    stopped_at = time.time()
    for pid in stopped:
        ledger.record_fault("sigstop", pid, "worker group", t=stopped_at)
    cleanup.append(lambda: _resume(a))  # a failing test must not leave a stopped group

    def all_succeeded() -> bool:
        return all(j.state is JobState.SUCCEEDED for j in jobs_of(app, ids).values())

    wait_until(
        all_succeeded,
        what=lambda: f"B to finish the 16 jobs:\n{b.output()[-3000:]}",
        timeout=RECOVER_WAIT_S,
    )
    left = stopped_at + STOP_S - time.time()
    if left > 0:
        time.sleep(left)  # the fault's length (3 x lease), not a wait for some state
    before = jobs_of(app, ids)
    (gate / f"release-{a.proc.pid}").touch()  # A's runs end the moment it resumes
    resumed_at = time.time()
    os.killpg(a.proc.pid, signal.SIGCONT)
    ledger.record_fault("sigcont", a.proc.pid, "worker group", t=resumed_at)

    def a_ended() -> bool:
        ends = {e.job_id for e in ledger.read().executions if e.pid in a_pids and e.t_end}
        return ends >= set(ids)

    wait_until(a_ended, what="A's runs to end", timeout=30)
    wait_until(
        lambda: len(refusals(a.output(), ids)) == JOBS,
        what=lambda: f"A to refuse its 16 outcomes:\n{a.output()[-4000:]}",
        timeout=30,
    )
    wait_until(
        lambda: any(
            w.pid in a_pids and w.heartbeat_at > resumed_at
            for w in app.run_sync(app.broker.list_workers())
        ),
        what="A to heartbeat again",
        timeout=30,
    )
    after = jobs_of(app, ids)
    assert a.stop() == 0, a.output()
    assert b.stop() == 0, b.output()

    how = refusals(a.output(), ids)
    regressions = [
        i
        for i in ids
        if (after[i].state, after[i].finished_at, after[i].worker_id, after[i].attempt)
        != (before[i].state, before[i].finished_at, before[i].worker_id, before[i].attempt)
        or after[i].state is not JobState.SUCCEEDED
    ]
    records = ledger.read()
    result = check(records, final_states(app))
    stale = stale_runs(records.executions, ids, a_pids, stopped_at)
    b_starts = [e.t_start - stopped_at for e in records.executions if e.pid in b_pids]
    counts = {k: sum(1 for v in how.values() if v == k) for k in ("fencing", "reply", "deadline")}
    print(
        f"T6 {broker_url.split(':', 1)[0]}: {JOBS} jobs; stopped "
        f"{resumed_at - stopped_at:.1f} s; B started them {min(b_starts):.1f}-{max(b_starts):.1f}"
        f" s after the stop; A's outcomes refused {len(how)}/{JOBS} (fencing "
        f"{counts['fencing']}, heartbeat reply {counts['reply']}, A's own lease deadline "
        f"{counts['deadline']}); state regressions {len(regressions)}; duplicates "
        f"{result.duplicates}, stale {len(stale)}; {result.summary()}"
    )
    assert len(how) == JOBS
    assert not regressions, {i: (before[i], after[i]) for i in regressions}
    assert not (result.lost or result.unexpected or result.stuck), result.summary()
    assert not result.unexplained_interruptions, result.summary()
    assert result.duplicates == JOBS and set(result.duplicated) == set(ids), result.summary()
    # no kill explains these duplicates: each is A's run from before the stop, made stale
    assert set(result.unexplained_duplicates) == set(ids)
    assert sorted(stale) == sorted(ids)
    assert all(after[i].worker_id is not None for i in ids)
    assert not any(e.job_id in ids for e in records.executions if e.pid not in a_pids + b_pids)


def stale_runs(
    executions: list[Execution], ids: list[str], stopped_pids: list[int], stopped_at: float
) -> list[str]:
    """The jobs whose first completed execution ran in a stopped process from before the
    stop, and whose next execution started after it elsewhere: a stale owner's run."""
    stale = []
    for job_id in ids:
        runs = sorted((e for e in executions if e.job_id == job_id), key=lambda e: e.t_start)
        if (
            len(runs) == 2
            and runs[0].pid in stopped_pids
            and runs[0].t_start < stopped_at < runs[1].t_start
            and runs[1].pid not in stopped_pids
            and all(r.t_end is not None for r in runs)
        ):
            stale.append(job_id)
    return stale


def _resume(supervisor: Supervisor) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(supervisor.proc.pid, signal.SIGCONT)
