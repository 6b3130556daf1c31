"""Running one job: a short pipeline of named steps over one record, the ``JobRun``.

    resolve → decode → limits → on_start → call → encode → decide → release → outcome hooks

``Pipeline.begin`` resolves the job's task once, at the claim, and makes its record;
``Pipeline.run`` takes it through the other steps and returns its outcome. Every outcome is
built by ``retry.decide``, those of interrupted runs too (a cancel request, a shutdown, a
lost lease: ``JobRun.interrupt``). Recording "started" is the claim, and recording
"finished" is the outbox's (``worker/outbox.py``): the worker hands the outcome over.

A job of a task that no limit and no hook applies to (checked once per task and queue) takes
the fast path: decode, call, encode, decide, with nothing between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from taskmill.brokers.features import limit_store
from taskmill.context import JobContext
from taskmill.errors import PayloadTooLargeError, SerializationError, UnknownTaskError
from taskmill.hooks import HookName, JobView, arun_hooks, instrumented_run
from taskmill.job import Claim, Failed, Job, Outcome, Released, RetryAt, Succeeded
from taskmill.limits import hold_slot, wait_for_rate_slots
from taskmill.portal import DaemonThreads
from taskmill.retry import Interrupt, RetryPolicy, decide
from taskmill.serialization import encode, payload_options, try_decode
from taskmill.worker.holdings import NOT_HELD
from taskmill.worker.joblog import job_log, log_outcome, log_start
from taskmill.worker.pools import call_async

if TYPE_CHECKING:
    from taskmill.brokers.base import Broker
    from taskmill.registry import Registry, TaskDefinition
    from taskmill.worker.metrics import JobMetrics
    from taskmill.worker.pools import Runner
    from taskmill.worker.reserve import BodySlots

log = logging.getLogger("taskmill.worker")

__all__ = ["Interrupt", "JobRun", "Pipeline"]


@dataclass(eq=False, slots=True)
class JobRun:
    """One claimed job on its way through the pipeline: what each step reads and writes."""

    job: Job
    claim: Claim
    ctx: JobContext
    task: TaskDefinition | None
    """Resolved once, at the claim; None if this worker has no task of that name."""
    plain: bool
    """No limit and no hook applies: the steps between the claim and the call are skipped."""
    interrupted: list[Interrupt] = field(default_factory=list)
    """Why the worker interrupted the run, in order; the first one decides its outcome."""
    handle: asyncio.Task[Outcome] | None = None
    """The asyncio task the run goes through the pipeline in."""
    lost: bool = False
    """The lease went to another worker: the outcome is dropped."""
    slot: tuple[str, int] | None = None
    """The (bucket, limit) of the concurrency slot held."""
    called_at: float | None = None
    """Monotonic, just before the call (None if the job failed before it)."""
    duration_s: float | None = None
    """From ``called_at`` to the outcome: what the outcome hooks are told."""
    finishing: bool = False
    """The outcome is decided (the slot is released, the hooks run): a cancel is too late."""
    ended: bool = False
    """The outcome is with the outbox (or dropped): later progress reports are ignored."""
    held: int = NOT_HELD
    """Its slot in the worker's table of held jobs (``worker.holdings``), if it keeps one."""
    waiting: bool = False
    """It waits for one of the worker's slots (a reserve job: ``worker.reserve``)."""
    in_slot: bool = False
    """It holds one of the worker's slots, until its function returns."""
    ran: bool = False
    """Its function was called (a job that failed before is dead on arrival)."""

    @property
    def is_async(self) -> bool:
        return self.task is not None and self.task.is_async

    def interrupt(self, reason: Interrupt) -> None:
        """Ask the run to stop, for ``reason``. A sync function in a thread cannot be stopped
        from outside: a cancel is cooperative (``current_job().cancelled``); a shutdown or a
        lost lease stop waiting for it (the worker hands the job back or drops it)."""
        self.interrupted.append(reason)
        self.ctx._cancelled.set()
        stoppable = (self.is_async or self.waiting) and not self.finishing
        if self.handle is not None and (stoppable or reason is not Interrupt.CANCEL):
            self.handle.cancel()


Reporter = Callable[[str, float | None, str | None], None]
"""Where a job's context sends its progress reports: (job id, fraction, message)."""


