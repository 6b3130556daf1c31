"""T18 (docs/reliability.md): worker processes whose clocks are 30 s off the broker's.

Two ``taskmill worker --lease 2`` processes, one 30 s ahead of the machine's clock and one
30 s behind (libfaketime preloaded: their wall clock is off, their monotonic clock is not),
run short jobs, jobs of 3 s (longer than the lease: they live on heartbeats) and jobs sent
with a delay. Mid-run the fast worker is killed (SIGKILL) and restarted. The checker reads
the ledger (each execution's times corrected by its process's offset, so all are on the
machine's clock) against the broker:

- no duplicate that the kill does not explain (a lease recovered early because a worker's
  clock runs ahead is such a duplicate), or the holder's own log: a worker that could not
  take a heartbeat within the lease gives its jobs up and says so (docs/guarantees.md), which
  a CPU-starved worker on a loaded machine does, skew or not;
- the jobs the kill orphaned start again within lease + 2 s of it (a recovery judged by a
  clock that runs behind would come 30 s late);
- no delayed job starts before its ``run_at`` (the broker's clock).

Redis, PostgreSQL and NATS keep time on the server (``server_clock``), so the offsets must
not matter. SQLite has no server: each process compares leases and ``run_at`` with its own
clock, so a worker 30 s ahead recovers running jobs early and runs delayed jobs early; the
SQLite case is pinned as a strict xfail that says so.
"""

from __future__ import annotations

import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from faults.broker_urls import ALL_BROKERS, BrokerUnderTest, broker_under_test
from faults.checker import check
from faults.harness import drain
from faults.ledger import Enqueue, Ledger, Outcome, Records
from faults.processes import Proc
from faults.schedule import SEED_ENV, seed_from_env
from faults.sizes import sized
from taskmill import App
from taskmill.testing import wait_until

OFFSET_S = 30.0
LEASE_S = 2.0
CONCURRENCY = 8
SHORT = sized(ci=400, full=20_000)
LONG = sized(ci=6, full=60)
LONG_S = 3.0
DELAYED = sized(ci=30, full=600)
LOAD_S = sized(ci=10.0, full=300.0)
KILL_AT_S = 4.0
RECOVERY_BOUND_S = LEASE_S + 2.0
NATS_RECOVERY_BOUND_S = LEASE_S + 10.0
"""NATS recovers a dead worker's jobs in 3-6 s with a 2 s lease without any skew (T1), once in
10 s here: the plan's lease + 2 s is not NATS's today, skew or not. Its bound here still
catches what skew would do (a recovery judged by a clock 30 s behind comes 30 s late)."""


@pytest.fixture(
    params=[
        pytest.param(
            "sqlite",
            marks=pytest.mark.xfail(
                strict=True,
                reason="SQLite has no server clock: each process judges leases and run_at "
                "by its own clock, so a worker 30 s ahead recovers live leases and starts "
                "delayed jobs early (one machine has one clock; only a faked one differs)",
            ),
        ),
        *[b for b in ALL_BROKERS if b != "sqlite"],
    ]
)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerUnderTest]:
    with broker_under_test(request, tmp_path, request.param, "t18") as b:
        yield b


def on_machine_clock(records: Records, offsets: dict[int, float]) -> Records:
    """``records`` with each execution's times taken back to the machine's clock."""
    fixed = []
    for e in records.executions:
        off = offsets.get(e.pid, 0.0)
        end = None if e.t_end is None else e.t_end - off
        fixed.append(replace(e, t_start=e.t_start - off, t_end=end))
    return Records(records.enqueues, fixed, records.faults)


def running_in(ledger: Ledger, pid: int) -> Callable[[], bool]:
    """Whether process ``pid`` is running a job now (an execution started and not ended)."""
    return lambda: any(e.pid == pid and e.t_end is None for e in ledger.read().executions)


