"""The admin API of ``App`` on the memory broker: what it adds over the broker contract
(argument checks, the app's queues, retry filters, worker status, the task registry).
The contract itself is tested on every broker in ``tests/conformance/test_admin.py``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from taskmill import App, ConfigurationError, JobNotFoundError, JobState, Limit
from taskmill.admin import MAX_PAGE, WorkerStatus
from taskmill.brokers.base import Broker
from taskmill.brokers.memory import MemoryBroker
from taskmill.job import Claim, ErrorInfo, Failed, Finish, NewJob, Succeeded, WorkerInfo
from taskmill.testing import wait_until


@pytest.fixture
def app() -> Iterator[App]:
    app = App("memory://")
    yield app
    app.close()


def test_stats_lists_the_apps_queues_even_when_empty(app: App) -> None:
    @app.task(queue="mail")
    def welcome() -> None: ...

    other = App("memory://")  # no tasks: only queues with jobs
    try:
        assert other.stats() == []
    finally:
        other.close()
    assert [(s.queue, sum(s.counts.values())) for s in app.stats()] == [("mail", 0)]
    welcome.options(queue="zz").send()
    assert [s.queue for s in app.stats()] == ["mail", "zz"]


def test_list_jobs_checks_its_arguments(app: App) -> None:
    for bad in (0, MAX_PAGE + 1, True, 2.5):
        with pytest.raises(ValueError, match=f"limit must be a whole number from 1 to {MAX_PAGE}"):
            app.list_jobs(limit=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown job state 'finished' \(valid: scheduled"):
        app.list_jobs(state="finished")
    with pytest.raises(ValueError, match="lists finished jobs only; running"):
        app.list_jobs(order="finished", state=["failed", "running"])
    with pytest.raises(ConfigurationError, match=r"meta filter\['user'\] must be a str"):
        app.list_jobs(meta={"user": {"id": 1}})  # type: ignore[dict-item]


def test_list_jobs_takes_one_state_or_several(app: App) -> None:
    @app.task()
    def work() -> None: ...

    queued = work.send()
    scheduled = work.options(delay=60).send()
    cancelled = work.options(delay=60).send()
    app.cancel_job(cancelled.id)

    def ids(state: object) -> set[str]:
        return {j.id for j in app.list_jobs(state=state).jobs}  # type: ignore[arg-type]

    assert ids("queued") == ids(JobState.QUEUED) == {queued.id}
    assert ids(["queued", JobState.SCHEDULED]) == {queued.id, scheduled.id}
    assert ids(("cancelled",)) == {cancelled.id}
    assert ids(None) == {queued.id, scheduled.id, cancelled.id}


def test_async_forms_run_on_the_callers_loop(app: App) -> None:
    @app.task()
    def work() -> None: ...

    async def main() -> tuple[int, int | None, JobState]:
        handle = await work.asend()
        stats = await app.astats()
        page = await app.alist_jobs()
        state = await app.acancel_job(handle.id)
        return stats[0].counts["queued"], page.total, state

    assert asyncio.run(main()) == (1, 1, JobState.CANCELLED)


def test_cancel_job_of_no_job_is_job_not_found(app: App) -> None:
    with pytest.raises(JobNotFoundError, match="job nope does not exist"):
        app.cancel_job("nope")


def test_retry_jobs_by_ids_or_by_filters(app: App) -> None:
    @app.task(name="billing.charge", retries=0)
    def charge(fail: bool) -> None:
        if fail:
            raise RuntimeError("declined")

    @app.task(name="mail.send", queue="mail", retries=0)
    def send(fail: bool) -> None:
        if fail:
            raise RuntimeError("bounced")

    charged = charge.send_many([(True,), (True,), (False,)])
    bounced = send.send(True)
    app.run_until_idle()
    with pytest.raises(ValueError, match="job ids or queue=/task= filters, not both"):
        app.retry_jobs([bounced.id], queue="mail")
    assert app.retry_jobs(task="billing.") == [h.id for h in reversed(charged[:2])]
    assert app.retry_jobs(queue="default") == [], "queued now, not failed"
    assert app.retry_jobs(queue="mail", task="mail.") == [bounced.id]
    app.run_until_idle()
    assert sorted(app.retry_jobs()) == sorted([bounced.id, charged[0].id, charged[1].id])
    assert app.retry_jobs([charged[2].id]) == [], "succeeded: not retried"


def test_purge_all_purges_every_queue_with_waiting_jobs(app: App) -> None:
    @app.task(queue="a")
    def work() -> None: ...

    work.send()
    work.options(queue="b", delay=60).send()
    work.options(queue="c").send()
    app.pause("c")
    assert app.purge_all() == {"a": 1, "b": 1, "c": 1}
    assert app.purge_all() == {}


def test_workers_are_lost_after_three_silent_heartbeat_intervals(app: App) -> None:
    app = App("memory://", heartbeat_s=0.05)
    try:
        now = time.time()
        info = WorkerInfo("w1", "host", 1, ["default"], 4, now, now, ["job-1"])
        app.run_sync(app.broker.heartbeat(info, [], 5.0))
        (status,) = app.workers()
        assert isinstance(status, WorkerStatus) and isinstance(status, WorkerInfo)
        assert (status.id, status.concurrency, status.running, status.lost) == (
            "w1",
            4,
            ["job-1"],
            False,
        )
        assert 0 <= status.heartbeat_age_s < 0.15
        # 3 x 0.05 s without a heartbeat
        wait_until(lambda: app.workers()[0].lost, what="the worker to count as lost")
        assert app.workers()[0].heartbeat_age_s > 0.15
    finally:
        app.close()


def test_registered_tasks_describe_defaults_and_schedules(app: App) -> None:
    @app.periodic(every=3600, name="hourly")
    @app.periodic(cron="*/5 * * * *", name="often")
    @app.task(name="b.sync", priority=5, timeout=30, rate_limit="500/m")
    def sync() -> None: ...

    @app.task(name="a.rebuild", retries=0, concurrency=Limit(max=3), rate_limit="2/s")
    def rebuild() -> None: ...

    @app.task(name="c.rare", rate_limit="7/h")
    def rare() -> None: ...

    a, b, c = app.registered_tasks()
    assert (a.name, a.queue, a.retries, a.concurrency, a.rate_limit) == (
        "a.rebuild",
        "default",
        0,
        3,
        "2/s",
    )
    assert (b.priority, b.timeout_s, b.retries, b.rate_limit) == (5, 30.0, 3, "500/m")
    assert c.rate_limit == "7/h"
    assert sorted((s.name, s.cron, s.every_s) for s in b.schedules) == [
        ("hourly", None, 3600.0),
        ("often", "*/5 * * * *", None),
    ]
    assert a.schedules == []


def test_the_contracts_own_finished_per_minute_walks_the_finished_jobs() -> None:
    """A broker that does not count per minute itself gets the base class's walk of
    ``find_jobs``: the same answer as the memory broker's own pass, across pages."""

    class Walking(MemoryBroker):
        finished_per_minute = Broker.finished_per_minute

    async def scenario(broker: MemoryBroker) -> tuple[list[tuple[int, JobState, int]], ...]:
        jobs = [NewJob(id=f"j{n:04d}", task="t", queue=("a", "b")[n % 2], payload=b"[]")
                for n in range(2500)]  # fmt: skip
        await broker.enqueue(jobs)
        claimed = await broker.claim(["a", "b"], 2500, "w", 30.0)
        error = Failed(ErrorInfo("E", "bad"))
        await broker.finish(
            [
                Finish(
                    Claim(j.id, j.lease_token or ""),
                    error if j.id.endswith("7") else Succeeded(b"1"),
                )
                for j in claimed
            ]
        )
        now = time.time()
        return (
            sorted(await broker.finished_per_minute(now - 120)),
            sorted(await broker.finished_per_minute(now - 120, "a")),
            await broker.finished_per_minute(now + 120),
        )

    walked = asyncio.run(scenario(Walking()))
    passed = asyncio.run(scenario(MemoryBroker()))
    assert walked == passed
    everything, of_a, later = walked
    assert sum(n for _, s, n in everything if s is JobState.FAILED) == 250
    assert sum(n for _, _, n in everything) == 2500 and sum(n for _, _, n in of_a) == 1250
    assert later == []