class Pipeline:
    """The steps of one worker's jobs, and what they need: the registry the tasks come from,
    the runner of sync functions, the broker that holds the limits."""

    def __init__(
        self,
        registry: Registry,
        runner: Runner,
        broker: Broker,
        *,
        worker_id: str,
        lease_s: float,
        finished: Callable[[JobRun, Outcome], None],
        metrics: JobMetrics | None = None,
        hook_threads: int = 8,
        max_payload_bytes: int | None = None,
        slots: BodySlots | None = None,
    ) -> None:
        self.registry = registry
        self.runner = runner
        self.broker = broker
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.finished = finished
        """The last step: the worker takes the outcome (to the outbox)."""
        self.metrics = metrics
        """Counts each outcome with its run time (``--metrics-port``)."""
        self.max_payload_bytes = max_payload_bytes
        """A stored payload longer than this fails its job unread (the app's limit at send;
        a longer one was written by something else: an older app, another tool)."""
        self.slots = slots
        """The worker's slots, if it claims beyond them: a job takes one before its call."""
        # sync hooks' threads: not the loop's executor, which refuses work at interpreter
        # exit, when a worker thread stopped from an atexit hook drains its jobs
        self.hook_threads = DaemonThreads(hook_threads, "taskmill-hooks")
        self._plain: dict[tuple[str, str], bool] = {}  # (task, queue) -> the fast path applies

    # --- resolve ----------------------------------------------------------------------------

    def begin(self, job: Job, report: Reporter) -> JobRun:
        """The record of a claimed job: its task resolved, its context (progress reports go
        to ``report``), whether it takes the fast path."""
        assert job.lease_token is not None  # a claimed job
        task = self.registry.tasks.get(job.task)
        kind = (job.task, job.queue)
        plain = self._plain.get(kind)
        if plain is None:
            plain = self._plain[kind] = self._is_plain(task, job)
        ctx = JobContext(
            id=job.id,
            task=job.task,
            queue=job.queue,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            _report=report,
        )
        return JobRun(job, Claim(job.id, job.lease_token), ctx, task, plain)

    def _is_plain(self, task: TaskDefinition | None, job: Job) -> bool:
        """No rate or concurrency limit and no hook applies to the job's task (the fast path
        skips the per-job checks, 15 % of an async no-op's cost on SQLite, measured). Hooks
        and limits are set before workers start."""
        if task is None:
            return True  # the call step fails it as unknown
        return not (
            task.rate_interval_s is not None
            or task.concurrency is not None
            or task.hooks
            or self.registry.hooks
            or self.registry.rate_buckets(task, job)
        )

    # --- the run ----------------------------------------------------------------------------

    async def run(self, r: JobRun) -> Outcome:
        """Every step after the claim, to ``finished``; the outcome. Interrupts end in an
        outcome too; only a cancel of the run's asyncio task by anyone else is raised."""
        began = 0.0 if r.plain else time.monotonic()  # the fast path sets it before any await
        if r.ctx._mark_idle is not None:
            r.ctx._mark_idle(False)  # its own steps begin: a death now may be its doing
        try:
            outcome = None if r.plain else await self._prepare(r)
            if outcome is None:
                began = r.called_at = time.monotonic()
                if job_log.isEnabledFor(logging.DEBUG):
                    log_start(r.job, self.worker_id)
                outcome = await self._call(r)
        except asyncio.CancelledError as exc:
            if not r.interrupted:
                raise
            outcome = self._decide(r, exc=exc)
        except Exception as exc:  # a bug of ours: fail the attempt loudly, keep the worker
            log.exception("job %s (%s): the worker failed running it", r.job.id, r.job.task)
            outcome = self._decide(r, exc=exc)
        finally:
            if r.in_slot:
                r.in_slot = False
                assert self.slots is not None
                self.slots.give_back()
        r.finishing = True
        if not r.plain:
            await self._end(r, outcome)
        self._tell(r, outcome, began)
        self.finished(r, outcome)
        return outcome

    def _tell(self, r: JobRun, outcome: Outcome, began: float) -> None:
        """The outcome to the job log and the metrics, with the time since ``began``."""
        log_it = not r.lost and job_log.isEnabledFor(logging.INFO)
        if log_it or self.metrics is not None:  # the clock is read only for them
            run_s = time.monotonic() - began
            if log_it:
                log_outcome(r.job, outcome, run_s, self.worker_id)
            if self.metrics is not None:
                self.metrics.finished(r.job, outcome, run_s, lost=r.lost)

    def _decide(
        self,
        r: JobRun,
        *,
        policy: RetryPolicy | None = None,
        result: bytes | None = None,
        exc: BaseException | None = None,
    ) -> Outcome:
        job = r.job
        return decide(
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            policy=policy,
            result=result,
            exc=exc,
            interrupt=r.interrupted[0] if r.interrupted else None,
        )

    # --- decode, limits, on_start (jobs off the fast path) ----------------------------------

    async def _prepare(self, r: JobRun) -> Outcome | None:
        """Decode the arguments, wait for the job's limits, call ``on_start``: an outcome if
        the job fails before its call."""
        early = await self._limits(r)
        if early is None:
            await self._hooks("on_start", r)
        return early

    async def _limits(self, r: JobRun) -> Outcome | None:
        """Wait for the job's rate-limited start and its concurrency slot, its lease held
        meanwhile (not failed, no attempt spent). An outcome only if its arguments do not
        decode, or its limit's key cannot be computed from them."""
        task = r.task
        if task is None:
            return None  # the call step fails it as unknown
        try:  # decoded once for the run: hooks, current_job() and the call read them too
            args, kwargs = self._arguments(task, r)
        except (SerializationError, PayloadTooLargeError, TypeError) as exc:
            return self._decide(r, exc=exc)
        if not self._slot(r) and not await self._wait_for_slot(r):
            return Released()
        buckets = self.registry.rate_buckets(task, r.job)
        if buckets:
            await wait_for_rate_slots(self.broker, buckets)
        limit = task.concurrency
        if limit is None:
            return None
        try:
            bucket = limit.bucket(r.job.task, task.types.named(args, kwargs))
        except Exception as exc:  # a key function that raised
            return self._decide(r, exc=exc)
        r.slot = (bucket, limit.max)
        await hold_slot(self.broker, bucket, r.job.id, limit.max, self.lease_s)
        return None

    # --- decode (fast path), call, encode, decide --------------------------------------------

    async def _call(self, r: JobRun) -> Outcome:
        task = r.task
        if task is None:
            return self._decide(r, exc=unknown_task(self.registry, r.job))
        try:
            args, kwargs = self._arguments(task, r)
        except (SerializationError, PayloadTooLargeError, TypeError) as exc:
            return self._decide(r, exc=exc)
        if not self._slot(r) and not await self._wait_for_slot(r):
            return Released()
        r.ran = True
        r.called_at = time.monotonic()  # again: a job in reserve waited for its slot since
        try:
            soft_s = soft_limit_s(task, r.job)
            if self.registry.instrumentations:
                value = await self._call_instrumented(task, args, kwargs, r, soft_s)
            elif task.is_async:  # on this loop, whatever the pool: pools are for sync functions
                value = await call_async(task, args, kwargs, r.ctx, r.job.timeout_s, soft_s)
            else:
                value = await self.runner.call(task, args, kwargs, r.ctx, r.job.timeout_s, soft_s)
            result = encode(value, what=f"result of task {task.name!r}")
            check_result(task, result)
        except asyncio.CancelledError:
            raise  # an interrupt (or not ours): see run
        except SerializationError as exc:  # no retry makes a result convert
            return self._decide(r, exc=exc)
        except BaseException as exc:
            return self._decide(r, exc=exc, policy=task.policy)
        return self._decide(r, result=result)

    def close_slots(self) -> None:
        """The worker stops: jobs waiting for a slot, and any that would, are handed back."""
        if self.slots is not None:
            self.slots.close()

    def _slot(self, r: JobRun) -> bool:
        """Take one of the worker's slots for the job's run, if one is free at once (or the
        job holds one already); False if it must wait (``_wait_for_slot``)."""
        slots = self.slots
        if slots is None or r.in_slot:
            return True
        r.in_slot = slots.try_take()
        return r.in_slot

    async def _wait_for_slot(self, r: JobRun) -> bool:
        """Wait for a slot: the worker claimed beyond them. False if none came in time or
        the worker stops (the job is handed back unstarted). Meanwhile the job counts as
        idle in the worker's table of held jobs."""
        assert self.slots is not None
        r.waiting = True
        if r.ctx._mark_idle is not None:
            r.ctx._mark_idle(True)
        try:
            if not await self.slots.take():
                return False
        finally:
            r.waiting = False
        if r.ctx._mark_idle is not None:
            r.ctx._mark_idle(False)
        r.in_slot = True
        return True

    def _arguments(self, task: TaskDefinition, r: JobRun) -> tuple[list[Any], dict[str, Any]]:
        """``arguments``, after checking the stored payload's size against the app's limit."""
        limit = self.max_payload_bytes
        if limit is not None and len(r.job.payload) > limit and r.ctx._arguments is None:
            raise PayloadTooLargeError(
                f"stored arguments of task {task.name!r} are {len(r.job.payload):,} bytes; the "
                f"limit is {limit:,} (App(max_payload_bytes=...)): not decoded"
            )
        return arguments(task, r.job, r.ctx)

    async def _call_instrumented(
        self,
        task: TaskDefinition,
        args: list[Any],
        kwargs: dict[str, Any],
        r: JobRun,
        soft_s: float | None,
    ) -> Any:
        """The call inside the app's instrumentations' ``running``, entered in the job's own
        asyncio task: what they make current, the function sees (a thread's call copies this
        task's context)."""
        with instrumented_run(self.registry.instrumentations, r.job):
            if task.is_async:
                return await call_async(task, args, kwargs, r.ctx, r.job.timeout_s, soft_s)
            return await self.runner.call(task, args, kwargs, r.ctx, r.job.timeout_s, soft_s)

    # --- release, outcome hooks -------------------------------------------------------------

    async def _end(self, r: JobRun, outcome: Outcome) -> None:
        """Release the concurrency slot, call the outcome hooks (jobs off the fast path: a
        job on it has neither). The outcome is decided: a
        cancel request is too late, and a shutdown or a lost lease cuts these steps short
        without changing it."""
        if r.called_at is not None:
            r.duration_s = time.monotonic() - r.called_at
        try:
            if r.slot is not None:
                await self._release_slot(r)
            if not r.lost:
                await self._outcome_hooks(r, outcome)
        except asyncio.CancelledError:
            if not r.interrupted:
                raise
            log.warning(
                "job %s (%s): slot release and hooks cut short (%s); its outcome %s stands",
                r.job.id,
                r.job.task,
                r.interrupted[-1],
                type(outcome).__name__,
            )

    async def renew_slots(self, runs: list[JobRun]) -> None:
        """At a heartbeat: a running job's concurrency slot lives as long as its lease."""
        for r in runs:
            if r.slot is not None:
                bucket, limit = r.slot
                with contextlib.suppress(Exception):
                    slots = limit_store(self.broker)
                    await slots.acquire_slot(bucket, r.job.id, limit, self.lease_s)

    async def _release_slot(self, r: JobRun) -> None:
        assert r.slot is not None
        try:
            await limit_store(self.broker).release_slot(r.slot[0], r.job.id)
        except Exception as exc:  # it expires after a lease anyway
            log.error("job %s: releasing its concurrency slot failed: %s", r.job.id, exc)

    async def _hooks(self, name: HookName, r: JobRun, *args: Any, result: Any = None) -> None:
        lists = self.registry.hook_lists(r.task, name)
        if any(lists):
            view = JobView.of(r.job, r.ctx, duration_s=r.duration_s, result=result)
            await arun_hooks(
                lists, name, r.job.id, r.job.task, view, *args, threads=self.hook_threads
            )

    async def _outcome_hooks(self, r: JobRun, outcome: Outcome) -> None:
        """on_success / on_failure / on_retry: after the outcome is decided, before it is
        written (a hook never changes it)."""
        if isinstance(outcome, Succeeded):
            if any(self.registry.hook_lists(r.task, "on_success")):
                result = result_value(r.task, outcome.result)
                await self._hooks("on_success", r, result, result=result)
        elif isinstance(outcome, Failed):
            await self._hooks("on_failure", r, outcome.error)
        elif isinstance(outcome, RetryAt):
            await self._hooks("on_retry", r, outcome.error, outcome.delay_s)


