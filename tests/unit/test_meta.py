"""Job metadata on the memory broker: what ``options(meta=...)`` accepts and refuses, and
where the metadata goes (the stored job, listings, hooks, periodic ticks, ``send_task``).
Storage and filtering on every broker: ``tests/conformance/test_admin.py``."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from taskmill import App, ConfigurationError
from taskmill.job import describe
from taskmill.meta import MAX_META_BYTES, parse_pair
from taskmill.scheduler import Scheduler


@pytest.fixture
def app() -> Iterator[App]:
    app = App("memory://")
    yield app
    app.close()


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"": 1}, "meta key '' is not 1 to 64 letters"),
        ({"a b": 1}, "meta key 'a b' is not"),
        ({"x" * 65: 1}, "is not 1 to 64 letters"),
        ({'q"uote': 1}, "is not 1 to 64 letters"),
        ({1: 1}, "meta key 1 is not"),
        ({"user": [1]}, r"meta\['user'\] must be a str, int, float, bool or None, not list"),
        ({"user": {"id": 1}}, "not dict"),
        ({"big": 2**63}, r"meta\['big'\] = 9223372036854775808 does not fit in 64 bits"),
        ({"nan": float("nan")}, r"meta\['nan'\] must be a finite number"),
        (
            {"blob": "x" * MAX_META_BYTES},
            f"meta is {MAX_META_BYTES + 11:,} bytes as JSON; the limit is {MAX_META_BYTES:,}",
        ),
        (["user_id", 1], "meta must be a mapping of str keys"),
    ],
)
def test_bad_metadata_is_refused_with_the_reason_and_nothing_is_stored(
    app: App, meta: Any, message: str
) -> None:
    @app.task()
    def work() -> None: ...

    with pytest.raises(ConfigurationError, match=message):
        work.options(meta=meta).send()
    assert app.list_jobs().total == 0


def test_metadata_goes_with_the_job_to_listings_hooks_and_describe(app: App) -> None:
    seen: list[tuple[str, Any]] = []
    app.on_enqueue(lambda job: seen.append(("enqueue", job.meta)))
    app.on_start(lambda job: seen.append(("start", job.meta)))
    app.on_success(lambda job, result: seen.append(("success", job.meta)))

    @app.task()
    def summarize(doc: int) -> int:
        return doc

    meta = {"user_id": 42, "agent_type": "summarizer", "created_by": "cron", "vip": True}
    handle = summarize.options(meta=meta).send(1)
    other = summarize.options(meta={"user_id": 7}).send(2)
    plain = summarize.send(3)
    assert app.get_job(handle.id).meta == meta
    assert app.get_job(plain.id).meta == {}
    assert [j.id for j in app.list_jobs(meta={"user_id": 42}).jobs] == [handle.id]
    assert [j.id for j in app.list_jobs(meta={"vip": True, "created_by": "cron"}).jobs] == [
        handle.id
    ]
    assert app.list_jobs(meta={"user_id": 7}).jobs[0].id == other.id
    assert describe(app.get_job(handle.id))["meta"] == meta
    app.run_until_idle()
    assert [m for kind, m in seen if kind != "enqueue" and m == meta] == [meta, meta]
    assert ("enqueue", meta) in seen and ("start", {}) in seen


def test_send_task_and_periodic_ticks_carry_metadata(app: App) -> None:
    @app.periodic(every=60, name="sync-every-minute", meta={"created_by": "scheduler"})
    @app.task(name="accounts.sync")
    def sync() -> None: ...

    by_name = app.send_task("accounts.sync", meta={"created_by": "api"})
    assert app.get_job(by_name.id).meta == {"created_by": "api"}
    unregistered = app.send_task("elsewhere.task", meta={"created_by": "api"}, external=True)
    assert app.get_job(unregistered.id).meta == {"created_by": "api"}

    tick = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    job = Scheduler(app)._job(app.schedules["sync-every-minute"], tick)
    assert job.meta == {"created_by": "scheduler"}
    with pytest.raises(ConfigurationError, match=r"meta\['when'\] must be a str"):
        app.periodic(every=60, name="bad", meta={"when": tick})(sync)


def test_command_line_pairs_read_json_scalars_or_text() -> None:
    assert parse_pair("user_id=42") == ("user_id", 42)
    assert parse_pair("ratio=0.5") == ("ratio", 0.5)
    assert parse_pair("vip=true") == ("vip", True)
    assert parse_pair("gone=null") == ("gone", None)
    assert parse_pair('code="007"') == ("code", "007")
    assert parse_pair("agent=gpt-4o") == ("agent", "gpt-4o")
    assert parse_pair("list=[1,2]") == ("list", "[1,2]")
    assert parse_pair("eq=a=b") == ("eq", "a=b")
    assert parse_pair("empty=") == ("empty", "")
    with pytest.raises(ConfigurationError, match="expected KEY=VALUE, not 'user_id'"):
        parse_pair("user_id")
    with pytest.raises(ConfigurationError, match="meta key 'bad key' is not"):
        parse_pair("bad key=1")
