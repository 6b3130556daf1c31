"""Listing totals with a task or meta filter on a large store: SQLite and Redis read at most
``COUNT_SCAN_MAX`` jobs and estimate past that (PostgreSQL's estimate is the planner's, tested
in ``test_postgres.py``). Here the cap is lowered so a few hundred jobs are "large"."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskmill import App
from taskmill.job import NewJob

MODULES = {"sqlite": "taskmill.brokers.sqlite.broker", "redis": "taskmill.brokers.redis"}


@pytest.fixture(params=sorted(MODULES))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def app(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[App]:
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        url = f"{request.getfixturevalue('redis_server').url}?prefix=t{uuid.uuid4().hex[:12]}:"
    app = App(url)
    yield app
    app.close()


def test_a_total_with_a_task_filter_is_estimated_past_the_cap(
    app: App, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app.open()
    jobs = [
        NewJob(id=f"j{n:03d}", task="b.other" if n % 4 == 0 else "a.work", queue="default",
               payload=b"[[],{}]", meta={"n": n % 2})
        for n in range(400)
    ]  # fmt: skip
    app.run_sync(app.broker.enqueue(jobs))
    exact = app.list_jobs(task="a.", limit=1)
    assert (exact.total, exact.total_estimated) == (300, False)
    monkeypatch.setattr(f"{MODULES[kind]}.COUNT_SCAN_MAX", 100)
    # the newest 100 (or 25 per index, in proportion) hold the same share: 3 in 4
    estimated = app.list_jobs(task="a.", limit=1)
    assert (estimated.total, estimated.total_estimated) == (300, True)
    by_meta = app.list_jobs(state="queued", queue="default", meta={"n": 1}, limit=1)
    assert (by_meta.total, by_meta.total_estimated) == (200, True)
    plain = app.list_jobs(state="queued", limit=1)  # no task or meta filter: still counted
    assert (plain.total, plain.total_estimated) == (400, False)
    assert len(estimated.jobs) == 1 and estimated.jobs[0].task == "a.work"
