"""What the admin API gives a dashboard beyond listings, on every broker: throughput per
minute (``Broker.finished_per_minute``), deleting finished jobs (``Broker.delete``), the
schedules' last ticks and their outcome, and workflows with their steps' states."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from taskmill import App, JobNotFoundError, JobState, chain, group
from taskmill.job import (
    Cancelled,
    ErrorInfo,
    Failed,
    Finish,
    NewJob,
    QueueStats,
    RetryAt,
    Succeeded,
)
from taskmill.scheduler import Scheduler

from .helpers import claim_of, opened, wait_until


def _new(job_id: str, *, task: str = "t.work", queue: str = "default", **kw: Any) -> NewJob:
    return NewJob(id=job_id, task=task, queue=queue, payload=b"[[],{}]", **kw)


def _finish(app: App, queue: str, outcomes: dict[str, Any]) -> None:
    """Claim the jobs of ``outcomes`` from ``queue`` and store each one's outcome."""
    broker = opened(app)
    claimed = {j.id: j for j in app.run_sync(broker.claim([queue], 1000, "w", 30.0))}
    finishes = [Finish(claim_of(claimed[i]), outcome) for i, outcome in outcomes.items()]
    assert all(app.run_sync(broker.finish(finishes)))


def _failed() -> Failed:
    return Failed(ErrorInfo(type="ValueError", message="bad"))


def _counts(app: App, queue: str) -> dict[str, int]:
    stats: dict[str, QueueStats] = {s.queue: s for s in app.stats()}
    return stats[queue].counts


def _store_and_finish(app: App) -> None:
    """Three jobs of queue a (succeeded, failed, cancelled), two succeeded of queue b, one
    queued and one scheduled."""
    broker = opened(app)
    jobs = [_new(f"a{n}", queue="a") for n in range(3)] + [_new(f"b{n}", queue="b") for n in (0, 1)]
    jobs += [_new("waiting", queue="a", task="t.other"), _new("later", queue="a", delay_s=3600)]
    app.run_sync(broker.enqueue(jobs[:5]))
    _finish(app, "a", {"a0": Succeeded(b"1"), "a1": _failed(), "a2": Cancelled()})
    _finish(app, "b", {"b0": Succeeded(b"1"), "b1": Succeeded(b"2")})
    app.run_sync(broker.enqueue(jobs[5:]))


# --- throughput ---------------------------------------------------------------------------------