@pytest.mark.timeout(sized(ci=150, full=900))
def test_t18_workers_with_skewed_clocks(
    broker: BrokerUnderTest, tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    seed = seed_from_env()
    print(f"T18 seed {seed} (replay: {SEED_ENV}={seed})")
    rng = random.Random(seed)
    ledger = Ledger(tmp_path / "ledger.db")
    app = App(broker.url)
    app.open()
    cleanup.append(app.close)
    offsets: dict[int, float] = {}

    def worker(name: str, offset: float) -> Proc:
        proc = Proc(
            tmp_path,
            name,
            broker.url,
            ledger,
            "worker",
            "faults.hold_app:app",
            "-c",
            str(CONCURRENCY),
            "--lease",
            f"{LEASE_S:g}",
            clock_offset_s=offset,
        )
        cleanup.append(proc.close)
        offsets[proc.pid] = offset
        return proc

    ahead = worker("ahead", OFFSET_S)
    worker("behind", -OFFSET_S)

    sent: list[Enqueue] = []
    delayed: list[str] = []

    def send(seconds: float, delay: float | None = None) -> None:
        job_id = f"k-{uuid.uuid4().hex[:16]}"
        app.send_task("faults.hold", [seconds], job_id=job_id, delay=delay)
        sent.append(Enqueue(job_id, time.time(), Outcome.OK))
        if delay:
            delayed.append(job_id)

    def kill_ahead() -> None:
        nonlocal ahead
        for _ in range(LONG):  # long jobs the kill can cut short
            send(LONG_S)
        wait_until(running_in(ledger, ahead.pid), what="the worker ahead to run a job", timeout=20)
        ahead.proc.kill()  # mid-job
        ledger.record_fault("kill -9", ahead.pid, "worker 30 s ahead", t=time.time())
        ahead = worker("ahead-2", OFFSET_S)

    for _ in range(LONG):
        send(LONG_S)
    start = time.monotonic()
    plan = sorted(
        [(rng.uniform(0, LOAD_S), "short") for _ in range(SHORT)]
        + [(rng.uniform(0, LOAD_S), "delayed") for _ in range(DELAYED)]
        + [(KILL_AT_S, "kill")]
    )
    actions: dict[str, Callable[[], None]] = {
        "short": lambda: send(rng.uniform(0, 0.05)),
        "delayed": lambda: send(rng.uniform(0, 0.05), delay=rng.uniform(0.5, 3.0)),
        "kill": kill_ahead,
    }
    for at, what in plan:
        pause = start + at - time.monotonic()
        if pause > 0:
            time.sleep(pause)  # pacing the load, not a wait for some state
        actions[what]()
    ledger.record_enqueues(sent)
    states = drain(app, len(sent), timeout=60)
    given_up = given_up_out_of_contact(tmp_path)
    jobs = {j.id: j for j in app.run_sync(app.broker.list_jobs(limit=1_000_000))}
    records = on_machine_clock(ledger.read(), offsets)
    result = check(records, states, given_up=given_up)
    first_start: dict[str, float] = {}
    for e in records.executions:
        first_start[e.job_id] = min(e.t_start, first_start.get(e.job_id, e.t_start))
    early = sorted(
        round(jobs[i].run_at - first_start[i], 3)
        for i in delayed
        if first_start[i] < jobs[i].run_at
    )
    bound = NATS_RECOVERY_BOUND_S if broker.name == "nats" else RECOVERY_BOUND_S
    late_recovery = [t for t in result.recovery_times if t > bound]
    print(
        f"T18 {broker.name}: workers at {OFFSET_S:+g} s and {-OFFSET_S:+g} s, lease "
        f"{LEASE_S:g} s; {result.summary()}; delayed jobs {len(delayed)}, started early "
        f"{len(early)} (by up to {max(early, default=0):.2f} s); recoveries later than "
        f"{bound:g} s: {len(late_recovery)}"
    )
    assert result.kills == 1
    assert result.ok, result.summary()
    assert early == [], early[:5]
    assert late_recovery == [], sorted(result.recovery_times)


_GIVEN_UP = re.compile(r"job (\S+) \([^)]*\): lease lost \(no heartbeat taken")


def given_up_out_of_contact(directory: Path) -> set[str]:
    """Jobs a worker gave up because no heartbeat of its was taken within the lease, by its
    own log: run again by design. In one CI run a worker starved of CPU (a claim took 1.4 s)
    gave up 4 jobs whose bodies then ended, and the checker counted them as unexplained. A
    lease recovered early by a skewed clock has no such line: its holder's heartbeats ran."""
    found: set[str] = set()
    for log in directory.glob("*.log"):
        found.update(m[1] for m in _GIVEN_UP.finditer(log.read_text(errors="replace")))
    return found
