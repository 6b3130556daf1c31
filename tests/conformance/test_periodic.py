"""The ``ScheduleStore`` feature (``taskmill.brokers.features``), through periodic schedules.

Periodic schedules: each tick enqueued once however many schedulers run, none early;
misfire and overlap policies, DST, and a scheduler that died half-way. In-process tests drive
``Scheduler.run_pass`` with an injected clock (no sleeps), or run three schedulers' loops over
a virtual clock for a minute of ticks in well under a second; the multiprocess test (``slow``
tier) runs three ``taskmill scheduler`` processes against the real broker for a real minute."""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from taskmill import App, JobState, UnknownScheduleError
from taskmill.brokers.features import schedule_store
from taskmill.scheduler import Scheduler
from taskmill.testing import running_worker

from .apps import PERIODIC_ENV, build_app
from .helpers import PACKAGE, opened, processes, subprocess_env
from .virtual_time import RecordingScheduler, VirtualTime

START = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


class Clock:
    """The time a scheduler sees, moved by the test."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    async def __call__(self) -> float:
        return self.at.timestamp()

    def advance(self, **delta: float) -> None:
        self.at += timedelta(**delta)


def tick_ids(app: App) -> list[str]:
    return sorted(j.id for j in app.run_sync(opened(app).list_jobs(limit=100_000)))


def job_id(name: str, tick: datetime) -> str:
    return f"schedule:{name}:{tick.isoformat()}"


def test_two_schedulers_enqueue_a_tick_once_even_after_it_ran(app: App) -> None:
    @app.periodic(every=timedelta(minutes=1), name="minutely")
    @app.task()
    def report() -> str:
        return "done"

    clock = Clock(START + timedelta(seconds=1))
    first, second = Scheduler(app, clock=clock), Scheduler(app, clock=clock)
    done = app.run_sync(first.run_pass())
    assert done.enqueued == [job_id("minutely", START)]
    assert app.run_sync(second.run_pass()).enqueued == []  # the mark moved: nothing due
    with running_worker(app, scheduler=False):  # the test drives the schedules
        assert app.job(done.enqueued[0]).result(timeout=10) == "done"
    # a scheduler that read the marks before the first moved them (or died before moving
    # them) enqueues the same tick again: the finished job's id is still stored
    broker = opened(app)
    again = app.run_sync(broker.enqueue([first._job(app.schedules["minutely"], START)]))
    assert again.existing == {0}
    assert tick_ids(app) == [job_id("minutely", START)]
    marks = app.run_sync(schedule_store(broker).schedule_marks())
    assert marks == {"minutely": START.timestamp()}


def test_ticks_come_due_on_time_and_never_early(app: App) -> None:
    @app.periodic(every=timedelta(seconds=10), name="ten")
    @app.task()
    def ping() -> None: ...

    clock = Clock(START - timedelta(microseconds=1))  # just before a tick
    scheduler = Scheduler(app, clock=clock)
    first = app.run_sync(scheduler.run_pass())
    assert first.enqueued == [job_id("ten", START - timedelta(seconds=10))]
    clock.advance(microseconds=1)
    assert app.run_sync(scheduler.run_pass()).enqueued == [job_id("ten", START)]
    clock.advance(seconds=9.9)
    assert app.run_sync(scheduler.run_pass()).enqueued == []  # 0.1 s early: not yet
    assert app.run_sync(scheduler.seconds_to_next_tick()) == pytest.approx(0.1, abs=1e-3)
    clock.advance(seconds=25)  # late, but within the 30 s grace: both ticks are on time
    assert app.run_sync(scheduler.run_pass()).enqueued == [
        job_id("ten", START + timedelta(seconds=s)) for s in (10, 20, 30)
    ]


@pytest.mark.parametrize(
    ("misfire", "expected_hours"), [("skip", []), ("once", [12]), ("all", [6, 12])]
)
def test_misfire_policy_after_the_schedulers_were_down(
    app: App, misfire: str, expected_hours: list[int]
) -> None:
    @app.periodic(every=timedelta(hours=6), name="six", misfire=misfire)  # type: ignore[arg-type]
    @app.task()
    def sync() -> None: ...

    day = START.replace(hour=0)
    clock = Clock(day + timedelta(seconds=5))
    scheduler = Scheduler(app, clock=clock)
    assert app.run_sync(scheduler.run_pass()).enqueued == [job_id("six", day)]
    clock.at = day + timedelta(hours=17)  # down from 00:00 to 17:00: 06:00 and 12:00 missed
    enqueued = app.run_sync(scheduler.run_pass()).enqueued
    assert enqueued == [job_id("six", day.replace(hour=h)) for h in expected_hours]


def test_spring_forward_runs_a_time_in_the_gap_once(app: App) -> None:
    @app.periodic(cron="30 2 * * *", tz="Europe/Paris", name="half-past-two")
    @app.task()
    def nightly() -> None: ...

    # 2026-03-29: Paris skips from 02:00 to 03:00 (01:00 UTC); 02:30 runs once, at 03:00
    clock = Clock(datetime(2026, 3, 28, 12, tzinfo=UTC))
    scheduler = Scheduler(app, clock=clock)
    enqueued: list[str] = []
    for _ in range(24 * 4):  # a pass every 15 minutes for a day
        clock.advance(minutes=15)
        enqueued += app.run_sync(scheduler.run_pass()).enqueued
    assert enqueued == [job_id("half-past-two", datetime(2026, 3, 29, 1, tzinfo=UTC))]


def test_overlap_skip_waits_for_the_previous_run(app: App) -> None:
    @app.periodic(every=timedelta(minutes=1), name="exclusive", overlap="skip")
    @app.task()
    def long_job() -> None: ...

    clock = Clock(START + timedelta(seconds=1))
    scheduler = Scheduler(app, clock=clock)
    assert app.run_sync(scheduler.run_pass()).enqueued == [job_id("exclusive", START)]
    clock.advance(minutes=1)
    report = app.run_sync(scheduler.run_pass())  # the first run is still queued
    assert report.enqueued == [] and report.skipped == [
        job_id("exclusive", START + timedelta(minutes=1))
    ]
    with running_worker(app, scheduler=False):  # the test drives the schedules
        app.job(job_id("exclusive", START)).result(timeout=10)
    clock.advance(minutes=1)
    assert app.run_sync(scheduler.run_pass()).enqueued == [
        job_id("exclusive", START + timedelta(minutes=2))
    ]


def test_marks_only_move_forward(app: App) -> None:
    broker = schedule_store(opened(app))
    app.run_sync(broker.mark_schedules({"a": 200.0, "b": 50.0}))
    app.run_sync(broker.mark_schedules({"a": 100.0, "b": 60.0}))
    assert app.run_sync(broker.schedule_marks()) == {"a": 200.0, "b": 60.0}


def test_a_schedule_with_arguments_that_do_not_fit_is_refused(app: App) -> None:
    @app.task()
    def greet(name: str) -> str:
        return f"hello {name}"

    with pytest.raises(TypeError, match="missing a required argument: 'name'"):
        app.periodic(every=60)(greet)
    app.periodic(every=60, kwargs={"name": "ops"})(greet)
    assert app.schedules[greet.name].kwargs == {"name": "ops"}


def test_trigger_sends_the_schedules_job_now_without_moving_its_ticks(app: App) -> None:
    @app.periodic(cron="0 2 * * *", kwargs={"region": "eu"}, name="nightly-eu",
                  meta={"source": "nightly"}, overlap="skip")  # fmt: skip
    @app.task()
    def build(region: str) -> str:
        return f"built {region}"

    first = app.trigger_schedule("nightly-eu")
    job = first.info()
    assert (job.task, job.state, job.meta, first.existing) == (
        build.name, JobState.QUEUED, {"source": "nightly"}, False,
    )  # fmt: skip
    # overlap="skip": while that run is pending, a trigger returns it
    again = app.trigger_schedule("nightly-eu")
    assert (again.id, again.existing) == (first.id, True)
    with running_worker(app, scheduler=False):
        assert first.result(timeout=10) == "built eu"
    assert app.trigger_schedule("nightly-eu").id != first.id  # finished: a new run
    assert app.run_sync(schedule_store(opened(app)).schedule_marks()) == {}  # no tick moved
    with pytest.raises(UnknownScheduleError, match=r"no schedule named 'weekly' \(known: "):
        app.trigger_schedule("weekly")


@pytest.mark.timeout(60)
def test_three_schedulers_over_a_virtual_minute_enqueue_every_tick_exactly_once(
    app: App,
) -> None:
    """The property of the three-process test below, in-process over virtual time: three
    schedulers' loops (their passes, and the sleeps they choose between passes) for a minute
    of an every-second schedule. Each tick is enqueued by exactly one pass, the ticks are
    consecutive seconds, and each was enqueued at or after its time, within its second."""

    @app.periodic(every=timedelta(seconds=1), name="every-second")
    @app.task(name="conformance.tick")
    def tick() -> None: ...

    virtual = VirtualTime(START + timedelta(seconds=0.5), sleepers=3)
    schedulers = [RecordingScheduler(app, virtual) for _ in range(3)]
    started = time.monotonic()
    app.run_sync(virtual.run(schedulers, until=START + timedelta(seconds=60.5)))
    assert time.monotonic() - started < 30  # a virtual minute, not a real one

    expected = [job_id("every-second", START + timedelta(seconds=s)) for s in range(61)]
    assert tick_ids(app) == expected
    enqueued = [
        (at, tick_id) for s in schedulers for at, report in s.passes for tick_id in report.enqueued
    ]
    assert sorted(tick_id for _, tick_id in enqueued) == expected  # each by one pass only
    tick_at = {j: START.timestamp() + s for s, j in enumerate(expected)}
    early = [(at, j) for at, j in enqueued if at < tick_at[j]]
    assert early == []
    late = [(at, j) for at, j in enqueued if at - tick_at[j] >= 1.0]
    assert late == []
    assert all(len(s.passes) >= 60 for s in schedulers), [len(s.passes) for s in schedulers]
    jobs = app.run_sync(opened(app).list_jobs(limit=1000))
    assert {(j.task, j.state) for j in jobs} == {("conformance.tick", JobState.QUEUED)}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(150)
def test_three_scheduler_processes_enqueue_every_tick_exactly_once(
    broker_url: str, tmp_path: Path
) -> None:
    """An every-second schedule, three ``taskmill scheduler`` processes for 60 s: the ticks
    enqueued are consecutive seconds, each once, each enqueued at or after its time. (Slow
    tier: a real minute on each broker; the virtual-time test above shows the same in-process
    in well under a second.)"""
    env = {**subprocess_env(broker_url, {}), PERIODIC_ENV: "1"}
    app = build_app(broker_url)
    try:
        with processes() as start:
            procs = [
                start(
                    ["-m", "taskmill", "scheduler", "--app", f"{PACKAGE}.apps:app"],
                    env,
                    tmp_path / f"scheduler-{i}.log",
                )
                for i in range(3)
            ]
            time.sleep(60)  # the test's subject is a minute of ticks: the length is the point
            for proc in procs:
                assert proc.popen.poll() is None, proc.output()
        jobs = app.run_sync(opened(app).list_jobs(limit=100_000))
    finally:
        app.close()
    tick_of = {
        j.id: datetime.fromisoformat(j.id.removeprefix("schedule:every-second:")) for j in jobs
    }
    ticks = sorted(tick_of.values())
    assert len(jobs) == len(set(ticks)) >= 55, f"{len(jobs)} jobs, {len(set(ticks))} ticks"
    gaps = [b - a for a, b in itertools.pairwise(ticks) if b - a != timedelta(seconds=1)]
    assert gaps == [], f"ticks missing: {gaps}"
    early = [j.id for j in jobs if j.enqueued_at < tick_of[j.id].timestamp()]
    assert early == []
    assert {j.task for j in jobs} == {"conformance.tick"}
    assert all(j.state is JobState.QUEUED for j in jobs)
