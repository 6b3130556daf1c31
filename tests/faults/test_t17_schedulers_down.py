"""T17's catch-up half (docs/reliability.md): every scheduler down for five minutes, then
restarted, on each broker, over the virtual clock of the fast three-scheduler test
(``tests/conformance/test_periodic.py``: time stands still while a scheduler's pass does real
I/O on the real broker, and jumps to the next wake-up once all sleep).

Three schedulers run for a virtual minute, all stop for ``DOWN_S``, three new ones run for
another minute. taskmill's catch-up window is a schedule's ``grace`` (30 s): a tick seen up to
that late is on time and runs whatever the policy; older ticks were missed, and ``misfire``
decides (``skip`` drops them, ``once`` runs the latest if no tick is on time, ``all`` runs at
most ``max_misfires`` of the latest). Every tick that runs must be enqueued exactly once
(by one pass of one scheduler), the ticks the policy drops never, and a scheduler must log
the ones it drops.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conformance.virtual_time import RecordingScheduler, VirtualTime
from faults.broker_urls import ALL_BROKERS, BrokerUnderTest, broker_under_test
from taskmill import App

START = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
RUN_S = 60
DOWN_S = 300
GRACE_S = 30
MAX_MISFIRES = 100
TEN_S = 10


@pytest.fixture(params=ALL_BROKERS)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerUnderTest]:
    with broker_under_test(request, tmp_path, request.param, "t17") as b:
        yield b


def tick_id(name: str, tick: datetime) -> str:
    return f"schedule:{name}:{tick.isoformat()}"


def seconds(a: int, b: int, step: int = 1) -> list[datetime]:
    """The ticks ``START + a`` to ``START + b`` s (both included), ``step`` apart."""
    return [START + timedelta(seconds=s) for s in range(a, b + 1, step)]


@pytest.mark.timeout(120)
def test_t17_schedulers_down_then_restarted_catch_up_as_the_policy_says(
    broker: BrokerUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    app = App(broker.url)

    @app.periodic(every=timedelta(seconds=1), name="s-skip")
    @app.periodic(every=timedelta(seconds=1), name="s-all", misfire="all")
    @app.periodic(every=timedelta(seconds=TEN_S), name="ten-once", misfire="once")
    @app.task(name="faults.tick")
    def tick() -> None: ...

    app.open()
    try:
        started = time.monotonic()
        first = VirtualTime(START + timedelta(seconds=0.5), sleepers=3)
        before = [RecordingScheduler(app, first) for _ in range(3)]
        app.run_sync(first.run(before, until=START + timedelta(seconds=RUN_S + 0.5)))
        back = RUN_S + DOWN_S  # every scheduler down from RUN_S to RUN_S + DOWN_S
        second = VirtualTime(START + timedelta(seconds=back + 0.5), sleepers=3)
        after = [RecordingScheduler(app, second) for _ in range(3)]
        with caplog.at_level(logging.WARNING, logger="taskmill.scheduler"):
            app.run_sync(second.run(after, until=START + timedelta(seconds=back + RUN_S + 0.5)))
        elapsed = time.monotonic() - started
        stored = sorted(j.id for j in app.run_sync(app.broker.list_jobs(limit=100_000)))
    finally:
        app.close()

    # the restart's first pass (at back + 0.5 s) sees ticks from back - 29 s on as on time
    on_time_from = back - GRACE_S + 1
    expected = {
        "s-skip": seconds(0, RUN_S) + seconds(on_time_from, back + RUN_S),
        "s-all": seconds(0, RUN_S)
        + seconds(on_time_from - MAX_MISFIRES, on_time_from - 1)
        + seconds(on_time_from, back + RUN_S),
        # on-time ticks at the restart make "once" run no missed one
        "ten-once": seconds(0, RUN_S, TEN_S)
        + [t for t in seconds(on_time_from, back + RUN_S) if t.second % TEN_S == 0],
    }
    expected_ids = sorted(tick_id(n, t) for n, ticks in expected.items() for t in ticks)
    enqueued = [job for s in before + after for _, report in s.passes for job in report.enqueued]
    duplicates = len(enqueued) - len(set(enqueued))
    missing = sorted(set(expected_ids) - set(stored))
    extra = sorted(set(stored) - set(expected_ids))
    logged = [r.getMessage() for r in caplog.records if "missed tick" in r.getMessage()]
    dropped = {
        "s-skip": on_time_from - RUN_S - 1,
        "s-all": on_time_from - RUN_S - 1 - MAX_MISFIRES,
        "ten-once": len(range(RUN_S + TEN_S, on_time_from, TEN_S)),
    }
    print(
        f"T17 {broker.name}: {RUN_S} s up, {DOWN_S} s down, {RUN_S} s up (virtual, "
        f"{elapsed:.1f} s real); ticks run {len(stored)} (expected {len(expected_ids)}), "
        f"enqueued twice {duplicates}, missing {len(missing)}, unexpected {len(extra)}; "
        f"dropped and logged: {dropped}; log lines {len(logged)}"
    )
    assert missing == [] and extra == [], (missing[:5], extra[:5])
    assert duplicates == 0
    assert sorted(enqueued) == expected_ids
    for name, count in dropped.items():
        # one line per scheduler whose pass saw the old mark: the three restarted ones pass at
        # the same (virtual) moment, so each may log it once
        mine = [m for m in logged if f"schedule {name}: " in m]
        assert 1 <= len(mine) <= 3, (name, logged)
        assert all(f"schedule {name}: {count} missed tick(s)" in m for m in mine), mine
