"""Bad input at both ends: what a producer refuses, and what a worker survives."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from taskmill import (
    App,
    JobFailedError,
    JobState,
    PayloadTooLargeError,
    SerializationError,
)
from taskmill.testing import running_worker
from taskmill.worker.runners import PoolKind

from .conftest import AppFactory
from .helpers import opened


class Fatal(BaseException):
    """A BaseException that is neither SystemExit nor KeyboardInterrupt."""


def _stored(app: App) -> list[str]:
    return [j.id for j in app.run_sync(opened(app).list_jobs())]


# --- at the producer: nothing is stored ----------------------------------------------------


def test_wrong_call_at_send_names_the_task_and_stores_nothing(app: App) -> None:
    @app.task(name="billing.charge")
    def charge(order_id: int, *, amount: int) -> None:
        return None

    with pytest.raises(TypeError, match=r"billing\.charge") as info:
        charge.send(1)  # type: ignore[call-arg]
    assert "amount" in str(info.value)
    with pytest.raises(TypeError, match=r"billing\.charge"):
        charge.send(1, 2, amount=3)  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"billing\.charge"):
        charge.send(1, amount=3, currency="EUR")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"billing\.charge"):
        charge.options(priority=3).send()  # type: ignore[call-arg]
    assert _stored(app) == []


async def test_wrong_call_at_asend_stores_nothing(app: App) -> None:
    @app.task(name="billing.refund")
    def refund(order_id: int) -> None:
        return None

    with pytest.raises(TypeError, match=r"billing\.refund"):
        await refund.asend()  # type: ignore[call-arg]
    assert [j.id for j in await (await app.abroker()).list_jobs()] == []


def test_non_serialisable_arguments_are_refused(app: App) -> None:
    @app.task(name="store.put")
    def put(value: object) -> None:
        return None

    for bad in (object(), Fatal(), {"k": [object()]}, {(1, 2): "tuple key"}):
        with pytest.raises(SerializationError, match=r"store\.put"):
            put.send(bad)
    with pytest.raises(SerializationError):
        put.send_many([("fine",), (object(),)])
    assert _stored(app) == []


def test_oversized_payload_is_refused(app_factory: AppFactory) -> None:
    app = app_factory(max_payload_bytes=1024)

    @app.task(name="store.blob")
    def blob(data: str) -> None:
        return None

    with pytest.raises(PayloadTooLargeError, match=r"store\.blob") as info:
        blob.send("x" * 2000)
    assert "1,024" in str(info.value)
    with pytest.raises(PayloadTooLargeError):
        blob.send_many([("small",), ("y" * 5000,)])
    assert _stored(app) == []
    assert app.get_job(blob.send("x" * 900).id).state is JobState.QUEUED


def test_default_payload_limit_is_one_mebibyte(app: App) -> None:
    @app.task(name="store.big")
    def big(data: str) -> None:
        return None

    with pytest.raises(PayloadTooLargeError):
        big.send("z" * (1 << 20))
    assert big.send("z" * ((1 << 20) - 100)).status() is JobState.QUEUED


# --- at the worker: the job fails clearly, the worker carries on ----------------------------


def test_unknown_task_fails_clearly_and_worker_continues(app: App) -> None:
    @app.task()
    def known() -> str:
        return "ran"

    ghost = app.send_task("old.module.renamed_task", [1], {"x": 2}, external=True)
    assert app.get_job(ghost.id).task == "old.module.renamed_task"
    with running_worker(app, concurrency=1):
        with pytest.raises(JobFailedError) as info:
            ghost.result(timeout=10)
        assert known.send().result(timeout=10) == "ran"
    assert info.value.type == "taskmill.errors.UnknownTaskError"
    assert "old.module.renamed_task" in info.value.message
    job = app.get_job(ghost.id)
    assert job.state is JobState.FAILED and job.attempt == 1, "no retry can fix a missing task"


def test_arguments_that_no_longer_bind(app_factory: AppFactory) -> None:
    old = app_factory()

    @old.task(name="accounts.sync")
    def sync_v1(account_id: int) -> int:
        return account_id

    handle = sync_v1.send(5)

    new = app_factory(share=old)  # a later deploy: same task name, new signature

    @new.task(name="accounts.sync", retries=3)
    def sync_v2(account_id: int, region: str) -> str:
        return f"{account_id}@{region}"

    @new.task()
    def after() -> str:
        return "still working"

    with running_worker(new, concurrency=1):
        with pytest.raises(JobFailedError) as info:
            handle.result(timeout=10)
        assert after.send().result(timeout=10) == "still working"
    assert info.value.type == "TypeError"
    assert "accounts.sync" in info.value.message and "signature" in info.value.message
    assert "region" in info.value.message
    assert old.get_job(handle.id).attempt == 1


def test_payload_that_is_not_json(app: App, corrupt_payload: Callable[[App, str], None]) -> None:
    @app.task(retries=3)
    def fine(n: int) -> int:
        return n

    handle = fine.send(1)
    corrupt_payload(app, handle.id)
    # inspecting the corrupt job still works
    assert app.get_job(handle.id).state is JobState.QUEUED
    with running_worker(app, concurrency=1):
        with pytest.raises(JobFailedError) as info:
            handle.result(timeout=10)
        assert fine.send(2).result(timeout=10) == 2
    assert info.value.type == "taskmill.errors.SerializationError"
    assert "JSON" in info.value.message
    assert app.get_job(handle.id).attempt == 1


@pytest.mark.parametrize("pool", ["thread", "async"])
def test_base_exceptions_fail_the_job_and_the_worker_keeps_running(
    app: App, pool: PoolKind
) -> None:
    @app.task(retries=2)
    def raise_it(kind: str) -> None:
        if kind == "exit":
            raise SystemExit(3)
        if kind == "interrupt":
            raise KeyboardInterrupt
        raise Fatal("fatal")

    @app.task(retries=2)
    async def araise_it(kind: str) -> None:
        raise_it(kind)

    @app.task()
    def ok() -> str:
        return "ok"

    expected = {"exit": "SystemExit", "interrupt": "KeyboardInterrupt", "fatal": "Fatal"}
    with running_worker(app, concurrency=1, pool=pool):
        for task in (raise_it, araise_it):
            for kind, type_name in expected.items():
                handle = task.send(kind)
                with pytest.raises(JobFailedError) as info:
                    handle.result(timeout=10)
                assert info.value.type.endswith(type_name)
                job = app.get_job(handle.id)
                assert job.state is JobState.FAILED
                assert job.attempt == 1, "only Exceptions are retried by default"
                assert ok.send().result(timeout=10) == "ok"


def test_result_that_is_not_serialisable(app: App) -> None:
    @app.task(retries=3)
    def returns_object() -> object:
        return object()

    @app.task()
    async def areturns_exception() -> Exception:
        return ValueError("not data")

    with running_worker(app):
        handle = returns_object.send()
        with pytest.raises(JobFailedError) as info:
            handle.result(timeout=10)
        ahandle = areturns_exception.send()
        with pytest.raises(JobFailedError) as ainfo:
            ahandle.result(timeout=10)
    assert info.value.type == "taskmill.errors.SerializationError"
    assert returns_object.name in info.value.message and "JSON" in info.value.message
    assert ainfo.value.type == "taskmill.errors.SerializationError"
    assert app.get_job(handle.id).attempt == 1, "retrying cannot make a result serialisable"
