"""Feature stores: what a broker may hold beside the job store of ``brokers/base.py``.

Periodic schedules, workflows, flow control and live events each need a little storage of
their own. Each is a small protocol that a broker object may implement; the code of a feature
names the protocol it needs and gets the broker as one (``schedule_store``, ``workflow_store``,
``limit_store``, ``event_bus``). Every broker shipped with taskmill implements all four (and
declares so by subclassing them, so mypy checks their signatures); a new broker can be built
and tested store by store, and an app that uses a feature its broker lacks gets a
``ConfigurationError`` at the first use, naming both.

>>> from taskmill.brokers import broker_from_url
>>> broker = broker_from_url("memory://")
>>> schedule_store(broker) is broker
True
>>> provides(broker, EventBus)
True
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from taskmill.errors import ConfigurationError


@runtime_checkable
class ScheduleStore(Protocol):
    """Where periodic schedules mark the ticks they enqueued (``taskmill.scheduler``)."""

    @abc.abstractmethod
    async def schedule_marks(self) -> dict[str, float]:
        """The latest tick enqueued of each schedule (Unix seconds), by schedule name."""
        ...

    @abc.abstractmethod
    async def mark_schedules(self, marks: Mapping[str, float]) -> None:
        """Record ticks enqueued: each schedule's mark becomes the later of its stored mark and
        the one given, never an earlier one, so schedulers racing each other cannot move it
        back. (A tick's job is made unique by its id; the mark only says where to go on.)"""
        ...


@dataclass(frozen=True, slots=True)
class WorkflowRecord:
    """A workflow as the broker keeps it: its compiled graph (``spec``, JSON that
    ``taskmill.workflows`` reads) and whether it is still ``running`` or ended as
    ``succeeded``, ``failed`` or ``cancelled``."""

    id: str
    spec: bytes
    state: str
    created_at: float
    finished_at: float | None = None


@runtime_checkable
class WorkflowStore(Protocol):
    """Where workflows (``chain``, ``group``, ``chord``) keep their graph and state. Their
    steps are ordinary jobs of the job store, read with ``Broker.get_many``."""

    @abc.abstractmethod
    async def save_workflow(self, workflow_id: str, spec: bytes) -> None:
        """Store a new workflow, ``running``. An id stored already keeps what it has."""
        ...

    @abc.abstractmethod
    async def get_workflow(self, workflow_id: str) -> WorkflowRecord | None: ...

    @abc.abstractmethod
    async def end_workflow(self, workflow_id: str, state: str) -> bool:
        """``running`` becomes ``state`` (succeeded, failed, cancelled) with a finish time;
        False if the workflow was not running (ended already, or unknown). Ended workflows
        are pruned with finished jobs (``Broker.prune``)."""
        ...

    @abc.abstractmethod
    async def reopen_workflow(self, workflow_id: str) -> bool:
        """``failed`` becomes ``running`` again, with no finish time (a failed step was
        retried: ``taskmill.workflows.resume``); False if the workflow was not failed
        (running, succeeded, cancelled, or unknown: pruned)."""
        ...

    @abc.abstractmethod
    async def running_workflows(self, limit: int = 1000) -> list[str]:
        """Ids of running workflows, oldest first."""
        ...


@runtime_checkable
class LimitStore(Protocol):
    """Flow control across every worker: rate limits, concurrency limits and the queue
    depth that ``max_depth`` checks (``taskmill.flow``)."""

    @abc.abstractmethod
    async def reserve_rate_slot(self, bucket: str, interval_s: float) -> float:
        """Reserve the next start of ``bucket``, which allows one start per ``interval_s``
        across every worker (GCRA without burst, on the broker's clock): how many seconds
        from now the reserved start is (0: now). Each call reserves a slot of its own."""
        ...

    @abc.abstractmethod
    async def acquire_slot(self, bucket: str, holder: str, limit: int, ttl_s: float) -> bool:
        """Hold one of ``limit`` slots of ``bucket`` for ``holder`` (a job id) for ``ttl_s``
        (on the broker's clock): True if held. A holder holding one already refreshes it;
        expired holders (a worker that died) no longer count."""
        ...

    @abc.abstractmethod
    async def release_slot(self, bucket: str, holder: str) -> None: ...

    @abc.abstractmethod
    async def queue_depth(self, queue: str) -> int:
        """How many jobs of ``queue`` are scheduled or queued."""
        ...


class Subscription(abc.ABC):
    """A live feed of event payloads (``EventBus.events_subscription``): listening once
    ``start`` returned (or the ``async with`` block began); ``get`` waits for the next."""

    async def __aenter__(self) -> Subscription:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def get(self) -> bytes: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


@runtime_checkable
class EventBus(Protocol):
    """Live events between processes (``taskmill.events``): at most once, to whoever listens
    at the time."""

    @abc.abstractmethod
    async def publish_events(self, payload: bytes) -> None:
        """Deliver a payload (a JSON array of events, at most 7,000 bytes) to every
        subscription listening now, in any process."""
        ...

    @abc.abstractmethod
    def events_subscription(self) -> Subscription:
        """A subscription to the payloads published from now on, bound to the running loop."""
        ...


FEATURES: dict[type, str] = {
    ScheduleStore: "periodic schedules",
    WorkflowStore: "workflows",
    LimitStore: "rate limits, concurrency limits and queue depth limits",
    EventBus: "live events",
}
"""Each feature protocol and what an app loses without it (for messages)."""


_implemented: dict[tuple[type, type], bool] = {}


def _implements(broker_type: type, protocol: type) -> bool:
    # a runtime protocol's isinstance looks at every member each time: once per class is enough
    key = (broker_type, protocol)
    found = _implemented.get(key)
    if found is None:
        found = _implemented[key] = issubclass(broker_type, protocol)
    return found


def provides(broker: object, protocol: type) -> bool:
    """Whether ``broker`` implements the feature ``protocol`` (by its class)."""
    return _implements(type(broker), protocol)


def schedule_store(broker: object) -> ScheduleStore:
    """``broker`` as a ``ScheduleStore``, or the ``ConfigurationError`` of ``_require``."""
    store: ScheduleStore = _require(broker, ScheduleStore)
    return store


def workflow_store(broker: object) -> WorkflowStore:
    """``broker`` as a ``WorkflowStore``, or the ``ConfigurationError`` of ``_require``.

    >>> class JobsOnly:
    ...     def __repr__(self) -> str:
    ...         return "<JobsOnly nats://queue>"
    >>> workflow_store(JobsOnly())
    Traceback (most recent call last):
    ...
    taskmill.errors.ConfigurationError: workflows need ... <JobsOnly nats://queue> does not ...
    """
    store: WorkflowStore = _require(broker, WorkflowStore)
    return store


def limit_store(broker: object) -> LimitStore:
    """``broker`` as a ``LimitStore``, or the ``ConfigurationError`` of ``_require``."""
    store: LimitStore = _require(broker, LimitStore)
    return store


def event_bus(broker: object) -> EventBus:
    """``broker`` as an ``EventBus``, or the ``ConfigurationError`` of ``_require``."""
    bus: EventBus = _require(broker, EventBus)
    return bus


def _require(broker: object, protocol: type) -> Any:
    """``broker`` itself if it implements ``protocol``; else a ``ConfigurationError`` that
    names the feature and the broker, at the feature's first use."""
    if not _implements(type(broker), protocol):
        raise ConfigurationError(
            f"{FEATURES[protocol]} need a broker that implements {protocol.__name__}, and "
            f"{broker!r} does not (it stores jobs only): use another broker for this app, "
            "or do without the feature"
        )
    return broker


__all__ = [
    "FEATURES",
    "EventBus",
    "LimitStore",
    "ScheduleStore",
    "Subscription",
    "WorkflowRecord",
    "WorkflowStore",
    "event_bus",
    "limit_store",
    "provides",
    "schedule_store",
    "workflow_store",
]
