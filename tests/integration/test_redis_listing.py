"""Redis lists jobs two ways (see ``find_jobs`` in ``taskmill/brokers/redis.py``): a narrow
filter reads the few jobs of its state and queue indexes and sorts them; a wide one walks the
``jobs`` index. Both give the same pages, and a job stored before the ``jobs`` index existed is
indexed when the broker opens."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from servers import RedisServer
from taskmill import App, JobState
from taskmill.brokers import redis as redis_broker
from taskmill.brokers.base import JobQuery


def _pages(app: App, query: JobQuery, limit: int) -> list[list[str]]:
    broker = app.broker
    pages, cursor = [], None
    while True:
        page = app.run_sync(broker.find_jobs(query, limit=limit, cursor=cursor, count=True))
        pages.append([j.id for j in page.jobs])
        cursor = page.next_cursor
        if cursor is None:
            return pages


@pytest.mark.timeout(60)
def test_narrow_and_wide_listings_agree(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = App(f"{redis_server.url}?prefix=list{uuid.uuid4().hex[:8]}:")

    @app.task(name="work")
    def work(n: int) -> int:
        return n

    try:
        handles = work.send_many([(n,) for n in range(30)])
        work.options(queue="other").send_many([(n,) for n in range(5)])
        work.options(delay=3600, meta={"batch": 2}).send_many([(n,) for n in range(7)])
        for h in handles[::3]:
            h.cancel()
        queries: list[dict[str, Any]] = [
            {"states": frozenset({JobState.QUEUED})},
            {"states": frozenset({JobState.CANCELLED, JobState.SCHEDULED})},
            {"queue": "other"},
            {"queue": "default", "meta": {"batch": 2}},
            {"states": frozenset({JobState.QUEUED}), "task": "wo"},
        ]
        narrow = {i: _pages(app, JobQuery(**q), 4) for i, q in enumerate(queries)}
        monkeypatch.setattr(redis_broker, "_NARROW_MAX", 0)
        wide = {i: _pages(app, JobQuery(**q), 4) for i, q in enumerate(queries)}
        assert narrow == wide
        assert sum(map(len, narrow[0])) == 25 and sum(map(len, narrow[1])) == 17
        assert sum(map(len, narrow[3])) == 7
    finally:
        app.run_sync(app.broker.purge("default"))
        app.run_sync(app.broker.purge("other"))
        app.close()


@pytest.mark.timeout(60)
def test_jobs_stored_before_the_jobs_index_are_listed_after_an_upgrade(
    redis_server: RedisServer,
) -> None:
    prefix = f"old{uuid.uuid4().hex[:8]}:"
    url = f"{redis_server.url}?prefix={prefix}"
    old, new = App(url), App(url)

    @old.task(name="work")
    def work(n: int) -> int:
        return n

    admin = redis_server.client()
    try:
        before = [h.id for h in work.send_many([(n,) for n in range(5)])]
        # as a taskmill of key layout 1 left them: no `jobs` index, no layout mark
        admin.delete(f"{prefix}jobs", f"{prefix}layout")
        new.open()  # opening the broker indexes the old jobs
        assert admin.get(f"{prefix}layout") == b"2"
        after = work.send(9).id
        first = new.list_jobs(limit=2)
        listed = [j.id for j in first.jobs]
        listed += [j.id for j in new.list_jobs(limit=10, cursor=first.next_cursor).jobs]
        assert listed == [after, *sorted(before, reverse=True)]
    finally:
        admin.close()
        for app in (old, new):
            app.run_sync(app.broker.purge("default"))
            app.close()