# --- the steps' helpers -----------------------------------------------------------------------


def unknown_task(registry: Registry, job: Job) -> UnknownTaskError:
    known = ", ".join(sorted(registry.tasks)) or "none"
    return UnknownTaskError(
        f"no task named {job.task!r} is registered in this worker's app (known: {known}); "
        "was it renamed, or is the worker running older code?"
    )


def arguments(
    task: TaskDefinition, job: Job, ctx: JobContext | None = None
) -> tuple[list[Any], dict[str, Any]]:
    """The stored arguments, decoded to the types the function declares and checked to bind
    to its signature (``taskmill.conversion``): a ``SerializationError`` or ``TypeError``
    otherwise. Decoded once per run: the first step that needs them (limits, hooks or the
    call) keeps them on the job's context, where the others find them."""
    if ctx is not None and ctx._arguments is not None:
        return ctx._arguments
    decoded = task.types.arguments(job.payload)
    if ctx is not None:
        ctx._arguments = decoded
    return decoded


def check_result(task: TaskDefinition, result: bytes) -> None:
    """A result that would not decode to the task's return annotation is a
    ``SerializationError`` here, like one that cannot be encoded: not a surprise later in
    whoever reads it."""
    if task.types.result_decoder is not None:
        task.types.result(result)


def result_value(task: TaskDefinition | None, result: bytes) -> Any:
    """The result as ``JobHandle.result()`` returns it (the call step checked that it
    decodes; should it not, the hooks get it as stored rather than an error)."""
    try:
        return try_decode(result) if task is None else task.types.result(result)
    except SerializationError:
        return try_decode(result)


def soft_limit_s(task: TaskDefinition, job: Job) -> float | None:
    """The job's soft time limit: the one its send stored, else this worker's registration of
    the task. None if it would not come before the hard limit (that one stops the run first)."""
    soft: float | None = payload_options(job.payload).get(
        "soft_timeout_s", task.defaults.soft_timeout_s
    )
    if soft is not None and job.timeout_s is not None and soft >= job.timeout_s:
        return None
    return soft
