"""The broker side of the admin API: ``find_jobs`` (filters, both orders, keyset pages, totals),
``get_many``, and job metadata stored with the job, on every broker."""

from __future__ import annotations

from typing import Any

import pytest

from taskmill import App, JobNotFoundError, JobState, current_job
from taskmill.brokers.base import Broker, JobPage, JobQuery
from taskmill.errors import ConfigurationError
from taskmill.job import Failed, Finish, Job, NewJob, Succeeded
from taskmill.testing import running_worker

from .helpers import claim_of, opened, wait_until


def _new(job_id: str, *, task: str = "t.work", queue: str = "default", **kw: Any) -> NewJob:
    return NewJob(id=job_id, task=task, queue=queue, payload=b"[[],{}]", **kw)


def _store(app: App, *jobs: NewJob) -> Broker:
    broker = opened(app)
    result = app.run_sync(broker.enqueue(jobs))
    assert not result.existing
    return broker


def _page(app: App, query: JobQuery, **kw: Any) -> JobPage:
    return app.run_sync(opened(app).find_jobs(query, **kw))


def _ids(app: App, query: JobQuery | None = None, **kw: Any) -> list[str]:
    return [j.id for j in _page(app, query or JobQuery(), limit=1000, **kw).jobs]


def _all_pages(app: App, query: JobQuery, limit: int) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        page = _page(app, query, limit=limit, cursor=cursor)
        pages.append([j.id for j in page.jobs])
        cursor = page.next_cursor
        if cursor is None:
            return pages


def _claim_all(app: App, queue: str = "default") -> dict[str, Job]:
    return {j.id: j for j in app.run_sync(opened(app).claim([queue], 100, "w", 30.0))}


def test_get_many_reads_jobs_in_the_order_asked_with_none_for_missing_ones(app: App) -> None:
    broker = _store(app, _new("a"), _new("b", queue="other", meta={"n": 1}), _new("c"))
    claimed = _claim_all(app)["a"]
    jobs = app.run_sync(broker.get_many(["b", "missing", "a", "b"]))
    assert [None if j is None else j.id for j in jobs] == ["b", None, "a", "b"]
    b, _, a, _ = jobs
    assert a is not None and b is not None
    assert a == app.run_sync(broker.get("a")) and a.lease_token == claimed.lease_token
    assert a.state is JobState.RUNNING and a.attempt == 1
    assert b.queue == "other" and b.meta == {"n": 1} and b.state is JobState.QUEUED
    assert app.run_sync(broker.get_many([])) == []


def test_get_many_reads_a_batch_larger_than_one_statement_takes(app: App) -> None:
    stored = [f"job-{n:04d}" for n in range(0, 1200, 3)]
    _store(app, *(_new(i) for i in stored))
    asked = [f"job-{n:04d}" for n in reversed(range(1200))]
    jobs = app.run_sync(opened(app).get_many(asked))
    assert len(jobs) == len(asked)
    found = [j.id for j in jobs if j is not None]
    assert found == [i for i in asked if i in set(stored)]
    assert all(j is None or j.id == i for j, i in zip(jobs, asked, strict=True))


def test_pages_go_newest_first_from_a_cursor_with_a_total(app: App) -> None:
    ids = [f"job-{n}" for n in range(7)]
    _store(app, *(_new(i) for i in ids[:3]))  # one batch
    for i in ids[3:]:
        _store(app, _new(i))
    newest_first = ids[::-1]

    assert _all_pages(app, JobQuery(), limit=3) == [
        newest_first[0:3],
        newest_first[3:6],
        newest_first[6:],
    ]
    first = _page(app, JobQuery(), limit=3, count=True)
    assert first.total == 7
    assert _page(app, JobQuery(), limit=3).total is None, "no count unless asked"
    exact = _page(app, JobQuery(), limit=7, count=True)
    assert exact.next_cursor is None and len(exact.jobs) == 7

    # a job sent after the first page does not shift the next ones (keyset, not offset)
    _store(app, _new("job-late"))
    second = _page(app, JobQuery(), limit=3, cursor=first.next_cursor, count=True)
    assert [j.id for j in second.jobs] == newest_first[3:6]
    assert second.total == 8
    assert _ids(app)[0] == "job-late"


