"""Feature stores (``brokers/features.py``): a broker that stores jobs only still runs jobs,
and each feature it lacks is a clear error at the first use, naming the feature and the
broker."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from taskmill import App, ConfigurationError, chain
from taskmill.brokers.base import Broker, Capabilities, JobQuery
from taskmill.brokers.features import (
    FEATURES,
    event_bus,
    limit_store,
    provides,
    schedule_store,
    workflow_store,
)
from taskmill.brokers.memory import MemoryBroker
from taskmill.brokers.postgres import PostgresBroker
from taskmill.brokers.redis import RedisBroker
from taskmill.brokers.sqlite import SQLiteBroker
from taskmill.events import subscribe
from taskmill.scheduler import Scheduler
from taskmill.workflows import sweep


def _delegate(name: str) -> Callable[..., Any]:
    def call(self: JobsOnly, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, name)(*args, **kwargs)

    call.__name__ = name
    return call


class JobsOnly(Broker):
    """A broker with the job store and nothing else (what a new broker starts as): every
    method of the contract, done by a memory broker behind it."""

    capabilities = MemoryBroker.capabilities

    def __init__(self) -> None:
        self.url = "jobsonly://"
        self.inner = MemoryBroker()


for _name in Broker.__abstractmethods__:
    setattr(JobsOnly, _name, _delegate(_name))
abc.update_abstractmethods(JobsOnly)


@pytest.fixture
def app() -> Iterator[App]:
    app = App("memory://")
    app.client.use_broker(JobsOnly())
    yield app
    app.close()


def test_every_broker_of_taskmill_implements_every_feature() -> None:
    for broker in (MemoryBroker, SQLiteBroker, RedisBroker, PostgresBroker):
        for feature in FEATURES:
            assert issubclass(broker, feature), f"{broker.__name__} lacks {feature.__name__}"
    assert not any(provides(JobsOnly(), feature) for feature in FEATURES)
    assert isinstance(JobsOnly.capabilities, Capabilities)


def test_a_broker_of_jobs_only_runs_jobs(app: App) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    handle = add.send(1, 2)
    app.run_until_idle()
    assert handle.result(timeout=5) == 3
    assert app.run_sync(sweep(app)) == 0, "no workflow store: nothing to sweep"


def _stored(app: App) -> list[str]:
    return [j.id for j in app.run_sync(app.broker.find_jobs(JobQuery())).jobs]


def _says_what_is_missing(error: pytest.ExceptionInfo[ConfigurationError], what: str) -> None:
    text = str(error.value)
    assert text.startswith(f"{what} need a broker that implements "), text
    assert "<JobsOnly jobsonly://>" in text, text


def test_a_workflow_on_a_broker_without_a_workflow_store_is_refused(app: App) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(ConfigurationError) as error:
        chain(add.s(1, 2), add.s(3)).send(app)
    _says_what_is_missing(error, "workflows")
    assert "WorkflowStore" in str(error.value)
    assert _stored(app) == [], "nothing was stored"


def test_periodic_schedules_without_a_schedule_store_are_refused(app: App) -> None:
    @app.periodic(every=60)
    def tick() -> None: ...

    with pytest.raises(ConfigurationError) as error:
        app.run_sync(Scheduler(app).run_pass())
    _says_what_is_missing(error, "periodic schedules")


def test_a_depth_limit_without_a_limit_store_is_refused_and_stores_nothing(app: App) -> None:
    app.configure_queue("small", max_depth=10)

    @app.task(queue="small")
    def work() -> None: ...

    with pytest.raises(ConfigurationError) as error:
        work.send()
    _says_what_is_missing(error, "rate limits, concurrency limits and queue depth limits")
    assert _stored(app) == [], "nothing was stored"


def test_watching_events_without_an_event_bus_is_refused(app: App) -> None:
    async def first_event() -> None:
        async for _ in subscribe(app):
            return

    with pytest.raises(ConfigurationError) as error:
        app.run_sync(first_event())
    _says_what_is_missing(error, "live events")


def test_a_broker_with_a_feature_is_its_own_store() -> None:
    broker = MemoryBroker()
    for get in (schedule_store, workflow_store, limit_store, event_bus):
        assert get(broker) is broker
