"""T10 (docs/reliability.md): jobs that kill their own worker process, on each broker.

``poison.crash`` records its execution in the ledger, then ends its process: half of the jobs
with ``os._exit(1)``, half with SIGKILL. The worker runs it in its thread pool, so the worker
process itself dies, the supervisor restarts it, and the job's lease expires. taskmill counts a
lost lease as a delivery and fails the job once ``max_lost_leases`` (3) is reached
(docs/guarantees.md, "Recovery and poison jobs"): each crash job must run exactly 3 times,
never 4, and end ``failed`` with ``WorkerLostError``. Good jobs run meanwhile: their throughput
while crash jobs are pending is compared with a clean run's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from faults.ledger import Ledger
from faults.poison import BROKERS, broker_url, make_app, run_until_finished, send_good, throughput
from faults.schedule import SEED_ENV, seed_from_env
from faults.sizes import sized
from taskmill.job import Job, JobState

CRASHERS = sized(ci=2, full=50)
GOOD = sized(ci=800, full=20_000)
PAUSE_MS = 10
N = 3
"""``Settings.max_lost_leases``, the default."""
MIN_RATIO = sized(ci=0.05, full=0.5)
"""Throughput of the good jobs no crash touched while crash jobs are pending, against the clean
run's: the plan's 50 % at full size. At CI size the two phases last a few seconds each and
follow each other, so a change of the shared machine's load between them moves the ratio
more than the crashes do (0.10-1.00 over 12 runs; 0.10 when a CPU-bound benchmark started
between the phases): the gate there only catches a pool that stopped; the figure is
printed, with the all-good-jobs one."""
ARGS = ("-p", "2", "-c", "4", "--lease", "2")


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    name: str = request.param
    for url in broker_url(name, request, tmp_path):
        yield name, url


def _window_rate(good: list[Job], until: float) -> float:
    """Good jobs finished per second from the first good start to ``until``."""
    start = min(j.started_at for j in good if j.started_at is not None)
    done = sum(1 for j in good if j.finished_at is not None and j.finished_at <= until)
    return done / max(until - start, 1e-3)


@pytest.mark.timeout(sized(ci=150, full=3_600))
def test_crash_poison(
    broker: tuple[str, str], tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    name, url = broker
    seed = seed_from_env()
    print(f"T10 seed {seed} (replay: {SEED_ENV}={seed})")
    ledger = Ledger(tmp_path / "ledger.db")
    app, tasks = make_app(url)
    cleanup.append(app.close)
    wait_s = sized(ci=100.0, full=3_000.0)

    clean_ids = set(send_good(tasks, GOOD, PAUSE_MS))
    clean, _, _, _ = run_until_finished(
        tmp_path, url, ledger, app, clean_ids, *ARGS, name="clean", timeout=wait_s
    )
    clean_rate = throughput(clean)

    modes = ["exit" if i % 2 == 0 else "kill" for i in range(CRASHERS)]
    crash_ids = {h.id for h in tasks["poison.crash"].send_many([(m,) for m in modes])}
    good_ids = set(send_good(tasks, GOOD, PAUSE_MS))
    jobs, _, restarts, log = run_until_finished(
        tmp_path, url, ledger, app, crash_ids | good_ids, *ARGS, name="crash", timeout=wait_s
    )
    crashers = [j for j in jobs if j.id in crash_ids]
    good = [j for j in jobs if j.id in good_ids]
    runs = Counter(e.job_id for e in ledger.read().executions)
    pending_until = max(j.finished_at or 0.0 for j in crashers)
    last_good = max(j.finished_at or 0.0 for j in good)
    all_ratio = _window_rate(good, min(pending_until, last_good)) / clean_rate
    # The throughput gate reads the good jobs no crash touched: a good job claimed in the
    # same batch as a crash job dies with its process and waits for its lease to expire (2 s,
    # up to 3 times), so the last good finishes, and the all-good figure, measure the lease,
    # not the pool's work (0.10-0.55 in runs where nothing else differed)
    untouched = [j for j in good if j.lost_leases == 0]
    last_untouched = max(j.finished_at or 0.0 for j in untouched)
    rate = _window_rate(untouched, min(pending_until, last_untouched))
    ratio = rate / clean_rate
    batch_mates = sum(1 for j in good if j.lost_leases > 0)
    collateral = [j for j in good if j.state is not JobState.SUCCEEDED]
    print(
        f"T10 {name}: {CRASHERS} crash jobs, executions {sorted(runs[i] for i in crash_ids)} "
        f"(N = {N}), states {Counter(str(j.state) for j in crashers)}, lost leases "
        f"{sorted(j.lost_leases for j in crashers)}; restarts {restarts}; good {len(good)}, "
        f"lost a lease with a crash {batch_mates}, quarantined {len(collateral)}; untouched "
        f"good throughput while crash jobs pending {rate:.0f}/s vs clean {clean_rate:.0f}/s "
        f"(ratio {ratio:.2f}; all good {all_ratio:.2f}); crash jobs pending for "
        f"{pending_until - min(j.started_at or pending_until for j in good):.1f} s"
    )
    for job in crashers:
        assert job.state is JobState.FAILED, (job.id, job.state)
        assert job.error is not None and job.error.type == "taskmill.errors.WorkerLostError"
        assert job.lost_leases == N, (job.id, job.lost_leases)
        # at most N runs: fewer when the job was lost with a process another job killed
        # before its body began (it is quarantined all the same: see docs/reliability.md)
        assert runs[job.id] <= N, (job.id, runs[job.id])
    # one restart per process a crash job took down (two bodies can share one process)
    assert 1 <= restarts <= sum(runs[i] for i in crash_ids), log
    # a good job claimed with a crash job by the process it kills loses its lease too; one
    # that shared N such deaths is quarantined with it (reported, not lost)
    for job in collateral:
        assert job.state is JobState.FAILED and job.lost_leases == N, (job.id, job.state)
    assert ratio >= MIN_RATIO
