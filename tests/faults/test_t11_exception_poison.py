"""T11 (docs/reliability.md): jobs that always raise, on each broker.

``poison.raises`` (``retries=3``, so ``max_attempts`` 4; back-off ``Backoff(base=0.4,
factor=2, jitter=True)``) records each execution in the ledger and raises ``ValueError``. Each
job must run exactly 4 times, attempts 1 to 4, then end ``failed`` with the ``ValueError``.
Each retry's delay (its ``on_retry`` hook notes it) must lie within the policy's jitter band
(half to all of ``0.4 x 2^(n-1)`` s after attempt n); no attempt may start before it is due;
and a retry may start late only by waiting for work due before it, plus ``LATE_S`` for a
worker to see it come due and claim it (``lateness``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from faults import poison_app
from faults.ledger import Ledger
from faults.poison import BROKERS, broker_url, make_app, run_until_finished
from faults.schedule import SEED_ENV, seed_from_env
from faults.sizes import sized
from taskmill import Backoff
from taskmill.job import JobState

JOBS = sized(ci=24, full=1_000)
LATE_S = 1.5
"""How much later than the later of its due time and the last start of older work a retry may
start: a worker's wait must end and its claim land (on a loaded 2-core machine)."""
EARLY_S = 0.05
"""Clock granularity allowance on the early side (the ledger's times are the worker's clock;
the retry's due time is the broker's, on the same machine)."""


def band(backoff: Backoff, attempt: int) -> tuple[float, float]:
    """The policy's delay after ``attempt``: half to all of base x factor^(attempt - 1)."""
    full = min(backoff.cap, backoff.base * backoff.factor ** (attempt - 1))
    return full / 2, full


def lateness(
    starts: list[tuple[float, float, str]],
) -> tuple[list[tuple[float, str]], list[float], list[tuple[float, str]]]:
    """From every execution's (due, start, what): the ones started more than ``EARLY_S``
    before their due time (by how much); each retry's start after its due time; and each
    retry's start after the later of its due time and the last start of an execution due
    before it. That last is what a worker adds: a retry may wait for older work (1,000 jobs
    failing at once on 8 slots make a queue), never for newer work or for nothing."""
    early = [(due - t, what) for due, t, what in starts if t < due - EARLY_S]
    late: list[float] = []
    behind: list[tuple[float, str]] = []
    older_started = 0.0  # the last start among executions due before the current one
    for due, t, what in sorted(starts):
        if not what.endswith("attempt 1"):
            late.append(t - due)
            behind.append((t - max(due, older_started), what))
        older_started = max(older_started, t)
    return early, late, behind


def pct(values: list[float], p: int) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, len(ordered) * p // 100)]


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    name: str = request.param
    for url in broker_url(name, request, tmp_path):
        yield name, url


@pytest.mark.timeout(sized(ci=90, full=1_800))
def test_exception_poison(
    broker: tuple[str, str], tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    name, url = broker
    seed = seed_from_env()
    print(f"T11 seed {seed} (replay: {SEED_ENV}={seed}; the back-off's jitter is not seeded)")
    ledger = Ledger(tmp_path / "ledger.db")
    app, tasks = make_app(url)
    cleanup.append(app.close)
    ids = {h.id for h in tasks["poison.raises"].send_many([(i,) for i in range(JOBS)])}
    sent_at = time.time()  # every first attempt is due by now
    jobs, _, restarts, log = run_until_finished(
        tmp_path, url, ledger, app, ids, "-p", "2", "-c", "4", name="worker",
        timeout=sized(ci=60.0, full=1_200.0),
    )  # fmt: skip

    max_attempts = poison_app.RAISE_RETRIES + 1
    backoff = poison_app.RAISE_BACKOFF
    records = ledger.read()
    runs: dict[str, list[tuple[int, float]]] = {}
    for e in records.executions:
        runs.setdefault(e.job_id, []).append((e.attempt, e.t_start))
    due_of = {(r.job_id, r.attempt + 1): r.due for r in records.retries}
    off_schedule: list[str] = []  # a delay outside the policy's band
    for r in records.retries:
        low, high = band(backoff, r.attempt)
        if not low - 1e-9 <= r.delay_s <= high + 1e-9:
            off_schedule.append(f"{r.job_id} after attempt {r.attempt}: delay {r.delay_s:.3f} s")
    wrong_count: list[str] = []
    starts: list[tuple[float, float, str]] = []  # (due, start, what): every execution
    for job in jobs:
        mine = sorted(runs.get(job.id, []))
        if [a for a, _ in mine] != list(range(1, max_attempts + 1)):
            wrong_count.append(f"{job.id}: attempts {[a for a, _ in mine]}")
            continue
        for attempt, t in mine:
            due = sent_at if attempt == 1 else due_of.get((job.id, attempt))
            if due is None:
                wrong_count.append(f"{job.id}: no retry noted before attempt {attempt}")
                continue
            starts.append((due, t, f"{job.id} attempt {attempt}"))
    early, late, behind = lateness(starts)
    outside = [f"{what}: started {d:.3f} s before it was due" for d, what in early]
    outside += [f"{what}: started {d:.3f} s after it was due and the older work started"
                for d, what in behind if d > LATE_S]  # fmt: skip
    failed = [j for j in jobs if j.state is JobState.FAILED]
    reasons = {(j.error.type, j.attempt) for j in failed if j.error is not None}
    print(
        f"T11 {name}: {len(jobs)} jobs, failed {len(failed)}, executions "
        f"{sum(len(v) for v in runs.values())} (max_attempts {max_attempts}); wrong counts "
        f"{len(wrong_count)}; retry delays {len(records.retries)}, off the policy's band "
        f"{len(off_schedule)}; retries started after their due time p50 / p99 / max "
        f"{pct(late, 50):.3f} / {pct(late, 99):.3f} / {pct(late, 100):.3f} s, after the "
        f"later of that and the last start of older work max {pct([d for d, _ in behind], 100):.3f}"
        f" s; early {len(early)}; restarts {restarts}"
    )
    assert len(failed) == JOBS, [(j.id, j.state) for j in jobs if j.state is not JobState.FAILED]
    assert reasons == {("ValueError", max_attempts)}, reasons
    assert not wrong_count, wrong_count[:5]
    assert not off_schedule, off_schedule[:5]
    assert not outside, outside[:5]
    assert restarts == 0, log
