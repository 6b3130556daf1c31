"""T11 (docs/reliability.md): jobs that always raise, on each broker.

``poison.raises`` (``retries=3``, so ``max_attempts`` 4; back-off ``Backoff(base=0.4,
factor=2, jitter=True)``) records each execution in the ledger and raises ``ValueError``. Each
job must run exactly 4 times, attempts 1 to 4, then end ``failed`` with the ``ValueError``; the
gap between two executions must lie within the policy's jitter band (half to all of
``0.4 x 2^(n-1)`` s after attempt n), with an allowance on the late side for the time a worker
takes to see the retry come due and claim it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from faults import poison_app
from faults.ledger import Ledger
from faults.poison import BROKERS, broker_url, make_app, run_until_finished
from faults.schedule import SEED_ENV, seed_from_env
from faults.sizes import sized
from taskmill.job import JobState

JOBS = sized(ci=24, full=1_000)
LATE_S = 1.5
"""How much later than the policy's longest delay a retry may start: the scheduled job must
come due, a worker's wait end and its claim land (on a loaded 2-core machine)."""
EARLY_S = 0.05
"""Clock granularity allowance on the early side (the ledger's times are the worker's clock;
the retry's due time is the broker's, on the same machine)."""


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
    jobs, _, restarts, log = run_until_finished(
        tmp_path, url, ledger, app, ids, "-p", "2", "-c", "4", name="worker",
        timeout=sized(ci=60.0, full=1_200.0),
    )  # fmt: skip

    max_attempts = poison_app.RAISE_RETRIES + 1
    backoff = poison_app.RAISE_BACKOFF
    runs: dict[str, list[tuple[int, float]]] = {}
    for e in ledger.read().executions:
        runs.setdefault(e.job_id, []).append((e.attempt, e.t_start))
    wrong_count: list[str] = []
    outside: list[str] = []
    early_by: list[float] = []  # seconds before the band's start (negative: inside)
    late_by: list[float] = []  # seconds after the band's end (negative: inside)
    for job in jobs:
        mine = sorted(runs.get(job.id, []))
        if [a for a, _ in mine] != list(range(1, max_attempts + 1)):
            wrong_count.append(f"{job.id}: attempts {[a for a, _ in mine]}")
            continue
        for (attempt, t0), (_, t1) in itertools.pairwise(mine):
            full = min(backoff.cap, backoff.base * backoff.factor ** (attempt - 1))
            low, high = full / 2, full
            gap = t1 - t0
            early_by.append(low - gap)
            late_by.append(gap - high)
            if gap < low - EARLY_S or gap > high + LATE_S:
                outside.append(f"{job.id} after attempt {attempt}: {gap:.3f} s not in "
                               f"[{low:.2f}, {high:.2f}]")  # fmt: skip
    failed = [j for j in jobs if j.state is JobState.FAILED]
    reasons = {(j.error.type, j.attempt) for j in failed if j.error is not None}
    print(
        f"T11 {name}: {len(jobs)} jobs, failed {len(failed)}, executions "
        f"{sum(len(v) for v in runs.values())} (max_attempts {max_attempts}); wrong counts "
        f"{len(wrong_count)}; gaps {len(early_by)}, outside the band {len(outside)}; earliest "
        f"{-max(early_by, default=0):+.3f} s from the band's start, latest "
        f"{max(late_by, default=0):+.3f} s past its end; restarts {restarts}"
    )
    assert len(failed) == JOBS, [(j.id, j.state) for j in jobs if j.state is not JobState.FAILED]
    assert reasons == {("ValueError", max_attempts)}, reasons
    assert not wrong_count, wrong_count[:5]
    assert not outside, outside[:5]
    assert restarts == 0, log
