"""The client: the broker an app's URL names (made, opened and closed here), the sync bridge to
it, the one enqueue pipeline every job goes through, and job lookups.

Every job enters the broker through ``Client.enqueue`` (or ``enqueue_blocking``, its
synchronous twin for ``send()``): a task's ``send``, ``send_many`` and ``app.send_task``, a
periodic schedule's tick, a workflow's step. In order, the pipeline

1. checks the ``max_depth`` of the queues the jobs go to (``taskmill.limits``);
2. stores the jobs in one broker call, inside the app's instrumentations' ``sending`` (which
   may add metadata: a trace context; ``taskmill.hooks.Instrumentation``);
3. publishes a ``queued`` (or ``scheduled``) event for each job stored, if events are on;
4. calls the ``on_enqueue`` hooks of each job stored: its task's, then the app's.

A job the broker already had (a retried send, a tick another scheduler stored, a pending key)
is neither published nor passed to the hooks. Paths differ only in the depth check, by the
``depth`` argument:

- ``"queue"`` (sends): as the queue's ``when_full`` says, raise or wait for room;
- ``"no_wait"`` (periodic ticks): raise at once when full; the scheduler keeps the tick due
  and tries again at its next pass, and ticks of other queues go on (a scheduler must not
  stall every schedule on one full queue);
- ``"skip"`` (workflow steps): no check. A workflow's first steps are checked when it is
  sent (``check_room``), before anything is stored; the steps it releases later belong to
  work already accepted (refusing them would leave it half done, and the worker that
  releases them must not wait for room in a queue it drains).

``App`` composes a ``Registry`` (what is declared) and a ``Client`` (what talks to the
broker); the layers under ``App`` (tasks, handles, the scheduler, workflows, the worker) are
given a ``Client`` or the pair, never the ``App``.

    >>> from taskmill.registry import Registry
    >>> from taskmill.settings import Settings
    >>> client = Client("memory://", Settings(), Registry())
    >>> client.run_sync(client.abroker()).capabilities.shared_across_processes
    False
    >>> client.close()
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from taskmill.brokers import Broker, EnqueueResult, broker_from_url
from taskmill.errors import JobNotFoundError
from taskmill.events import FinishWatch, enqueued, publish
from taskmill.hooks import Hook, arun_hooks, instrumented_send, run_hooks_blocking
from taskmill.job import Job, JobState, NewJob
from taskmill.limits import check_depth, limited_queues
from taskmill.portal import Portal
from taskmill.registry import Registry, TaskDefinition
from taskmill.settings import Settings
from taskmill.urls import exposure, redact_url

T = TypeVar("T")

DepthCheck = Literal["queue", "no_wait", "skip"]
"""How the enqueue pipeline checks ``max_depth`` (see the module's docstring)."""

EnqueueObserver = Callable[[Sequence[NewJob], EnqueueResult], None]
"""Told of each enqueue the broker took, on the caller's thread (worker metrics count them)."""

_POLL_START_S = 0.002
_POLL_MAX_S = 0.1
_RECHECK_S = 1.0
"""With events on, how often a wait for a job to finish reads it anyway (an event is lost)."""


class JobRunner(Protocol):
    """Runs due jobs in this process until none is left: the app, for ``memory://?eager=1``
    (the client cannot start a worker: the worker is built on top of it)."""

    def run_until_idle(self) -> int: ...

    async def arun_until_idle(self) -> int: ...


@runtime_checkable
class AppParts(Protocol):
    """What the layers under ``App`` take from it: its registry and its client. ``App`` is
    one; ``Worker(app)`` and ``Scheduler(app)`` accept any."""

    @property
    def registry(self) -> Registry: ...

    @property
    def client(self) -> Client: ...


class Client:
    """The broker of ``url`` for ``registry``'s jobs, with ``settings``. The broker is made on
    first use and connected by ``abroker()``/``open()``; ``close()`` ends it and the portal
    thread. ``eager`` runs the jobs of each send at once (``memory://?eager=1``)."""

    def __init__(
        self,
        url: str,
        settings: Settings,
        registry: Registry,
        *,
        eager: JobRunner | None = None,
    ) -> None:
        self.url = url
        self.settings = settings
        self.registry = registry
        self.eager = eager
        self._broker: Broker | None = None
        self._opened = False
        self._open_lock = threading.Lock()
        self._portal: Portal | None = None
        self._portal_lock = threading.Lock()
        self._finish_watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, FinishWatch] = (
            weakref.WeakKeyDictionary()
        )
        self.enqueue_observers: list[EnqueueObserver] = []
        """Called after each broker write of the enqueue pipeline, with the jobs and the
        result; they must be quick and must not raise."""

    def __repr__(self) -> str:
        return f"<Client {redact_url(self.url)}>"

    # --- the broker's lifecycle -------------------------------------------------------------

    @property
    def broker(self) -> Broker:
        """The broker object (made on first access, not yet connected)."""
        if self._broker is None:
            with self._open_lock:  # two threads' first use must not make two brokers
                if self._broker is None:
                    broker = broker_from_url(self.url)
                    broker.configure(self.settings)
                    self._broker = broker
        return self._broker

    def use_broker(self, broker: Broker | None, url: str | None = None) -> None:
        """Use ``broker`` (not yet opened) instead of one made from the URL, or with
        ``None`` make one again on next use; ``url`` replaces the URL shown. For tests (the
        ``taskmill_memory`` fixture) and apps that share one in-process broker."""
        self._broker = broker
        self._opened = False
        self._finish_watches.clear()
        if url is not None:
            self.url = url

    async def abroker(self) -> Broker:
        """The broker, connected. ``Broker.open`` is idempotent, so loops on two threads
        opening at once is harmless."""
        broker = self.broker
        if not self._opened:
            await broker.open()
            if not self._opened:
                _warn_if_exposed(self.url)
            self._opened = True
        return broker

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the client's private loop thread and wait for it."""
        if self._portal is None:
            with self._portal_lock:
                if self._portal is None:
                    self._portal = Portal()
        return self._portal.run(coro)

    def open(self) -> Client:
        if not self._opened:
            self.run_sync(self.abroker())
        return self

    async def aopen(self) -> Client:
        await self.abroker()
        return self

    def close(self) -> None:
        # a broker opened by a send that then failed counts as open too: close it whenever made
        if self._broker is not None:
            self.run_sync(self._broker.close())
            self._opened = False
        self._close_portal()

    async def aclose(self) -> None:
        if self._broker is not None:
            await self._broker.close()
            self._opened = False
        self._close_portal()

    def _close_portal(self) -> None:
        if self._portal is not None:
            self._portal.close()
            self._portal = None

    # --- the enqueue pipeline ---------------------------------------------------------------

    def enqueue_blocking(
        self,
        jobs: Sequence[NewJob],
        tasks: TaskDefinition | Sequence[TaskDefinition],
        *,
        on_conflict: Literal["return", "raise"] = "return",
        connection: Any = None,
        depth: DepthCheck = "queue",
    ) -> EnqueueResult:
        """The pipeline (see the module's docstring) on the calling thread: the broker's
        blocking write, so a ``send()`` needs no hop to another thread, and ``connection``
        (the caller's open transaction, where the broker supports it). ``tasks``: the task
        of every job, or one per job."""
        if depth != "skip" and limited_queues(self.registry.queue_options, jobs):
            self.run_sync(self.check_room(jobs, wait=depth == "queue"))
        if self.registry.instrumentations:
            with instrumented_send(self.registry.instrumentations, jobs) as jobs:
                result = self.broker.enqueue_blocking(
                    jobs, on_conflict=on_conflict, connection=connection
                )
        else:
            result = self.broker.enqueue_blocking(
                jobs, on_conflict=on_conflict, connection=connection
            )
        self._opened = True
        for observe in self.enqueue_observers:
            observe(jobs, result)
        if self.settings.events:
            self.run_sync(self._publish_enqueued(jobs, result))
        for job, lists in self._enqueue_hooks(jobs, tasks, result):
            run_hooks_blocking(lists, "on_enqueue", job.id, job.task, job, run_async=self.run_sync)
        return result

    async def enqueue(
        self,
        jobs: Sequence[NewJob],
        tasks: TaskDefinition | Sequence[TaskDefinition],
        *,
        on_conflict: Literal["return", "raise"] = "return",
        depth: DepthCheck = "queue",
    ) -> EnqueueResult:
        """The pipeline (see the module's docstring); ``tasks``: the task of every job, or
        one per job."""
        if depth != "skip" and limited_queues(self.registry.queue_options, jobs):
            await self.check_room(jobs, wait=depth == "queue")
        broker = await self.abroker()
        if self.registry.instrumentations:
            with instrumented_send(self.registry.instrumentations, jobs) as jobs:
                result = await broker.enqueue(jobs, on_conflict=on_conflict)
        else:
            result = await broker.enqueue(jobs, on_conflict=on_conflict)
        for observe in self.enqueue_observers:
            observe(jobs, result)
        if self.settings.events:
            await self._publish_enqueued(jobs, result)
        for job, lists in self._enqueue_hooks(jobs, tasks, result):
            await arun_hooks(lists, "on_enqueue", job.id, job.task, job)
        return result

    async def check_room(self, jobs: Sequence[NewJob], *, wait: bool = True) -> None:
        """``QueueFullError`` unless every limited queue has room for ``jobs`` (waiting for
        it where the queue says ``when_full="wait"``, and ``wait``)."""
        await check_depth(await self.abroker(), self.registry.queue_options, jobs, wait=wait)

    async def _publish_enqueued(self, jobs: Sequence[NewJob], result: EnqueueResult) -> None:
        now = time.time()
        stored = [enqueued(j, now) for i, j in enumerate(jobs) if i not in result.existing]
        if stored:
            await publish(await self.abroker(), stored)

    def _enqueue_hooks(
        self,
        jobs: Sequence[NewJob],
        tasks: TaskDefinition | Sequence[TaskDefinition],
        result: EnqueueResult,
    ) -> list[tuple[NewJob, list[list[Hook]]]]:
        """The stored jobs that have ``on_enqueue`` hooks, with them in calling order."""
        app_hooks = self.registry.hooks.on_enqueue
        existing = result.existing
        if isinstance(tasks, TaskDefinition):
            if not (tasks.hooks.on_enqueue or app_hooks):
                return []
            lists = [tasks.hooks.on_enqueue, app_hooks]
            return [(job, lists) for i, job in enumerate(jobs) if i not in existing]
        return [
            (job, [task.hooks.on_enqueue, app_hooks])
            for i, (job, task) in enumerate(zip(jobs, tasks, strict=True))
            if i not in existing and (task.hooks.on_enqueue or app_hooks)
        ]

    # --- jobs -------------------------------------------------------------------------------

    async def aget_job(self, job_id: str) -> Job:
        """The stored job; ``JobNotFoundError`` if there is none."""
        job = await (await self.abroker()).get(job_id)
        if job is None:
            raise JobNotFoundError(f"job {job_id} does not exist (or was pruned)")
        return job

    async def acancel_job(self, job_id: str) -> JobState:
        """Cancel a job (see ``JobHandle.cancel``); its state after."""
        state = await (await self.abroker()).cancel(job_id)
        if state is None:
            raise JobNotFoundError(f"job {job_id} does not exist (or was pruned)")
        return state

    async def arun_job_now(self, job_id: str) -> JobState:
        """Make a scheduled job due now (see ``JobHandle.run_now``); its state before."""
        state = await (await self.abroker()).run_now(job_id)
        if state is None:
            raise JobNotFoundError(f"job {job_id} does not exist (or was pruned)")
        return state

    async def await_finished(self, job_id: str, timeout: float | None = None) -> Job:
        """The job once it has finished; ``TimeoutError`` if it has not after ``timeout`` s.

        With events on (``App(events=True)``) the wait is woken by the job's finishing event
        (reading the job again every second, in case that event was lost); else it polls,
        2 ms doubling up to 100 ms."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.settings.events:
            job = await self._await_by_events(job_id, deadline)
        else:
            job = await self._await_by_polling(job_id, deadline)
        if not job.state.finished:
            raise TimeoutError(
                f"job {job_id} ({job.task}) is still {job.state.value} after "
                f"{timeout} s{await self.no_worker_hint(job)}"
            )
        return job

    async def _await_by_polling(self, job_id: str, deadline: float | None) -> Job:
        delay = _POLL_START_S
        while True:
            job = await self.aget_job(job_id)
            if job.state.finished:
                return job
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return job
                delay = min(delay, remaining)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX_S)

    async def _await_by_events(self, job_id: str, deadline: float | None) -> Job:
        watch = self._finish_watch(await self.abroker())
        async with watch.watching(job_id) as finished:  # listening: no finish is missed
            while True:
                finished.clear()
                job = await self.aget_job(job_id)
                if job.state.finished:
                    return job
                wait = _RECHECK_S
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return job
                try:
                    async with asyncio.timeout(wait):
                        await finished.wait()
                except TimeoutError:
                    pass

    def _finish_watch(self, broker: Broker) -> FinishWatch:
        """The shared subscription of the running loop (a subscription is bound to a loop)."""
        loop = asyncio.get_running_loop()
        watch = self._finish_watches.get(loop)
        if watch is None:
            watch = self._finish_watches[loop] = FinishWatch(broker)
        return watch

    async def no_worker_hint(self, job: Job) -> str:
        """``"; no worker is consuming queue 'x'"`` when the job waits and no registered
        worker takes its queue (the likely reason a wait timed out); else ``""``."""
        if job.state not in (JobState.QUEUED, JobState.SCHEDULED):
            return ""
        try:
            workers = await (await self.abroker()).list_workers()
        except Exception:  # only a hint: the timeout is the error to report
            return ""
        if any(job.queue in w.queues for w in workers):
            return ""
        return f"; no worker is consuming queue {job.queue!r}"


__all__ = ["AppParts", "Client", "DepthCheck", "EnqueueObserver", "JobRunner"]


security_log = logging.getLogger("taskmill.security")


def _warn_if_exposed(url: str) -> None:
    """A WARNING (on ``taskmill.security``) when the broker is on another machine and its URL
    has no TLS or no credentials: anyone on the path can read the jobs, or use the broker.
    Not refused (a broker on a private network without TLS is a choice many make); set that
    logger's level to ERROR to silence it."""
    missing = exposure(url)
    if missing is not None:
        security_log.warning(
            "the broker %s is not on this machine and its URL has no %s: anyone on the "
            "network path can read the jobs%s (see docs/brokers.md, TLS and credentials)",
            redact_url(url),
            missing,
            " or use the broker" if "credentials" in missing else "",
        )