def test_throughput_counts_finished_jobs_per_minute_by_outcome(app: App) -> None:
    before = app.now()
    _store_and_finish(app)
    points = app.throughput(minutes=3)
    after = app.now()
    assert len(points) == 3
    assert [p.at for p in points] == [60.0 * (int(after // 60) - n) for n in (2, 1, 0)]
    assert all(p.at % 60 == 0 for p in points)
    # the jobs finished between `before` and `after`: in the minutes of those two times
    busy = {60.0 * int(before // 60), 60.0 * int(after // 60)}
    assert all(p.succeeded == p.failed == p.cancelled == 0 for p in points if p.at not in busy)
    totals = [sum(getattr(p, s) for p in points) for s in ("succeeded", "failed", "cancelled")]
    assert totals == [3, 1, 1]
    of_a = app.throughput(minutes=3, queue="a")
    assert [sum(getattr(p, s) for p in of_a) for s in ("succeeded", "failed", "cancelled")] == [
        1, 1, 1,
    ]  # fmt: skip
    assert sum(p.succeeded for p in app.throughput(minutes=3, queue="nope")) == 0


def test_throughput_counts_only_the_minutes_asked(app: App) -> None:
    _store_and_finish(app)
    broker = opened(app)
    now = app.now()
    # the broker's own answer, from a time after every finish: nothing
    assert app.run_sync(broker.finished_per_minute(now + 60)) == []
    counted = app.run_sync(broker.finished_per_minute(now - 600))
    assert sorted((s.value, n) for _, s, n in counted if s is JobState.FAILED) == [("failed", 1)]
    assert {m for m, _, _ in counted} <= {int(now // 60) - 1, int(now // 60)}


@pytest.mark.parametrize("minutes", [0, -1, 1441, 1.5, True, "60"])
def test_throughput_refuses_a_bad_span(app: App, minutes: Any) -> None:
    with pytest.raises(ValueError, match="minutes must be a whole number from 1 to 1440"):
        app.throughput(minutes=minutes)


# --- deleting finished jobs ---------------------------------------------------------------------


def test_delete_jobs_by_id_deletes_finished_jobs_only(app: App) -> None:
    _store_and_finish(app)
    asked = ["a2", "waiting", "missing", "a0", "later", "a0"]
    assert app.delete_jobs(asked) == ["a2", "a0"]
    for gone in ("a0", "a2"):
        with pytest.raises(JobNotFoundError):
            app.get_job(gone)
    assert app.get_job("waiting").state is JobState.QUEUED
    assert app.get_job("later").state is JobState.SCHEDULED
    a = _counts(app, "a")
    assert (a["succeeded"], a["cancelled"], a["failed"], a["queued"]) == (0, 0, 1, 1)
    listed = {j.id for j in app.list_jobs(queue="a").jobs}
    assert listed == {"a1", "waiting", "later"}
    assert [j.id for j in app.list_jobs(order="finished", queue="a").jobs] == ["a1"]
    assert sum(p.succeeded + p.cancelled for p in app.throughput(5, queue="a")) == 0
    assert app.delete_jobs([]) == []


def test_delete_jobs_by_filter(app: App) -> None:
    _store_and_finish(app)
    assert sorted(app.delete_jobs(state="succeeded")) == ["a0", "b0", "b1"]
    assert sorted(app.delete_jobs(queue="a")) == ["a1", "a2"]
    assert app.list_jobs(order="finished").jobs == []
    assert {j.id for j in app.list_jobs().jobs} == {"waiting", "later"}


def test_delete_jobs_by_task_across_pages(app: App) -> None:
    broker = opened(app)
    ids = [f"j{n:04d}" for n in range(1010)]
    app.run_sync(broker.enqueue([_new(i, task="t.bulk") for i in ids] + [_new("keep")]))
    _finish(app, "default", {i: Succeeded(b"1") for i in ids[:1000]})
    _finish(app, "default", {i: Succeeded(b"1") for i in [*ids[1000:], "keep"]})
    assert sorted(app.delete_jobs(task="t.bul")) == ids
    assert [j.id for j in app.list_jobs().jobs] == ["keep"]


def test_delete_jobs_refuses_unclear_requests(app: App) -> None:
    _store_and_finish(app)
    with pytest.raises(ValueError, match="needs job ids or at least one filter"):
        app.delete_jobs()
    with pytest.raises(ValueError, match="job ids or state=/queue=/task= filters, not both"):
        app.delete_jobs(["a0"], queue="a")
    with pytest.raises(ValueError, match="queued jobs have no finish time"):
        app.delete_jobs(state="queued")
    assert _counts(app, "a")["succeeded"] == 1  # nothing was deleted


# --- schedules ----------------------------------------------------------------------------------


START = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


def test_schedule_statuses_show_the_last_tick_and_its_job(app: App) -> None:
    @app.periodic(every=timedelta(minutes=1), name="minutely")
    @app.periodic(cron="0 3 * * *", name="nightly")
    @app.task(name="t.report")
    def report() -> None: ...

    async def at_start() -> float:
        return (START + timedelta(seconds=1)).timestamp()

    app.run_sync(Scheduler(app, clock=at_start).run_pass())
    minutely, nightly = sorted(app.schedule_statuses(n_next=2), key=lambda s: s.schedule.name)
    tick_id = f"schedule:minutely:{START.isoformat()}"
    assert (minutely.last_tick, minutely.last_job_id, minutely.last_state) == (
        START, tick_id, JobState.QUEUED,
    )  # fmt: skip
    assert len(minutely.next_ticks) == 2 and minutely.next_ticks[0] > START
    assert (nightly.last_tick, nightly.last_job_id, nightly.last_state) == (None, None, None)
    _finish(app, "default", {tick_id: _failed()})
    (minutely,) = [s for s in app.schedule_statuses() if s.schedule.name == "minutely"]
    assert minutely.last_state is JobState.FAILED and len(minutely.next_ticks) == 3
    app.delete_jobs([tick_id])  # its job gone: the tick is still known, its outcome is not
    (minutely,) = [s for s in app.schedule_statuses() if s.schedule.name == "minutely"]
    assert (minutely.last_job_id, minutely.last_state) == (tick_id, None)
    with pytest.raises(ValueError, match="n_next must be a whole number from 1 to 100"):
        app.schedule_statuses(n_next=0)


# --- workflows ----------------------------------------------------------------------------------


def test_a_workflow_shows_its_steps_and_their_states(app: App) -> None:
    @app.task(name="wf.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="wf.total")
    def total(values: list[int]) -> int:
        return sum(values)

    flow = chain(add.s(1, 2), group([add.s(10), add.s(20)]), total.s()).send()
    status = app.get_workflow(flow.id)
    assert (status.id, status.state, status.finished_at) == (flow.id, "running", None)
    assert [(s.name, s.task, s.state, s.parents) for s in status.steps] == [
        ("0", "wf.add", JobState.QUEUED, []),
        ("1", "wf.add", None, ["0"]),
        ("2", "wf.add", None, ["0"]),
        ("3", "wf.total", None, ["1", "2"]),
    ]
    assert status.steps[0].job_id == f"wf:{flow.id}:0"
    assert app.get_job(status.steps[0].job_id).state is JobState.QUEUED
    other = chain(add.s(0, 0), add.s(1)).send()
    assert [w.id for w in app.list_workflows()] == [flow.id, other.id]  # oldest first
    assert [w.id for w in app.list_workflows(limit=1)] == [flow.id]

    assert app.run_until_idle() == 6
    status = app.get_workflow(flow.id)
    assert status.state == "succeeded" and status.finished_at is not None
    assert status.finished_at >= status.created_at
    assert [s.state for s in status.steps] == [JobState.SUCCEEDED] * 4
    assert app.list_workflows() == []  # ended workflows are not listed
    with pytest.raises(JobNotFoundError, match="workflow nope does not exist"):
        app.get_workflow("nope")
    with pytest.raises(ValueError, match="limit must be a whole number from 1 to 1000"):
        app.list_workflows(limit=0)


# --- counts at every transition -----------------------------------------------------------------


def _check_counts(app: App) -> None:
    """``stats`` and every listing total agree with the jobs as listed one by one."""
    jobs = app.list_jobs(limit=1000).jobs
    truth: dict[tuple[str, str], int] = {}
    for job in jobs:
        truth[job.queue, job.state.value] = truth.get((job.queue, job.state.value), 0) + 1
    stats = {s.queue: s for s in app.stats()}
    for queue in {q for q, _ in truth} | set(stats):
        expected = {s.value: truth.get((queue, s.value), 0) for s in JobState}
        assert stats[queue].counts == expected, queue
        assert stats[queue].estimated == []  # a small store: every count is exact
        for state, n in expected.items():
            page = app.list_jobs(state=state, queue=queue, limit=1)
            assert (page.total, page.total_estimated) == (n, False), (queue, state)
    assert app.list_jobs(limit=1).total == len(jobs)
    finished = [j for j in jobs if j.state in (JobState.SUCCEEDED, JobState.FAILED)]
    page = app.list_jobs(state=["succeeded", "failed"], limit=1)
    assert page.total == len(finished)


def test_counts_follow_every_transition(app: App) -> None:
    broker = opened(app)
    app.run_sync(broker.enqueue([_new(f"q{n}", queue="a") for n in range(4)]))
    app.run_sync(broker.enqueue([_new(f"s{n}", queue="a", delay_s=3600) for n in range(2)]))
    app.run_sync(broker.enqueue([_new("b0", queue="b"), _new("b1", queue="b", delay_s=60)]))
    _check_counts(app)
    claimed = {j.id: j for j in app.run_sync(broker.claim(["a"], 3, "w", 30.0))}
    _check_counts(app)
    q0, q1, q2 = (claimed[i] for i in ("q0", "q1", "q2"))
    outcomes = [Finish(claim_of(q0), Succeeded(b"1")), Finish(claim_of(q1), _failed())]
    assert app.run_sync(broker.finish(outcomes)) == [True, True]
    _check_counts(app)
    retry_later = RetryAt(run_at=app.now() + 3600, error=ErrorInfo("E", "later"))
    assert app.run_sync(broker.finish([Finish(claim_of(q2), retry_later)])) == [True]
    _check_counts(app)
    assert app.retry_jobs(["q1"]) == ["q1"]  # failed -> queued
    assert app.cancel_job("s0") is JobState.CANCELLED  # scheduled -> cancelled
    assert app.run_job_now("s1") is JobState.SCHEDULED  # scheduled -> queued
    _check_counts(app)
    assert app.purge("b") == 2  # queued and scheduled deleted
    assert app.retry_jobs(["s0"]) == ["s0"]  # cancelled -> queued
    _check_counts(app)
    claimed = app.run_sync(broker.claim(["a"], 10, "w", 30.0))
    done = [Finish(claim_of(j), Cancelled() if j.id == "q3" else Succeeded(b"2")) for j in claimed]
    assert all(app.run_sync(broker.finish(done)))
    _check_counts(app)
    assert app.delete_jobs(["q3"]) == ["q3"]
    _check_counts(app)
    assert app.run_sync(broker.prune(app.now() + 60, limit=2)) == 2
    _check_counts(app)
    assert app.run_sync(broker.prune(app.now() + 60)) > 0
    _check_counts(app)
    assert app.list_jobs(order="finished").jobs == []


def test_the_oldest_waiting_age_counts_from_a_run_at_long_past(app: App) -> None:
    """A job sent with a ``run_at`` long past (here 1970) is the oldest waiting one (Redis
    reads ages off its ready index's scores, which cannot hold a time before 2025)."""
    broker = opened(app)
    app.run_sync(broker.enqueue([_new("recent"), _new("ancient", run_at=1000.0)]))
    app.run_sync(broker.enqueue([_new("other", queue="other", run_at=app.now() - 3600)]))
    stats = {s.queue: s for s in app.stats()}
    now = app.now()
    oldest, other = stats["default"].oldest_waiting_s, stats["other"].oldest_waiting_s
    assert oldest is not None and abs(oldest - (now - 1000.0)) < 60
    assert other is not None and 3600 - 60 < other < 3600 + 60


def test_counts_follow_lost_leases_and_jobs_coming_due(app: App) -> None:
    """The transitions no admin call makes: a lease that expires (to failed, or cancelled if a
    cancel was asked), and a delayed job promoted to queued when it comes due."""
    broker = opened(app)
    app.run_sync(broker.enqueue([_new("lost"), _new("stopped")]))
    app.run_sync(broker.enqueue([_new("soon", queue="later", delay_s=0.2)]))
    _check_counts(app)
    claimed = app.run_sync(broker.claim(["default"], 2, "gone", 0.05))
    assert {j.id for j in claimed} == {"lost", "stopped"}
    assert app.cancel_job("stopped") is JobState.RUNNING
    recovered: dict[str, JobState] = {}

    def both_recovered() -> bool:
        recovered.update(app.run_sync(broker.recover(1)))  # the first lost lease fails it
        return len(recovered) == 2

    wait_until(both_recovered, what="both leases to expire and be recovered")
    assert recovered == {"lost": JobState.FAILED, "stopped": JobState.CANCELLED}
    _check_counts(app)
    due = wait_until(
        lambda: app.run_sync(broker.claim(["later"], 1, "w", 30.0)),
        what="the delayed job to come due and be claimed",
    )
    assert [j.id for j in due] == ["soon"]
    _check_counts(app)
