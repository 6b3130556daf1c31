"""The broker contract: the job store, the one seam every broker fills.

A broker stores and hands out jobs; it never decides what a failure means (that is
``taskmill.retry.decide``). Every operation is one atomic step on the engine. Implementations
live one per module or package beside this file and must pass ``tests/conformance``
unchanged. What a broker may store beside jobs (periodic schedules, workflows, flow control,
live events) is in small feature protocols of its own (``taskmill.brokers.features``).
"""

from __future__ import annotations

import abc
import base64
import binascii
import functools
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal

import msgspec

from taskmill.brokers._instrument import contract_methods, instrument, is_instrumented
from taskmill.brokers.features import FEATURES
from taskmill.job import (
    FINISHED_STATES,
    Claim,
    Finish,
    Job,
    JobState,
    MetaValue,
    NewJob,
    Progress,
    QueueStats,
    WorkerInfo,
)
from taskmill.meta import check_meta, meta_matches
from taskmill.settings import Settings
from taskmill.urls import redact_url

OnConflict = Literal["return", "raise"]
ListOrder = Literal["enqueued", "finished"]
"""``enqueued``: the order jobs were stored, newest first; ``finished``: finished jobs by finish
time, latest first."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What differs between brokers; the docs' capability table is generated from these."""

    shared_across_processes: bool
    """Producers and workers in different processes see the same jobs."""
    server_clock: bool
    """Time comes from the broker (so skewed worker clocks agree), not from each process."""
    transactional_enqueue: bool
    """``send(..., connection=conn)`` enqueues inside the caller's own transaction."""
    push_wakeups: bool
    """Idle workers are woken by the broker rather than by polling."""


@dataclass(slots=True)
class EnqueueResult:
    """Ids in the order of the request; ``existing`` lists positions that matched a pending key."""

    ids: list[str]
    existing: set[int] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class HandOver:
    """Who waits, for ``Broker.wait``: a job handed over is claimed for ``worker_id`` with a
    lease of ``lease_s``."""

    worker_id: str
    lease_s: float


@dataclass(frozen=True, slots=True)
class HeartbeatReply:
    lost: set[str] = field(default_factory=set)
    """Jobs this worker no longer holds (the lease token is stale): stop reporting on them."""
    cancel_requested: set[str] = field(default_factory=set)
    """Jobs someone asked to cancel while they run."""


@dataclass(frozen=True, slots=True)
class JobQuery:
    """Which jobs ``Broker.find_jobs`` lists, and in what order.

    Every filter given must match: ``states`` (empty: any state), ``queue`` (exact), ``task``
    (a prefix of the task's name: ``"billing."`` lists every task of that module), ``meta``
    (the job's metadata holds each pair; see ``taskmill.meta.meta_matches``). With
    ``order="finished"`` only finished jobs are listed (``states`` defaults to the three
    finished states, and a pending one is an error).

    >>> JobQuery(states=frozenset({"failed"}), order="finished").states
    frozenset({<JobState.FAILED: 'failed'>})
    """

    states: frozenset[JobState] = frozenset()
    queue: str | None = None
    task: str | None = None
    meta: Mapping[str, MetaValue] = field(default_factory=lambda: MappingProxyType({}))
    order: ListOrder = "enqueued"

    def __post_init__(self) -> None:
        states = frozenset(JobState.parse(s) for s in self.states)
        if self.order not in ("enqueued", "finished"):
            raise ValueError(f"order must be 'enqueued' or 'finished', not {self.order!r}")
        if self.order == "finished":
            pending = sorted(s.value for s in states - FINISHED_STATES)
            if pending:
                raise ValueError(
                    f"order='finished' lists finished jobs only; {', '.join(pending)} jobs "
                    "have no finish time"
                )
            states = states or FINISHED_STATES
        object.__setattr__(self, "states", states)
        meta = check_meta(self.meta, what="meta filter")
        object.__setattr__(self, "meta", MappingProxyType(meta))

    def matches(self, job: Job) -> bool:
        """Whether a job passes every filter (for brokers that filter in Python)."""
        return (
            (not self.states or job.state in self.states)
            and (self.queue is None or job.queue == self.queue)
            and (self.task is None or job.task.startswith(self.task))
            and (not self.meta or meta_matches(job.meta, self.meta))
        )