def test_filters_by_state_queue_and_task_prefix(app: App) -> None:
    broker = _store(
        app,
        _new("a1", task="billing.charge"),
        _new("a2", task="billing.refund"),
        _new("b1", task="mail.send", queue="mail"),
        _new("c1", task="billing.charge", delay_s=3600),
        _new("d1", task="billing", queue="mail"),
    )
    claimed = _claim_all(app, "mail")
    assert set(claimed) == {"b1", "d1"}
    assert app.run_sync(broker.finish([Finish(claim_of(claimed["b1"]), Succeeded(b"1"))]))

    def ids(**filters: Any) -> list[str]:
        return _ids(app, JobQuery(**filters))

    assert ids(task="billing.") == ["c1", "a2", "a1"], "a prefix of the name"
    assert ids(task="billing") == ["d1", "c1", "a2", "a1"]
    assert ids(task="billing.charge") == ["c1", "a1"]
    assert ids(task="Billing") == [], "case matters"
    assert ids(queue="mail") == ["d1", "b1"]
    assert ids(states=frozenset({JobState.QUEUED})) == ["a2", "a1"]
    assert ids(states=frozenset({"running", "succeeded"})) == ["d1", "b1"]
    assert ids(states=frozenset({JobState.SCHEDULED}), task="billing.") == ["c1"]
    assert ids(states=frozenset({JobState.FAILED})) == []
    assert ids(queue="mail", task="mail.", states=frozenset({JobState.SUCCEEDED})) == ["b1"]
    assert ids(queue="nowhere") == []

    page = _page(app, JobQuery(task="billing."), limit=2, count=True)
    assert [j.id for j in page.jobs] == ["c1", "a2"] and page.total == 3
    rest = _page(app, JobQuery(task="billing."), limit=2, cursor=page.next_cursor, count=True)
    assert [j.id for j in rest.jobs] == ["a1"] and rest.next_cursor is None and rest.total == 3
    assert _page(app, JobQuery(queue="mail"), count=True).total == 2
    assert _page(app, JobQuery(states=frozenset({"queued"})), count=True).total == 2


def test_metadata_is_stored_returned_and_filtered(app: App) -> None:
    broker = _store(
        app,
        _new("m1", meta={"user_id": 42, "agent_type": "summarizer", "vip": True}),
        _new("m2", meta={"user_id": 42.0, "vip": False, "note": None}),
        _new("m3", meta={"user_id": "42"}),
        _new("m4"),
    )
    job = app.run_sync(broker.get("m1"))
    assert job is not None
    assert job.meta == {"user_id": 42, "agent_type": "summarizer", "vip": True}
    assert isinstance(job.meta["user_id"], int) and job.meta["vip"] is True
    assert app.get_job("m4").meta == {}
    assert {j.id: j.meta for j in app.run_sync(broker.claim(["default"], 10, "w", 30.0))} == {
        "m1": {"user_id": 42, "agent_type": "summarizer", "vip": True},
        "m2": {"user_id": 42.0, "vip": False, "note": None},
        "m3": {"user_id": "42"},
        "m4": {},
    }, "a claimed job carries its metadata to the worker (and its hooks)"

    def ids(**meta: Any) -> list[str]:
        return _ids(app, JobQuery(meta=meta))

    assert ids(user_id=42) == ["m2", "m1"], "numbers by value: 42 == 42.0"
    assert ids(user_id="42") == ["m3"], "a string is not a number"
    assert ids(user_id=42, agent_type="summarizer") == ["m1"], "every pair must match"
    assert ids(vip=True) == ["m1"] and ids(vip=False) == ["m2"]
    assert ids(vip=1) == [], "a boolean is not a number"
    assert ids(note=None) == ["m2"], "None matches a stored null, not a missing key"
    assert ids(missing="x") == []
    assert _page(app, JobQuery(meta={"user_id": 42}), count=True).total == 2
    assert _page(app, JobQuery(meta={"user_id": 42}), limit=1, count=True).total == 2


