"""The worker: one asyncio loop that claims jobs in batches, runs them, and reports back.

Four concurrent loops share the state below:
- claim: take up to as many due jobs as there are free slots, in one broker call;
- flush: write finished outcomes (and coalesced progress) in one broker call per batch;
- heartbeat: extend every held lease, learn of cancels and lost leases;
- maintenance: recover expired leases (anyone's), sweep running workflows, prune old finished
  jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from taskmill._ids import workflow_of
from taskmill.brokers.base import Broker, HandOver
from taskmill.brokers.features import limit_store
from taskmill.context import JobContext
from taskmill.errors import BrokerError, BrokerUnavailableError, SerializationError
from taskmill.events import Event, ended, outcome_state, progressed, publish, started
from taskmill.hooks import HookName, JobView, arun_hooks
from taskmill.job import (
    Claim,
    Failed,
    Finish,
    Job,
    Outcome,
    Progress,
    Released,
    RetryAt,
    Succeeded,
    WorkerInfo,
)
from taskmill.limits import hold_slot, wait_for_rate_slots
from taskmill.retry import error_info
from taskmill.serialization import try_decode
from taskmill.urls import redact_url
from taskmill.worker.execution import (
    Interrupt,
    arguments,
    execute,
    fail_now,
    interrupted_outcome,
)
from taskmill.worker.joblog import job_log, log_outcome, log_start
from taskmill.worker.names import worker_id
from taskmill.worker.pools import InlineRunner, Runner, ThreadRunner
from taskmill.workflows import advance, sweep

if TYPE_CHECKING:
    from taskmill.client import AppParts

log = logging.getLogger("taskmill.worker")

PoolKind = Literal["async", "thread", "process"]
_PROGRESS_INTERVAL_S = 0.1
_START_RETRY_FIRST_S = 0.5
_START_RETRY_CAP_S = 30.0


@dataclass(eq=False)
class _Running:
    job: Job
    claim: Claim
    ctx: JobContext
    is_async: bool
    interrupted: list[str] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    lost: bool = False
    slot: tuple[str, int] | None = None  # (bucket, limit) of a concurrency slot held
    called_at: float | None = None  # monotonic, just before execute (jobs with hooks)
    duration_s: float | None = None  # from called_at to the outcome: the outcome hooks'
    finishing: bool = False  # outcome decided, its hooks running: a cancel request is too late


class Worker:
    """Runs the jobs of ``app`` (an ``App``, or anything with its ``registry`` and
    ``client``). ``taskmill worker`` builds one per process; tests may run one in-process
    (``await worker.run()`` and ``worker.stop()`` from any thread). With ``scheduler`` (the
    default) it also enqueues the app's periodic schedules' ticks.

    ``name`` is kept in the worker's id (``name@host-pid-random``, see
    ``taskmill.worker.names``). A broker that cannot be reached at start
    (``BrokerUnavailableError``) is retried, logged at WARNING each time, after 0.5 s doubling
    up to 30 s, for ever or until ``max_start_wait_s``; any other error at start is raised.
    ``on_heartbeat`` is called on the worker's loop after each heartbeat the broker took.
    """

    def __init__(
        self,
        app: AppParts,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 16,
        pool: PoolKind = "thread",
        app_path: str | None = None,
        max_tasks_per_child: int | None = None,
        drain_timeout_s: float = 30.0,
        idle_poll_s: float = 5.0,
        register: bool = True,
        scheduler: bool = True,
        name: str | None = None,
        max_start_wait_s: float | None = None,
        on_heartbeat: Callable[[], None] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if pool == "process" and app_path is None:
            raise ValueError("pool='process' needs app_path ('module:app') for the children")
        self.app = app  # what the scheduler is given
        self.registry = app.registry
        self.client = app.client
        settings = self.client.settings
        self.queues = list(queues) if queues else [settings.default_queue]
        self.concurrency = concurrency
        self.pool: PoolKind = pool
        self.app_path = app_path
        self.max_tasks_per_child = max_tasks_per_child
        self.drain_timeout_s = drain_timeout_s
        self.idle_poll_s = idle_poll_s
        self.register = register
        self.scheduler = scheduler
        self.id = worker_id(name)
        self.name = name
        self.max_start_wait_s = max_start_wait_s
        self.on_heartbeat = on_heartbeat
        # set once the broker is open: before it, run() only retries reaching the broker
        self.connected = asyncio.Event()
        self.last_heartbeat_ok: float | None = None  # time.monotonic() of the last one taken
        self.started_at = time.time()
        self.jobs_done = 0
        self.processed = self.failed = 0  # runs with an outcome written, those that raised
        self.lease_s = settings.lease_s
        self.heartbeat_s = settings.effective_heartbeat_s
        self._running: dict[str, _Running] = {}
        self._pending: list[Finish] = []
        self._flushing: list[Finish] = []  # outcomes the flush loop is writing
        self._riding: list[Finish] = []  # outcomes riding along with a claim
        self._progress: dict[str, Progress] = {}
        self._progress_lock = threading.Lock()
        # the last unwritten report of each job that ended: written before its outcome, by
        # whichever call carries that outcome (a report after the outcome would be refused)
        self._final_progress: list[tuple[Progress, Job]] = []
        self._progress_write = asyncio.Lock()  # progress writes land in the order they were made
        self._progress_wake_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested = False
        self._stop_now = False
        self._stop_event: asyncio.Event | None = None
        self._progressed: asyncio.Event | None = None
        self._flush_wake: asyncio.Event | None = None
        self._flush_lock = asyncio.Lock()  # one flush at a time (see _flush_all)
        self._idle_task: asyncio.Task[list[Job]] | None = None
        self._broker: Broker | None = None
        self._events_on = settings.events
        self._events: list[Event] = []  # published in order by _events_loop
        self._events_wake: asyncio.Event | None = None
        self._finishing: dict[str, Job] = {}  # with events on: jobs whose outcome is pending
        # (task, queue) -> no limit and no hook applies (the fast path)
        self._plain_tasks: dict[tuple[str, str], bool] = {}
        self._fatal: BrokerError | None = None  # a permanent broker error: run() raises it

    # --- control (thread-safe) ----------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming; running jobs get ``drain_timeout_s`` to finish. Call again to stop
        at once (running jobs are handed back without spending an attempt)."""
        if self._stop_requested:
            self._stop_now = True
        self._stop_requested = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake_for_stop)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: the first drains (see ``stop``), the second stops at once.
        Call from inside ``run``'s loop, before or while it runs (the CLI does)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self._stop_requested:
            log.warning("worker %s: %s again: stopping now", self.id, name)
        else:  # a normal shutdown (a deploy, a scale-down): nothing to warn about
            log.info("worker %s: %s: draining (send again to stop at once)", self.id, name)
        self.stop()

    def _wake_for_stop(self) -> None:
        if self._stop_event is None or self._progressed is None:
            return  # not running yet: run() sees _stop_requested
        self._stop_event.set()
        self._progressed.set()
        if self._idle_task is not None:
            self._idle_task.cancel()

    # --- main -------------------------------------------------------------------------------

    async def run(self, *, until_idle: bool = False) -> int:
        """Run until stopped (or, with ``until_idle``, until nothing is due or running).
        Returns how many jobs this worker finished."""
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._progressed = asyncio.Event()
        self._flush_wake = asyncio.Event()
        if self._stop_requested:
            self._stop_event.set()
        broker = await self._open_broker()
        if broker is None:
            return 0  # stopped while the broker was unreachable
        self._broker = broker
        self.connected.set()
        await self._broker.attach()
        runner = self._make_runner()
        background = [
            asyncio.create_task(self._flush_loop(), name="taskmill-flush"),
            asyncio.create_task(self._heartbeat_loop(), name="taskmill-heartbeat"),
        ]
        if self._events_on:
            self._events_wake = asyncio.Event()
            background.append(asyncio.create_task(self._events_loop(), name="taskmill-events"))
        if not until_idle:
            background.append(asyncio.create_task(self._maintenance_loop(), name="taskmill-maint"))
            if self.scheduler and self.registry.schedules:
                from taskmill.scheduler import Scheduler

                background.append(
                    asyncio.create_task(
                        Scheduler(self.app).run(self._stop_event), name="taskmill-scheduler"
                    )
                )
        self._runner = runner
        if self.register:
            await self._heartbeat_once()
            log.info(
                "worker %s started: queues=%s concurrency=%d pool=%s broker=%s",
                self.id,
                ",".join(self.queues),
                self.concurrency,
                self.pool,
                redact_url(self.client.url),
            )
        try:
            await self._claim_loop(until_idle)
            await self._drain()
            await self._flush_all()
        finally:
            await _cancel_and_wait(background)
            if self._events_on:
                await self._publish_events()  # what the cancelled publisher had not sent
            if self._pending:  # a flush that failed on the way out: one last try
                with contextlib.suppress(Exception):
                    await self._flush_all()
            # always: it also hands back jobs handed over to this worker that it never took
            with contextlib.suppress(Exception):
                await self._broker.unregister_worker(self.id)
            runner.close()
            with contextlib.suppress(Exception):
                await self._broker.detach()
            if self.register:
                log.info("worker %s stopped after %d jobs", self.id, self.jobs_done)
        if self._fatal is not None:
            raise self._fatal
        return self.jobs_done

    async def _open_broker(self) -> Broker | None:
        """The app's broker, opened; one that cannot be reached is retried with back-off
        (``None`` if the worker is stopped meanwhile). Other errors are raised: a read-only
        file or a refused login does not get better by waiting."""
        assert self._stop_event is not None
        deadline = (
            None if self.max_start_wait_s is None else time.monotonic() + self.max_start_wait_s
        )
        delay = _START_RETRY_FIRST_S
        while True:
            try:
                return await self.client.abroker()
            except BrokerUnavailableError as exc:
                if self._stop_event.is_set():
                    return None
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise BrokerUnavailableError(
                        f"gave up reaching the broker after {self.max_start_wait_s:g} s: {exc}"
                    ) from exc
                log.warning(
                    "worker %s: cannot reach the broker at start, retrying in %.1f s: %s",
                    self.id,
                    delay,
                    exc,
                )
            await self._sleep_unless_stopped(delay)
            if self._stop_event.is_set():
                return None
            delay = min(delay * 2, _START_RETRY_CAP_S)

    def _make_runner(self) -> Runner:
        if self.pool == "process":
            from taskmill.worker.process_pool import ProcessRunner

            assert self.app_path is not None
            return ProcessRunner(self.app_path, self.concurrency, self.max_tasks_per_child)
        if self.pool == "async":
            return InlineRunner()
        return ThreadRunner(self.concurrency)

    # --- claiming ---------------------------------------------------------------------------

    async def _claim_loop(self, until_idle: bool) -> None:
        assert self._broker and self._stop_event and self._progressed
        broker, stop, progressed = self._broker, self._stop_event, self._progressed
        backoff = 0.05
        while not stop.is_set():
            free = self.concurrency - len(self._running)
            if free <= 0:
                progressed.clear()
                await progressed.wait()
                if len(self._running) > self.concurrency * 3 // 4:
                    await asyncio.sleep(0)  # let completions that are ready land: bigger batches
                continue
            # outcomes waiting to be written ride along with the claim: one transaction
            batch, self._pending = self._pending, []
            final, self._final_progress = self._final_progress, []
            self._riding = batch
            try:
                if final or self._progress_write.locked():
                    await self._write_progress(final)  # after any report of theirs in flight
                applied, jobs = await broker.finish_and_claim(
                    batch, self.queues, free, self.id, self.lease_s
                )
                backoff = 0.05
            except Exception as exc:
                self._pending[:0] = batch
                self._final_progress[:0] = final
                if isinstance(exc, BrokerError) and exc.permanent:
                    self._stop_for_good(exc)
                    return
                log.error("worker %s: claim failed, retrying in %.2f s: %s", self.id, backoff, exc)
                await self._sleep_unless_stopped(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            finally:
                self._riding = []
            self._log_rejected(batch, applied)
            self._emit_outcomes(batch, applied)
            advanced = await self._advance_workflows(batch, applied)
            for job in jobs:
                self._start(job)
            if len(jobs) >= free or advanced:  # advanced: steps may have been released
                continue
            if until_idle:
                if not jobs and not self._running and not self._pending and not self._flushing:
                    return
                progressed.clear()
                await self._idle_wait(progressed)
            elif not jobs:
                await self._idle_wait(None)

    def _stop_for_good(self, exc: BrokerError) -> None:
        """No retry can fix the error: stop at once (outcomes could not be written either),
        and let run() raise it."""
        assert self._stop_event is not None
        log.error("worker %s: stopping: %s", self.id, exc)
        self._fatal = exc
        self._stop_requested = self._stop_now = True
        self._stop_event.set()

    async def _idle_wait(self, also: asyncio.Event | None) -> None:
        assert self._broker and self._flush_wake and self._stop_event
        if self._stop_event.is_set():
            return  # stop() came during the claim: there was no idle task for it to cancel
        # a job handed over while waiting is ours already; only a plain idle wait (no event that
        # could cancel it mid-reply) takes hand-overs, so a cancelled wait loses none
        handover = None if also is not None else HandOver(self.id, self.lease_s)
        idle = self._idle_task = asyncio.create_task(
            self._broker.wait(self.queues, self.idle_poll_s, handover)
        )
        if self._pending:
            self._flush_wake.set()
        waiters: list[asyncio.Future[Any]] = [idle]
        if also is not None:
            waiters.append(asyncio.create_task(also.wait()))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in waiters:
                t.cancel()
            self._idle_task = None
        if not idle.done() or idle.cancelled():
            return
        exc = idle.exception()
        if exc is not None:
            log.error("waiting for work failed: %s", exc)
            await self._sleep_unless_stopped(0.5)
            return
        handed = idle.result()
        for job in handed:
            self._start(job)
        if handed:
            await asyncio.sleep(0)

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        assert self._stop_event
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop_event.wait()

    def _start(self, job: Job) -> None:
        assert job.lease_token is not None and self._loop is not None
        claim = Claim(job.id, job.lease_token)
        ctx = JobContext(
            id=job.id,
            task=job.task,
            queue=job.queue,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            _report=self._report_progress,
        )
        task = self.registry.tasks.get(job.task)
        running = _Running(job, claim, ctx, is_async=task is not None and task.is_async)
        self._running[job.id] = running
        if self._events_on:
            self._emit(started(job, time.time()))
        running.task = self._loop.create_task(self._run_one(running))

    async def _run_one(self, r: _Running) -> None:
        kind = (r.job.task, r.job.queue)
        plain = self._plain_tasks.get(kind)
        if plain is None:
            plain = self._plain_tasks[kind] = self._is_plain(r.job)
        began = time.monotonic()
        try:
            early = None if plain else await self._flow_control(r)
            if early is None and not plain:
                await self._hooks("on_start", r)
                began = time.monotonic()  # the run's duration, not the wait for its limits
            if early is None:  # the function is called (not failed before it by its limits)
                r.called_at = began
            if job_log.isEnabledFor(logging.DEBUG):
                log_start(r.job, self.id)
            outcome: Outcome = early or await execute(
                self.registry, r.job, r.ctx, self._runner, r.interrupted
            )
        except asyncio.CancelledError:
            if not r.interrupted:
                raise
            outcome = interrupted_outcome(r.interrupted)
        except Exception as exc:  # a bug of ours: fail the attempt loudly, keep the worker
            log.exception("job %s (%s): the worker failed running it", r.job.id, r.job.task)
            outcome = Failed(error_info(exc))
        if r.called_at is not None:
            r.duration_s = time.monotonic() - r.called_at
        if r.slot is not None:
            await self._release_slot(r)
        if not r.lost and not plain:
            await self._outcome_hooks(r, outcome)
        del self._running[r.job.id]
        with self._progress_lock:  # no report of this job is taken after this point
            last_report = self._progress.pop(r.job.id, None)
        self.jobs_done += 1
        if r.lost:
            log.warning(
                "job %s (%s): dropped its outcome %s: the lease was lost to another worker",
                r.job.id,
                r.job.task,
                type(outcome).__name__,
            )
        else:
            if last_report is not None:
                self._final_progress.append((last_report, r.job))
            self._pending.append(Finish(r.claim, outcome))
            if not isinstance(outcome, Released):
                self.processed += 1
                self.failed += isinstance(outcome, Failed | RetryAt)
            if self._events_on:
                self._finishing[r.job.id] = r.job
            # a claim loop about to claim carries the outcome in its transaction; only an
            # idle or stopping one leaves it to the flusher
            if self._idle_task is not None or self._stop_requested:
                assert self._flush_wake
                self._flush_wake.set()
        if not r.lost and job_log.isEnabledFor(logging.INFO):
            log_outcome(r.job, outcome, time.monotonic() - began, self.id)
        assert self._progressed
        self._progressed.set()

    # --- flushing ---------------------------------------------------------------------------

    def _report_progress(self, job_id: str, fraction: float | None, message: str | None) -> None:
        r = self._running.get(job_id)
        if r is None:
            return
        with self._progress_lock:
            self._progress[job_id] = Progress(r.claim, fraction, message)
            if self._progress_wake_scheduled or self._loop is None:
                return
            self._progress_wake_scheduled = True
        # coalesce: at most one progress write per interval, whatever the task reports
        self._loop.call_soon_threadsafe(
            self._loop.call_later, _PROGRESS_INTERVAL_S, self._wake_flush
        )

    def _wake_flush(self) -> None:
        if self._flush_wake is not None:
            self._flush_wake.set()

    async def _flush_loop(self) -> None:
        assert self._flush_wake
        wake = self._flush_wake
        while True:
            await wake.wait()
            wake.clear()
            async with self._flush_lock:
                await self._flush_once()

    async def _flush_once(self) -> bool:
        """Write pending progress and outcomes; False if the broker refused (kept for later)."""
        assert self._broker and self._progressed and self._flush_wake
        with self._progress_lock:
            running = [(p, r.job) for p in self._progress.values()
                       if (r := self._running.get(p.claim.job_id)) is not None]  # fmt: skip
            self._progress.clear()
            self._progress_wake_scheduled = False
        if running:
            with contextlib.suppress(Exception):  # logged; a later report replaces it anyway
                await self._write_progress(running)
        if not self._pending:
            return True
        batch, self._pending = self._pending, []
        final, self._final_progress = self._final_progress, []
        self._flushing = batch
        try:
            if final or self._progress_write.locked():
                await self._write_progress(final)  # after any report of theirs in flight
            applied = await self._broker.finish(batch)
        except Exception as exc:
            self._flushing = []
            self._pending[:0] = batch
            self._final_progress[:0] = final
            log.error(
                "worker %s: recording %d outcomes failed, will retry (leases are still held): %s",
                self.id,
                len(batch),
                exc,
            )
            await self._sleep_unless_stopped(0.5)
            self._flush_wake.set()
            return False
        self._log_rejected(batch, applied)
        self._emit_outcomes(batch, applied)
        try:  # still "flushing" meanwhile: run_until_idle must not end before steps it releases
            await self._advance_workflows(batch, applied)
        finally:
            self._flushing = []
        self._progressed.set()
        return True

    @staticmethod
    def _log_rejected(batch: list[Finish], applied: list[bool]) -> None:
        for finish, ok in zip(batch, applied, strict=True):
            if not ok:
                log.warning(
                    "job %s: outcome %s rejected: lease token %s is stale (the job was recovered "
                    "and handed to another attempt)",
                    finish.claim.job_id,
                    type(finish.outcome).__name__,
                    finish.claim.token,
                )

    # --- live events (App(events=True)) ---------------------------------------------------------

    def _emit(self, event: Event) -> None:
        self._events.append(event)
        if self._events_wake is not None:
            self._events_wake.set()

    async def _write_progress(self, items: list[tuple[Progress, Job]]) -> None:
        """Store progress reports (and publish them as events), one write at a time: a job's
        last report must not be overtaken by an earlier one still in flight. With no items:
        wait for the write in flight, which may hold a report of a job whose outcome is next
        (an outcome written first would make the broker refuse that report as stale)."""
        assert self._broker is not None
        async with self._progress_write:
            if not items:  # only waited for the write in flight
                return
            try:
                await self._broker.record_progress([p for p, _ in items])
            except Exception as exc:
                log.error("worker %s: recording progress failed: %s", self.id, exc)
                raise
            if self._events_on:  # under the lock: before the events of outcomes it held back
                now = time.time()
                for p, job in items:
                    self._emit(progressed(job, p.fraction, p.message, now))

    def _emit_outcomes(self, batch: list[Finish], applied: list[bool]) -> None:
        if not self._events_on:
            return
        now = time.time()
        for finish, ok in zip(batch, applied, strict=True):
            job = self._finishing.pop(finish.claim.job_id, None)
            if ok and job is not None:
                self._emit(ended(job, outcome_state(finish.outcome, now), now))

    async def _events_loop(self) -> None:
        """One publisher per worker, in the order events were made: a job's own events
        leave this worker in order."""
        assert self._events_wake is not None
        while True:
            await self._events_wake.wait()
            self._events_wake.clear()
            await self._publish_events()

    async def _publish_events(self) -> None:
        batch, self._events = self._events, []
        if batch:
            assert self._broker is not None
            try:
                await publish(self._broker, batch)
            except Exception as exc:  # events are at most once: log, never stop the worker
                log.error("worker %s: publishing %d events failed: %s", self.id, len(batch), exc)

    async def _advance_workflows(self, batch: list[Finish], applied: list[bool]) -> bool:
        """A step of a workflow whose outcome is stored may release the next steps: advance
        its workflow now (the maintenance sweep would, later). True if there was one."""
        workflows = {
            wf
            for finish, ok in zip(batch, applied, strict=True)
            if ok and (wf := workflow_of(finish.claim.job_id)) is not None
        }
        for workflow_id in workflows:
            try:
                await advance(self.client, workflow_id)
            except Exception as exc:
                log.error("workflow %s: advancing failed (the sweep retries): %s", workflow_id, exc)
        return bool(workflows)

    async def _flush_all(self) -> None:
        # the flush loop may be writing a batch that already left _pending: wait for it to land,
        # or cancelling the loop on the way out drops that batch
        async with self._flush_lock:
            for _ in range(20):
                if not self._pending and not self._progress:
                    return
                if not await self._flush_once() and self._stop_now:
                    return

    # --- heartbeats -------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self._heartbeat_once()

    async def _heartbeat_once(self) -> None:
        assert self._broker
        claims = [r.claim for r in self._running.values()]
        # the reply names lost jobs by id: by the time it comes, a job lost under the token
        # sent may run here again under a new one (its retry, claimed meanwhile), not lost
        sent_tokens = {c.job_id: c.token for c in claims}
        in_flight = self._pending + self._flushing + self._riding
        claims += [f.claim for f in in_flight]
        if not claims and not self.register:
            return  # an unregistered (in-process test) worker has nothing to report
        info = WorkerInfo(
            id=self.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=self.queues,
            concurrency=self.concurrency,
            started_at=self.started_at,
            heartbeat_at=time.time(),
            running=list(self._running),
            processed=self.processed,
            failed=self.failed,
        )
        try:
            reply = await self._broker.heartbeat(info, claims, self.lease_s)
        except Exception as exc:
            log.error("worker %s: heartbeat failed: %s", self.id, exc)
            return
        self.last_heartbeat_ok = time.monotonic()
        if self.on_heartbeat is not None:
            try:
                self.on_heartbeat()
            except Exception:  # an observer's bug must not stop the heartbeats
                log.exception("worker %s: on_heartbeat failed", self.id)
        for held in list(self._running.values()):
            if held.slot is not None:  # a running job's concurrency slot lives as its lease does
                bucket, limit = held.slot
                with contextlib.suppress(Exception):
                    limits = limit_store(self._broker)
                    await limits.acquire_slot(bucket, held.job.id, limit, self.lease_s)
        for job_id in reply.lost:
            r = self._running.get(job_id)
            if r is not None and not r.lost and r.claim.token == sent_tokens.get(job_id):
                log.warning("job %s (%s): lease lost; stopping it here", job_id, r.job.task)
                r.lost = True
                self._interrupt(r, Interrupt.LOST)
        for job_id in reply.cancel_requested:
            r = self._running.get(job_id)
            if r is not None and not r.interrupted:
                log.info("job %s (%s): cancel requested", job_id, r.job.task)
                self._interrupt(r, Interrupt.CANCEL)

    def _is_plain(self, job: Job) -> bool:
        """No rate or concurrency limit and no hook applies to the job's task (checked once
        per task and queue: the fast path skips the per-job checks, 15 % of an async no-op's
        cost on SQLite, measured). Hooks and limits are set before workers start."""
        task = self.registry.tasks.get(job.task)
        if task is None:
            return True  # execution fails it as unknown
        return not (
            task.rate_interval_s is not None
            or task.concurrency is not None
            or task.hooks
            or self.registry.hooks
            or self.registry.rate_buckets(task, job)
        )

    async def _flow_control(self, r: _Running) -> Outcome | None:
        """Wait for the job's rate-limited start and its concurrency slot, its lease held
        meanwhile (not failed, no attempt spent). An outcome only if its limit's key cannot
        be computed from its arguments."""
        assert self._broker is not None
        task = self.registry.tasks.get(r.job.task)
        if task is None:
            return None  # execution fails it as unknown
        try:  # decoded once for the run: hooks, current_job() and the call read them too
            args, kwargs = arguments(task, r.job, r.ctx)
        except (SerializationError, TypeError) as exc:
            return fail_now(r.job, exc)
        buckets = self.registry.rate_buckets(task, r.job)
        if buckets:
            await wait_for_rate_slots(self._broker, buckets)
        if task.concurrency is None:
            return None
        limit = task.concurrency
        try:
            bound = task.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            bucket = limit.bucket(r.job.task, bound.arguments)
        except Exception as exc:  # a key function that raised
            return fail_now(r.job, exc)
        r.slot = (bucket, limit.max)
        await hold_slot(self._broker, bucket, r.job.id, limit.max, self.lease_s)
        return None

    async def _hooks(self, name: HookName, r: _Running, *args: Any, result: Any = None) -> None:
        job = r.job
        lists = self.registry.hook_lists(self.registry.tasks.get(job.task), name)
        if any(lists):
            view = JobView.of(job, r.ctx, duration_s=r.duration_s, result=result)
            await arun_hooks(lists, name, job.id, job.task, view, *args)

    async def _outcome_hooks(self, r: _Running, outcome: Outcome) -> None:
        """on_success / on_failure / on_retry: after the outcome is decided, before it is
        written (a hook never changes it: a shutdown or a lost lease cuts them short)."""
        job = r.job
        r.finishing = True
        try:
            if isinstance(outcome, Succeeded):
                if any(self.registry.hook_lists(self.registry.tasks.get(job.task), "on_success")):
                    result = self._result_value(job, outcome.result)
                    await self._hooks("on_success", r, result, result=result)
            elif isinstance(outcome, Failed):
                await self._hooks("on_failure", r, outcome.error)
            elif isinstance(outcome, RetryAt):
                delay = max(0.0, outcome.run_at - time.time())
                await self._hooks("on_retry", r, outcome.error, delay)
        except asyncio.CancelledError:
            if not r.interrupted:
                raise
            log.warning(
                "job %s (%s): hooks cut short (%s); its outcome %s stands",
                job.id,
                job.task,
                r.interrupted[-1],
                type(outcome).__name__,
            )

    def _result_value(self, job: Job, result: bytes) -> Any:
        """The result as ``JobHandle.result()`` returns it (execution checked that it
        decodes; should it not, the hooks get it as stored rather than an error)."""
        task = self.registry.tasks.get(job.task)
        try:
            return try_decode(result) if task is None else task.types.result(result)
        except SerializationError:
            return try_decode(result)

    async def _release_slot(self, r: _Running) -> None:
        assert self._broker is not None and r.slot is not None
        try:
            await limit_store(self._broker).release_slot(r.slot[0], r.job.id)
        except Exception as exc:  # it expires after a lease anyway
            log.error("job %s: releasing its concurrency slot failed: %s", r.job.id, exc)

    def _interrupt(self, r: _Running, reason: str) -> None:
        r.interrupted.append(reason)
        r.ctx._cancelled.set()
        # a sync task in a thread cannot be stopped from outside: a cancel is cooperative
        # (current_job().cancelled); shutdown and lost leases stop waiting for it
        stoppable = r.is_async and not r.finishing
        if r.task is not None and (stoppable or reason != Interrupt.CANCEL):
            r.task.cancel()

    # --- maintenance ------------------------------------------------------------------------

    async def _maintenance_loop(self) -> None:
        assert self._broker
        settings = self.client.settings
        interval = settings.effective_recover_interval_s
        next_prune = time.monotonic() + random.uniform(0, settings.prune_interval_s)
        while True:
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))
            try:
                for job_id, state in await self._broker.recover(settings.max_lost_leases):
                    log.warning("job %s: lease expired, recovered to %s", job_id, state.value)
                await sweep(self.client)
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + settings.prune_interval_s
                    cutoff = await self._broker.now() - settings.result_ttl_s
                    while await self._broker.prune(cutoff, 1000) == 1000:
                        await asyncio.sleep(0)
            except Exception as exc:
                log.error("worker %s: maintenance failed: %s", self.id, exc)

    # --- stopping ---------------------------------------------------------------------------

    async def _drain(self) -> None:
        assert self._progressed
        deadline = time.monotonic() + self.drain_timeout_s
        if self._running:
            log.info(
                "worker %s: draining %d running jobs (up to %.0f s)",
                self.id,
                len(self._running),
                self.drain_timeout_s,
            )
        while self._running and not self._stop_now:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._progressed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._progressed.wait()
        leftovers = list(self._running.values())
        for r in leftovers:
            log.warning(
                "job %s (%s): still running at shutdown; handing it back", r.job.id, r.job.task
            )
            self._interrupt(r, Interrupt.SHUTDOWN)
        tasks = [r.task for r in leftovers if r.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def _cancel_and_wait(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel the tasks and wait until they end, cancelling again those still running after
    a second: redis-py can swallow a cancel that lands while a command starts (the task goes
    on to its next await and would run forever; a worker hung on stop, seen in the suite)."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)


__all__ = ["Worker"]