@dataclass(frozen=True, slots=True)
class JobPage:
    """One page of ``Broker.find_jobs``: the jobs, the cursor of the next page (None on the
    last one) and, if it was asked for, how many jobs match the query in all
    (``total_estimated``: that number is an estimate, as a broker may give on a large store
    rather than count every match; see docs/admin.md)."""

    jobs: list[Job]
    next_cursor: str | None = None
    total: int | None = None
    total_estimated: bool = False


def encode_cursor(order: ListOrder, *position: str | int | float) -> str:
    """An opaque cursor (URL-safe text) holding the last row's position in ``order``."""
    raw = msgspec.json.encode([order, *position])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, order: ListOrder, types: Sequence[type]) -> list[Any]:
    """The position ``encode_cursor`` stored; ``ValueError`` for a cursor that this broker
    did not make for this order (edited, or from a listing in the other order)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = msgspec.json.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        value = None
    if (
        not isinstance(value, list)
        or len(value) != len(types) + 1
        or value[0] != order
        or not all(
            isinstance(v, t) and not isinstance(v, bool)
            for v, t in zip(value[1:], types, strict=True)
        )
    ):
        raise ValueError(f"invalid cursor {cursor!r} for a listing in {order!r} order")
    return value[1:]


class Broker(abc.ABC):
    """The job store. All methods are coroutines except the ``*_blocking`` fast paths.

    A broker that also stores what a feature needs implements its protocol from
    ``taskmill.brokers.features`` (``ScheduleStore``, ``WorkflowStore``, ``LimitStore``,
    ``EventBus``); the brokers of taskmill implement all four.

    Every method of the contract (and of the feature protocols) that a subclass defines is
    wrapped once, when the class is made, to time and log its calls with the fields of the
    job they are about (``taskmill.brokers._instrument``): no broker logs its own calls."""

    url: str
    capabilities: Capabilities
    name: ClassVar[str] = ""
    """A short name for logs (``sqlite``, ``redis``); the class's name if empty."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for method_name in _contract():
            method = cls.__dict__.get(method_name)
            if inspect.isfunction(method) and not is_instrumented(method):
                setattr(cls, method_name, instrument(method_name, method))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact_url(self.url)}>"

    # --- life cycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and create or upgrade storage. Called once before first use."""

    async def close(self) -> None:
        """Release connections. The broker may not be used after."""

    def configure(self, settings: Settings) -> None:
        """Take the app's settings that the broker applies itself (e.g. a result TTL)."""

    async def attach(self) -> None:
        """The running loop is a worker's and will call ``detach`` before it ends: a broker
        may bind connections to it rather than hop to a loop of its own."""

    async def detach(self) -> None:
        """Release what is bound to the running event loop (that loop is about to end); the
        broker stays usable from other loops. Workers call it when they stop."""

    # --- the store's epoch ----------------------------------------------------------------------

    async def epoch(self, *, mark: bool = False) -> str | None:
        """The store's epoch marker: a random id written when the store is first opened, so
        that a store that lost its data (a Redis restarted without persistence, a NATS store
        wiped or its streams deleted) can be told from one that is merely empty: its marker
        is gone. ``mark``: write a new marker if none is stored, then return the stored one.
        ``None``: no marker stored, or (this default) a broker that keeps none, because its
        storage cannot vanish unnoticed (a database whose tables are gone fails loudly).
        Workers compare it every second (``taskmill.worker``)."""
        return None

    # --- producers ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def enqueue(
        self, jobs: Sequence[NewJob], *, on_conflict: OnConflict = "return"
    ) -> EnqueueResult:
        """Store a batch atomically.

        A job whose id is stored already (in any state, until it is pruned) is the same job
        and is not stored again: its position is in ``existing``, whatever ``on_conflict``
        says. That makes a send retried after a lost reply, or a periodic tick enqueued by
        two schedulers, happen once.

        A job whose ``key`` matches a job still scheduled, queued or running is not stored:
        its position in the result holds the existing id (``on_conflict="return"``), or the
        whole batch is rejected with ``DuplicateJobError`` (``"raise"``). Jobs with ``run_at``
        in the future are ``scheduled``; the others ``queued``.
        """

    @abc.abstractmethod
    def enqueue_blocking(
        self,
        jobs: Sequence[NewJob],
        *,
        on_conflict: OnConflict = "return",
        connection: Any = None,
    ) -> EnqueueResult:
        """``enqueue`` from synchronous code, on the calling thread: ``send()`` writes with no
        hop to another thread.

        ``connection`` is the caller's own database connection for transactional enqueue;
        brokers without ``capabilities.transactional_enqueue`` raise if it is given.
        """

    # --- workers ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def claim(
        self, queues: Sequence[str], limit: int, worker_id: str, lease_s: float
    ) -> list[Job]:
        """Take up to ``limit`` due jobs: highest priority first, then oldest ``run_at``, then
        enqueue order; skip paused queues. Each becomes ``running`` with attempt + 1, a fresh
        lease token and ``lease_expires_at = now + lease_s``."""

    async def finish_and_claim(
        self,
        finishes: Sequence[Finish],
        queues: Sequence[str],
        limit: int,
        worker_id: str,
        lease_s: float,
    ) -> tuple[list[bool], list[Job]]:
        """``finish`` then ``claim``; brokers override it to do both in one round trip, which
        is what lets a busy worker spend one transaction per batch rather than two."""
        applied = await self.finish(finishes) if finishes else []
        return applied, await self.claim(queues, limit, worker_id, lease_s)

    @abc.abstractmethod
    async def heartbeat(
        self, worker: WorkerInfo, claims: Sequence[Claim], lease_s: float
    ) -> HeartbeatReply:
        """Extend the leases this worker holds and record the worker as alive, in one step."""

    @abc.abstractmethod
    async def finish(self, finishes: Sequence[Finish]) -> list[bool]:
        """Apply outcomes; for each, False if its token was stale (nothing written)."""

    @abc.abstractmethod
    async def record_progress(self, items: Sequence[Progress]) -> None:
        """Store the latest progress of running jobs (stale tokens are ignored)."""

    @abc.abstractmethod
    async def recover(self, max_lost_leases: int) -> list[tuple[str, JobState]]:
        """Jobs whose lease expired: back to ``queued`` (an attempt was spent), or ``failed``
        once they have lost ``max_lost_leases`` leases, or ``cancelled`` if a cancel was asked.
        Returns (id, new state) for each."""

    @abc.abstractmethod
    async def wait(
        self, queues: Sequence[str], timeout: float, handover: HandOver | None = None
    ) -> list[Job]:
        """Return when work may be due in ``queues`` (a notification, or the next scheduled job
        coming due), or after ``timeout`` seconds. Spurious returns are allowed.

        With ``handover``, a broker may claim a job for that worker while it waits (a producer
        hands a new job straight to an idle worker: no claim round trip after the wake-up) and
        return it, claimed exactly as ``claim`` would have. Brokers without hand-overs, and
        every wait that ends otherwise, return ``[]``. A hand-over registered by a wait lasts
        until that worker's next ``claim``, which returns any job handed over in between."""

    @abc.abstractmethod
    async def unregister_worker(self, worker_id: str) -> None: ...

    @abc.abstractmethod
    async def prune(self, finished_before: float, limit: int = 1000) -> int:
        """Delete up to ``limit`` finished jobs whose ``finished_at`` is older than given."""

    async def health_warnings(self) -> dict[str, str]:
        """What about the broker's store needs an operator now, by a stable key (a message
        each; empty if nothing). Workers call it with their maintenance (every
        ``HEALTH_CHECK_S``, never per job), log each key at WARNING once while it lasts and
        show the messages in their liveness endpoint's reply. PostgreSQL: a transaction
        holding a snapshot so long that vacuum cannot clean the jobs table."""
        return {}

    # --- inspection and management --------------------------------------------------------------

    @abc.abstractmethod
    async def now(self) -> float:
        """The broker's clock, in seconds since the epoch."""

    @abc.abstractmethod
    async def get(self, job_id: str) -> Job | None: ...

    @abc.abstractmethod
    async def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        """The jobs of ``job_ids`` in one round trip (one read, however many ids), in the
        order asked: one entry per id given, None where no such job is stored (never
        enqueued, or pruned). An id given twice is at both positions."""

    @abc.abstractmethod
    async def get_by_key(self, key: str) -> Job | None:
        """The job holding ``key`` now, or None. Only a pending job (scheduled, queued or
        running) holds its key: once it finishes, the key is free for the next send, and a
        finished job is not found by it."""

    @abc.abstractmethod
    async def find_jobs(
        self, query: JobQuery, *, limit: int = 100, cursor: str | None = None, count: bool = False
    ) -> JobPage:
        """Up to ``limit`` jobs matching ``query`` in its order, after ``cursor`` (a page's
        ``next_cursor``; None: from the start). Keyset pagination: a page costs the same
        however deep it is, and jobs stored meanwhile never shift a page. ``count``: also
        count every job matching the query (``JobPage.total``), which may cost a scan."""

    async def list_jobs(
        self,
        *,
        state: JobState | str | None = None,
        queue: str | None = None,
        task: str | None = None,
        limit: int = 100,
    ) -> list[Job]:
        """Newest first (one page of ``find_jobs``). ``state`` is a ``JobState`` or its name
        (``"failed"``); ``task`` a prefix of the task's name."""
        states = frozenset() if state is None else frozenset({JobState.parse(state)})
        query = JobQuery(states=states, queue=queue, task=task)
        return (await self.find_jobs(query, limit=limit)).jobs

    async def finished_per_minute(
        self, since: float, queue: str | None = None
    ) -> list[tuple[int, JobState, int]]:
        """How many jobs (of ``queue``, or of every queue) finished at or after ``since``, by
        the minute of their finish time (``int(finished_at // 60)``) and their state:
        ``(minute, state, count)`` triples, in no order, none with a count of 0.

        This default walks the finished jobs newest first (``find_jobs``); brokers answer it
        from an index or counters of their own."""
        query = JobQuery(queue=queue, order="finished")
        counted: dict[tuple[int, JobState], int] = {}
        cursor = None
        while True:
            page = await self.find_jobs(query, limit=1000, cursor=cursor)
            for job in page.jobs:
                at = job.finished_at or 0.0
                if at < since:
                    return _triples(counted)
                key = (int(at // 60), job.state)
                counted[key] = counted.get(key, 0) + 1
            cursor = page.next_cursor
            if cursor is None:
                return _triples(counted)

    @abc.abstractmethod
    async def delete(self, job_ids: Sequence[str]) -> list[str]:
        """Delete the finished (succeeded, failed or cancelled) jobs of ``job_ids``; the ids
        deleted, in the order given. A job in another state, or not stored, is left out."""

    @abc.abstractmethod
    async def stats(self) -> list[QueueStats]: ...

    @abc.abstractmethod
    async def list_workers(self) -> list[WorkerInfo]: ...

    @abc.abstractmethod
    async def retry(self, job_ids: Sequence[str] | None) -> list[str]:
        """Put failed or cancelled jobs back to ``queued`` with a fresh attempt budget;
        ``None`` means every failed job. Returns the ids that were requeued."""

    @abc.abstractmethod
    async def cancel(self, job_id: str) -> JobState | None:
        """Scheduled or queued: ``cancelled`` at once. Running: a cancel is requested and the
        worker ends it. Returns the state after the call, or None if no such job."""

    @abc.abstractmethod
    async def run_now(self, job_id: str) -> JobState | None:
        """A ``scheduled`` job (a delayed send, or one waiting for its retry) becomes
        ``queued``, due now (``run_at`` = now), its attempt count unchanged, and idle workers
        are woken as by an enqueue. Other jobs are left as they are. Returns the state
        before the call, or None if there is no such job."""

    @abc.abstractmethod
    async def purge(self, queue: str) -> int:
        """Delete the queue's scheduled and queued jobs. Returns how many."""

    @abc.abstractmethod
    async def pause(self, queue: str, paused: bool) -> None: ...


def _triples(counted: Mapping[tuple[int, JobState], int]) -> list[tuple[int, JobState, int]]:
    return [(minute, state, n) for (minute, state), n in counted.items()]


@functools.cache
def _contract() -> frozenset[str]:
    """The methods ``Broker.__init_subclass__`` instruments."""
    return contract_methods([Broker, *FEATURES])