def test_finished_order_lists_the_latest_finished_first(app: App) -> None:
    broker = _store(app, *(_new(f"f{n}") for n in range(5)), _new("waiting", queue="other"))
    claimed = _claim_all(app)
    order = ["f3", "f0", "f4"]  # finished one call after another
    for job_id in order:
        outcome = Failed(_error()) if job_id == "f0" else Succeeded(b"null")
        assert app.run_sync(broker.finish([Finish(claim_of(claimed[job_id]), outcome)]))
    # finished in one call, they may share a finish time: in an order of the broker's choosing,
    # the same on every page, none skipped or repeated across pages
    both = [Finish(claim_of(claimed[i]), Succeeded(b"null")) for i in ("f1", "f2")]
    assert app.run_sync(broker.finish(both)) == [True, True]

    finished = JobQuery(order="finished")
    listed = _ids(app, finished)
    assert sorted(listed[:2]) == ["f1", "f2"] and listed[2:] == ["f4", "f0", "f3"]
    assert _all_pages(app, finished, limit=1) == [[i] for i in listed]
    assert _all_pages(app, finished, limit=2) == [listed[0:2], listed[2:4], listed[4:]]
    assert _page(app, finished, count=True).total == 5
    failed = JobQuery(order="finished", states=frozenset({"failed"}))
    assert _ids(app, failed) == ["f0"]
    assert _ids(app, JobQuery(order="finished", queue="other")) == []
    assert _ids(app, JobQuery(order="finished", task="t.")) == listed


def test_bad_queries_and_cursors_are_clear_errors(app: App) -> None:
    _store(app, _new("x1"), _new("x2"))
    with pytest.raises(ValueError, match="order='finished' lists finished jobs only; queued"):
        JobQuery(order="finished", states=frozenset({"queued"}))
    with pytest.raises(ValueError, match=r"unknown job state 'done' \(valid: scheduled"):
        JobQuery(states=frozenset({"done"}))
    with pytest.raises(ValueError, match="order must be 'enqueued' or 'finished'"):
        JobQuery(order="oldest")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="meta filter"):
        JobQuery(meta={"user": [1, 2]})  # type: ignore[dict-item]
    cursor = _page(app, JobQuery(), limit=1).next_cursor
    assert cursor is not None
    for bad in ["nonsense", cursor[:-2], "W10"]:
        with pytest.raises(ValueError, match="invalid cursor"):
            _page(app, JobQuery(), cursor=bad)
    with pytest.raises(ValueError, match=r"invalid cursor .* in 'finished' order"):
        _page(app, JobQuery(order="finished"), cursor=cursor)


def _error() -> Any:
    from taskmill.job import ErrorInfo

    return ErrorInfo("RuntimeError", "no")


@pytest.mark.timeout(60)
def test_run_now_makes_a_scheduled_job_due_and_wakes_a_worker(app: App) -> None:
    attempts: list[int] = []

    @app.task(retries=2, backoff=3600)
    def report(fail_first: bool) -> int:
        attempt = current_job().attempt
        attempts.append(attempt)
        if fail_first and attempt == 1:
            raise RuntimeError("try again in an hour")
        return attempt

    broker = opened(app)
    delayed = report.options(delay=3600).send(False)
    before = app.run_sync(broker.now())
    # the worker waits on the broker (its poll is far longer than this test may take), so
    # the job runs now only if run_now wakes it
    with running_worker(app, idle_poll_s=120.0):
        assert delayed.run_now() is JobState.SCHEDULED
        assert delayed.result(timeout=20) == 1

        retried = report.send(True)
        waiting = wait_until(
            lambda: (j := app.get_job(retried.id)).state is JobState.SCHEDULED and j,
            what="the first attempt to fail and wait an hour for its retry",
        )
        assert waiting.attempt == 1 and waiting.run_at > before + 3000
        assert app.run_job_now(retried.id) is JobState.SCHEDULED
        assert retried.result(timeout=20) == 2, "the attempt count went on, unchanged"
    assert attempts == [1, 1, 2]

    # finished, queued, running, missing: nothing changes, the state is returned
    assert delayed.run_now() is JobState.SUCCEEDED
    queued = report.send(False)
    run_at = app.get_job(queued.id).run_at
    assert queued.run_now() is JobState.QUEUED
    assert app.get_job(queued.id).run_at == run_at
    (running,) = app.run_sync(broker.claim(["default"], 1, "w", 30.0))
    assert app.run_job_now(running.id) is JobState.RUNNING
    assert app.get_job(running.id).state is JobState.RUNNING
    assert app.run_sync(broker.run_now("no-such-job")) is None
    with pytest.raises(JobNotFoundError):
        app.job("no-such-job").run_now()


