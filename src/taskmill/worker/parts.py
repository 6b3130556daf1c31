"""What a worker builds once its broker is open, and takes down on the way out.

``Worker.run`` opens the broker (``opening.py``), then builds its ``Parts``, each given its
collaborators explicitly: the runner of its pool kind (``runners.py``), the job pipeline
(``execution.py``), the outbox and its flush loop (``outbox.py``, ``flushing.py``), the
events publisher (events on), the lease keeper (``leases.py``, whose heartbeats carry the
worker's ``WorkerInfo``) and the claim loop's wait for work (``idle.py``). After the drain,
``Parts.close`` makes the last writes (each under the worker's one deadline,
``stopping.LastWrites``), unregisters the worker, shuts its threads and detaches from the
broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from taskmill.brokers.base import HandOver
from taskmill.job import WorkerInfo
from taskmill.worker.execution import Pipeline
from taskmill.worker.flushing import Flusher
from taskmill.worker.idle import IdleWait
from taskmill.worker.leases import LeaseKeeper
from taskmill.worker.outbox import Outbox, Publisher
from taskmill.worker.reserve import WAIT_S, BodySlots
from taskmill.worker.runners import PoolKind, make_runner

if TYPE_CHECKING:
    from taskmill.brokers.base import Broker
    from taskmill.client import Client
    from taskmill.job import Job, Outcome
    from taskmill.registry import Registry
    from taskmill.settings import Settings
    from taskmill.worker.execution import JobRun
    from taskmill.worker.metrics import WorkerMetrics
    from taskmill.worker.stopping import LastWrites, Stop

__all__ = ["Parts", "Spec"]


class Spec(Protocol):
    """What the parts are built from, and what the heartbeat reports: a ``Worker``'s
    attributes (``Worker`` is one)."""

    @property
    def id(self) -> str: ...
    @property
    def registry(self) -> Registry: ...
    @property
    def client(self) -> Client: ...
    @property
    def settings(self) -> Settings: ...
    @property
    def queues(self) -> list[str]: ...
    @property
    def concurrency(self) -> int: ...
    @property
    def pool(self) -> PoolKind: ...
    @property
    def app_path(self) -> str | None: ...
    @property
    def max_tasks_per_child(self) -> int | None: ...
    @property
    def idle_poll_s(self) -> float: ...
    @property
    def register(self) -> bool: ...
    @property
    def on_heartbeat(self) -> Callable[[], None] | None: ...
    @property
    def metrics(self) -> WorkerMetrics | None: ...
    @property
    def lease_s(self) -> float: ...
    @property
    def heartbeat_s(self) -> float: ...
    @property
    def started_at(self) -> float: ...
    @property
    def processed(self) -> int: ...
    @property
    def failed(self) -> int: ...


class Parts:
    """The parts of one run of ``worker`` on ``broker``. ``running`` is the worker's table of
    running jobs; ``finished`` takes each run's outcome (the pipeline's last step), ``start``
    starts a job handed over while waiting for work; the outbox sets ``wake`` when it has
    something to write, the flusher sets ``progressed`` after each write, and ``stop`` is the
    worker's stop request. Built on the worker's event loop."""

    def __init__(
        self,
        worker: Spec,
        broker: Broker,
        *,
        running: dict[str, JobRun],
        finished: Callable[[JobRun, Outcome], None],
        start: Callable[[Job], None],
        wake: asyncio.Event,
        progressed: asyncio.Event,
        stop: Stop,
    ) -> None:
        self.worker = worker
        self.broker = broker
        self.running = running
        loop = asyncio.get_running_loop()

        def later(delay: float, fn: Callable[[], None]) -> None:  # from a task's thread
            loop.call_soon_threadsafe(loop.call_later, delay, fn)

        self.runner = make_runner(
            worker.pool,
            worker.concurrency,
            app_path=worker.app_path,
            max_tasks_per_child=worker.max_tasks_per_child,
            instrumentations=worker.registry.instrumentations,
        )
        counts = None if worker.metrics is None else worker.metrics.counts
        self.pipeline = Pipeline(
            worker.registry,
            self.runner,
            broker,
            worker_id=worker.id,
            lease_s=worker.lease_s,
            finished=finished,
            metrics=counts,
            hook_threads=min(worker.concurrency, 32),
            max_payload_bytes=worker.settings.max_payload_bytes,
            slots=BodySlots(worker.concurrency, WAIT_S),
        )
        self.publisher = Publisher(broker, worker_id=worker.id) if worker.settings.events else None
        self.outbox = Outbox(
            broker,
            worker_id=worker.id,
            wake=wake.set,
            later=later,
            emit=None if self.publisher is None else self.publisher.emit,
            rejected=None if counts is None else counts.rejected,
        )
        self.flusher = Flusher(
            self.outbox, worker.client, wake=wake, progressed=progressed, stop=stop
        )
        self.leases = LeaseKeeper(
            broker,
            self.pipeline,
            worker_id=worker.id,
            lease_s=worker.lease_s,
            interval_s=worker.heartbeat_s,
            runs=running,
            owed=self.outbox.claims,
            info=self.info,
            register=worker.register,
            on_heartbeat=worker.on_heartbeat,
        )
        self.idle = IdleWait(
            broker,
            queues=worker.queues,
            poll_s=worker.idle_poll_s,
            handover=HandOver(worker.id, worker.lease_s),
            stop=stop,
            flusher=self.flusher,
            start=start,
        )

    def info(self) -> WorkerInfo:
        """What a heartbeat tells the broker about the worker."""
        worker = self.worker
        return WorkerInfo(
            id=worker.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=worker.queues,
            concurrency=worker.concurrency,
            started_at=worker.started_at,
            heartbeat_at=time.time(),
            running=list(self.running),
            processed=worker.processed,
            failed=worker.failed,
        )

    async def close(self, last: LastWrites) -> None:
        """After the drain and the end of the loops: write what is still owed, unregister,
        shut the runner and the hook threads, detach from the broker."""
        if self.outbox.pending:  # a flush that failed on the way out: one last try
            with contextlib.suppress(Exception):
                await last.bounded(self.flusher.flush_all(), "writing the last outcomes")
        if self.publisher is not None:  # after the last outcomes: their events too
            # what the cancelled publisher had not sent
            await last.bounded(self.publisher.publish(), "publishing the last events")
        # always: it also hands back jobs handed over to this worker that it never took
        with contextlib.suppress(Exception):
            await last.bounded(self.broker.unregister_worker(self.worker.id), "unregistering")
        self.runner.close()
        self.pipeline.hook_threads.shutdown(wait=False)
        with contextlib.suppress(Exception):
            await last.bounded(self.broker.detach(), "detaching from the broker")