def test_run_now_keeps_a_scheduled_jobs_attempt_and_makes_it_claimable(app: App) -> None:
    broker = _store(app, _new("later", delay_s=3600), _new("first"))
    assert app.run_sync(broker.claim(["default"], 10, "w", 30.0))[0].id == "first"
    assert app.run_sync(broker.claim(["default"], 10, "w", 30.0)) == []
    now = app.run_sync(broker.now())
    assert app.run_sync(broker.run_now("later")) is JobState.SCHEDULED
    job = app.get_job("later")
    assert job.state is JobState.QUEUED and job.attempt == 0
    assert now - 1 <= job.run_at <= app.run_sync(broker.now()) + 1
    (claimed,) = app.run_sync(broker.claim(["default"], 10, "w", 30.0))
    assert claimed.id == "later" and claimed.attempt == 1
    assert app.run_sync(broker.claim(["default"], 10, "w", 30.0)) == [], "claimed once"


@pytest.mark.timeout(60)
def test_metadata_sent_with_a_task_reaches_the_workers_hooks(app: App) -> None:
    seen: list[dict[str, Any]] = []
    app.on_start(lambda job: seen.append(dict(job.meta)))

    @app.task()
    def summarize(doc: int) -> int:
        return doc

    meta = {"user_id": 42, "agent_type": "summarizer", "ratio": 0.5, "vip": True, "x": None}
    handle = summarize.options(meta=meta).send(1)
    summarize.send(2)
    assert [j.id for j in app.list_jobs(meta={"user_id": 42}).jobs] == [handle.id]
    with running_worker(app):
        assert handle.result(timeout=20) == 1
        wait_until(lambda: len(seen) == 2, what="both jobs to start")
    assert meta in seen and {} in seen
    assert app.get_job(handle.id).meta == meta
    done = app.list_jobs(order="finished", meta={"agent_type": "summarizer"})
    assert [j.id for j in done.jobs] == [handle.id] and done.total == 1


@pytest.mark.timeout(60)
def test_workers_report_how_many_jobs_they_ran_and_how_many_raised(app: App) -> None:
    @app.task(retries=1, backoff=0)
    def work(fail: bool) -> None:
        if fail:
            raise RuntimeError("no")

    with running_worker(app) as worker:
        for h in [work.send(False), work.send(False)]:
            h.result(timeout=20)
        doomed = work.send(True)  # two runs that raise: retried once, then failed
        wait_until(lambda: doomed.status() is JobState.FAILED, what="the job to fail")

        def counters() -> tuple[int, int] | None:
            mine = [w for w in app.workers() if w.id == worker.id]
            return (mine[0].processed, mine[0].failed) if mine else None

        # the worker sends its counters with its next heartbeat (every 0.2 s here)
        assert wait_until(lambda: counters() == (4, 2) and counters()) == (4, 2)
        listed = opened(app).list_workers
        assert [(w.processed, w.failed) for w in app.run_sync(listed())] == [(4, 2)]


def test_a_large_batch_pages_through_whole(app: App) -> None:
    batch = [_new(f"b{n:04d}") for n in range(1200)]
    _store(app, *batch)
    pages = _all_pages(app, JobQuery(), limit=500)
    assert [len(p) for p in pages] == [500, 500, 200]
    assert [i for p in pages for i in p] == [j.id for j in reversed(batch)]
    assert _page(app, JobQuery(states=frozenset({"queued"})), count=True).total == 1200
