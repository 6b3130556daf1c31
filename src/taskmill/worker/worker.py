"""The worker: one asyncio loop that claims jobs in batches, runs them, and reports back.

Each claimed job runs in an asyncio task of its own, through the steps of
``execution.Pipeline``; its outcome goes to the ``outbox.Outbox`` until the broker has it.
The worker keeps the loops around them:

- claim: take up to as many due jobs as there are free slots, in one broker call that also
  carries the outcomes waiting to be written;
- flush: write outcomes (and coalesced progress) when no claim is coming to carry them;
- heartbeat: extend every held lease, learn of cancels and lost leases;
- maintenance: recover expired leases (anyone's), sweep running workflows, prune old finished
  jobs;
- events (``App(events=True)``): publish the jobs' events in the order they were made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from taskmill._ids import workflow_of
from taskmill.brokers.base import Broker, HandOver, HeartbeatReply
from taskmill.errors import BrokerError, BrokerUnavailableError
from taskmill.events import started
from taskmill.job import Failed, Job, Outcome, Released, RetryAt, WorkerInfo
from taskmill.retry import Interrupt
from taskmill.urls import redact_url
from taskmill.worker.execution import JobRun, Pipeline
from taskmill.worker.names import worker_id
from taskmill.worker.outbox import Batch, Outbox, Publisher
from taskmill.worker.pools import InlineRunner, Runner, ThreadRunner
from taskmill.workflows import advance, sweep

if TYPE_CHECKING:
    from taskmill.client import AppParts
    from taskmill.worker.metrics import WorkerMetrics

log = logging.getLogger("taskmill.worker")

PoolKind = Literal["async", "thread", "process"]
_START_RETRY_FIRST_S = 0.5
_START_RETRY_CAP_S = 30.0
_CLAIM_RETRY_FIRST_S = 0.05
_CLAIM_RETRY_CAP_S = 5.0
_FLUSH_RETRY_S = 0.5
STOP_WRITES_S = 1.5
"""After the drain, how long the last writes (outcomes, hand-backs, the worker's
unregistering) may take together. A broker that cannot be reached then does not hold the
process for minutes of retries: it exits within the drain timeout + 2 s, and the jobs whose
outcome or hand-back it could not write come back by lease expiry (docs/guarantees.md)."""


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
    ``metrics`` counts its jobs (``taskmill.worker.metrics``; ``--metrics-port``).
    ``lease_s`` replaces the app's ``lease_s`` for this worker's claims (``taskmill worker
    --lease``); its heartbeat and recovery intervals follow it unless the app sets them
    (``Settings.with_lease``: ``ConfigurationError`` if the settings refuse it).
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
        metrics: WorkerMetrics | None = None,
        lease_s: float | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if pool == "process" and app_path is None:
            raise ValueError("pool='process' needs app_path ('module:app') for the children")
        self.app = app  # what the scheduler is given
        self.registry = app.registry
        self.client = app.client
        settings = self.client.settings
        if lease_s is not None:
            settings = settings.with_lease(lease_s)
        self.settings = settings  # the app's, with this worker's lease
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
        self.metrics = metrics
        # set once the broker is open: before it, run() only retries reaching the broker
        self.connected = asyncio.Event()
        self.last_heartbeat_ok: float | None = None  # time.monotonic() of the last one taken
        self.started_at = time.time()
        self.jobs_done = 0
        self.processed = self.failed = 0  # runs with an outcome written, those that raised
        self.lease_s = settings.lease_s
        self.heartbeat_s = settings.effective_heartbeat_s
        self._running: dict[str, JobRun] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # set by run(): stop() calls into it
        self._stop_requested = False
        self._stop_now = False
        self._stop_event = asyncio.Event()
        self._progressed = asyncio.Event()  # a job ended, or outcomes were written
        self._flush_wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()  # one flush at a time (see _flush_all)
        self._idle_task: asyncio.Task[list[Job]] | None = None
        self._events_on = settings.events
        self._fatal: BrokerError | None = None  # a permanent broker error: run() raises it
        self._writes_by: float | None = None  # set by the drain: the last writes' deadline
        # made by run(), once the broker is open
        self._broker: Broker
        self._pipeline: Pipeline
        self._outbox: Outbox
        self._publisher: Publisher | None = None  # events on: the jobs' events

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
        self._stop_event.set()
        self._progressed.set()
        if self._idle_task is not None:
            self._idle_task.cancel()

    # --- life cycle -----------------------------------------------------------------------------

    async def run(self, *, until_idle: bool = False) -> int:
        """Run until stopped (or, with ``until_idle``, until nothing is due or running).
        Returns how many jobs this worker finished."""
        self._loop = asyncio.get_running_loop()
        if self._stop_requested:
            self._stop_event.set()
        broker = await self._open_broker()
        if broker is None:
            return 0  # stopped while the broker was unreachable
        self._broker = broker
        self.connected.set()
        await broker.attach()
        runner = self._make_parts(broker, self._loop)
        background = self._start_loops(until_idle)
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
            await self._bounded(self._flush_all(), "writing the last outcomes")
        finally:
            await self._close(background, runner)
        if self._fatal is not None:
            raise self._fatal
        return self.jobs_done

    async def _open_broker(self) -> Broker | None:
        """The app's broker, opened; one that cannot be reached is retried with back-off
        (``None`` if the worker is stopped meanwhile). Other errors are raised: a read-only
        file or a refused login does not get better by waiting."""
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

            assert self.app_path is not None  # checked in __init__
            return ProcessRunner(
                self.app_path,
                self.concurrency,
                self.max_tasks_per_child,
                self.registry.instrumentations,
            )
        if self.pool == "async":
            return InlineRunner()
        return ThreadRunner(self.concurrency)

    def _make_parts(self, broker: Broker, loop: asyncio.AbstractEventLoop) -> Runner:
        """The pipeline with its runner, the outbox, the publisher (events on)."""

        def later(delay: float, fn: Callable[[], None]) -> None:  # from a task's thread
            loop.call_soon_threadsafe(loop.call_later, delay, fn)

        runner = self._make_runner()
        counts = None if self.metrics is None else self.metrics.counts
        self._pipeline = Pipeline(
            self.registry,
            runner,
            broker,
            worker_id=self.id,
            lease_s=self.lease_s,
            finished=self._finished,
            metrics=counts,
            hook_threads=min(self.concurrency, 32),
        )
        if self._events_on:
            self._publisher = Publisher(broker, worker_id=self.id)
        self._outbox = Outbox(
            broker,
            worker_id=self.id,
            wake=self._flush_wake.set,
            later=later,
            emit=None if self._publisher is None else self._publisher.emit,
            rejected=None if counts is None else counts.rejected,
        )
        return runner

    def _start_loops(self, until_idle: bool) -> list[asyncio.Task[Any]]:
        loops = [
            asyncio.create_task(self._flush_loop(), name="taskmill-flush"),
            asyncio.create_task(self._heartbeat_loop(), name="taskmill-heartbeat"),
        ]
        if self._publisher is not None:
            loops.append(asyncio.create_task(self._publisher.run(), name="taskmill-events"))
        if self.metrics is not None:
            self.client.enqueue_observers.append(self.metrics.counts.enqueued)
            loops.append(asyncio.create_task(self.metrics.run(), name="taskmill-metrics"))
        if not until_idle:
            loops.append(asyncio.create_task(self._maintenance_loop(), name="taskmill-maint"))
            if self.scheduler and self.registry.schedules:
                from taskmill.scheduler import Scheduler

                schedules = Scheduler(self.app).run(self._stop_event)
                loops.append(asyncio.create_task(schedules, name="taskmill-scheduler"))
        return loops

    async def _close(self, background: list[asyncio.Task[Any]], runner: Runner) -> None:
        await _cancel_and_wait(background)
        if self._outbox.pending:  # a flush that failed on the way out: one last try
            with contextlib.suppress(Exception):
                await self._bounded(self._flush_all(), "writing the last outcomes")
        if self._publisher is not None:  # after the last outcomes: their events too
            # what the cancelled publisher had not sent
            await self._bounded(self._publisher.publish(), "publishing the last events")
        # always: it also hands back jobs handed over to this worker that it never took
        with contextlib.suppress(Exception):
            await self._bounded(self._broker.unregister_worker(self.id), "unregistering")
        runner.close()
        self._pipeline.hook_threads.shutdown(wait=False)
        with contextlib.suppress(Exception):
            await self._bounded(self._broker.detach(), "detaching from the broker")
        if self.metrics is not None:
            with contextlib.suppress(ValueError):
                self.client.enqueue_observers.remove(self.metrics.counts.enqueued)
            self.metrics.publish()  # the last counts, for the supervisor to keep
        if self.register:
            log.info("worker %s stopped after %d jobs", self.id, self.jobs_done)

    def _stop_for_good(self, exc: BrokerError) -> None:
        """No retry can fix the error: stop at once (outcomes could not be written either),
        and let run() raise it."""
        log.error("worker %s: stopping: %s", self.id, exc)
        self._fatal = exc
        self._stop_requested = self._stop_now = True
        self._stop_event.set()

    async def _bounded(self, aw: Awaitable[object], what: str) -> None:
        """``aw``, given up (logged) once the drain's last writes are out of time; unbounded
        before the drain has set that time (a worker that failed at start)."""
        if self._writes_by is None:
            await aw
            return
        try:
            async with asyncio.timeout(max(0.0, self._writes_by - time.monotonic())):
                await aw
        except TimeoutError:
            log.warning(
                "worker %s: %s: gave up after the drain (the broker did not answer within"
                " %.1f s); jobs it still held come back when their leases expire",
                self.id,
                what,
                STOP_WRITES_S,
            )

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop_event.wait()

    # --- claiming -------------------------------------------------------------------------------

    async def _claim_loop(self, until_idle: bool) -> None:
        backoff = _CLAIM_RETRY_FIRST_S
        while not self._stop_event.is_set():
            free = self.concurrency - len(self._running)
            if free <= 0:
                await self._wait_for_a_slot()
                continue
            try:
                jobs, advanced = await self._finish_and_claim(free)
            except Exception as exc:
                if not await self._claim_failed(exc, backoff):
                    return
                backoff = min(backoff * 2, _CLAIM_RETRY_CAP_S)
                continue
            backoff = _CLAIM_RETRY_FIRST_S
            for job in jobs:
                self._start(job)
            if len(jobs) >= free or advanced:  # advanced: steps may have been released
                continue
            if not until_idle:
                if not jobs:
                    await self._idle_wait(None)
            elif not jobs and not self._running and self._outbox.settled:
                return
            else:
                self._progressed.clear()
                await self._idle_wait(self._progressed)

    async def _wait_for_a_slot(self) -> None:
        self._progressed.clear()
        await self._progressed.wait()
        if len(self._running) > self.concurrency * 3 // 4:
            await asyncio.sleep(0)  # let completions that are ready land: bigger batches

    async def _finish_and_claim(self, free: int) -> tuple[list[Job], bool]:
        """Claim up to ``free`` jobs; the outcomes waiting ride along (one transaction).
        The jobs, and whether a workflow advanced (steps it released may be due)."""
        outbox = self._outbox
        batch = outbox.take()
        try:
            await outbox.ready(batch)
            applied, jobs = await self._broker.finish_and_claim(
                batch.finishes, self.queues, free, self.id, self.lease_s
            )
        except BaseException as exc:
            outbox.failed(batch, exc)
            raise
        outbox.landed(batch, applied)
        outbox.release(batch)
        return jobs, await self._advance_workflows(batch)

    async def _claim_failed(self, exc: Exception, backoff: float) -> bool:
        """Wait ``backoff`` before the next claim; False if no retry can fix the error."""
        if isinstance(exc, BrokerError) and exc.permanent:
            self._stop_for_good(exc)
            return False
        log.error("worker %s: claim failed, retrying in %.2f s: %s", self.id, backoff, exc)
        await self._sleep_unless_stopped(backoff)
        return True

    async def _idle_wait(self, also: asyncio.Event | None) -> None:
        if self._stop_event.is_set():
            return  # stop() came during the claim: there was no idle task for it to cancel
        # a job handed over while waiting is ours already; only a plain idle wait (no event that
        # could cancel it mid-reply) takes hand-overs, so a cancelled wait loses none
        handover = None if also is not None else HandOver(self.id, self.lease_s)
        idle = self._idle_task = asyncio.create_task(
            self._broker.wait(self.queues, self.idle_poll_s, handover)
        )
        if self._outbox.pending:
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
        if idle.done() and not idle.cancelled():
            await self._woken(idle)

    async def _woken(self, idle: asyncio.Task[list[Job]]) -> None:
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

    # --- running ----------------------------------------------------------------------------

    def _start(self, job: Job) -> None:
        run = self._pipeline.begin(job, self._report_progress)
        self._running[job.id] = run
        if self.metrics is not None:
            self.metrics.counts.started(job)
        if self._publisher is not None:
            self._publisher.emit(started(job, time.time()))
        run.handle = asyncio.get_running_loop().create_task(self._pipeline.run(run))

    def _finished(self, run: JobRun, outcome: Outcome) -> None:
        """The pipeline's last step: the run's outcome to the outbox (or dropped)."""
        del self._running[run.job.id]
        self.jobs_done += 1
        if run.lost:
            self._outbox.drop(run)
            log.warning(
                "job %s (%s): dropped its outcome %s: the lease was lost to another worker",
                run.job.id,
                run.job.task,
                type(outcome).__name__,
            )
        else:
            self._outbox.add(run, outcome)
            if not isinstance(outcome, Released):
                self.processed += 1
                self.failed += isinstance(outcome, Failed | RetryAt)
            # a claim loop about to claim carries the outcome in its transaction; only an
            # idle or stopping one leaves it to the flusher
            if self._idle_task is not None or self._stop_requested:
                self._flush_wake.set()
        self._progressed.set()

    def _report_progress(self, job_id: str, fraction: float | None, message: str | None) -> None:
        run = self._running.get(job_id)  # from the task's thread
        if run is not None:
            self._outbox.report(run, fraction, message)

    # --- flushing -------------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        wake = self._flush_wake
        while True:
            await wake.wait()
            wake.clear()
            async with self._flush_lock:
                await self._flush_once()

    async def _flush_once(self) -> bool:
        """Write progress and outcomes; False if the broker refused (kept for later)."""
        try:
            batch = await self._outbox.flush()
        except Exception:  # logged by the outbox
            await self._sleep_unless_stopped(_FLUSH_RETRY_S)
            self._flush_wake.set()
            return False
        if batch is None:
            return True
        try:  # still on its way meanwhile: run_until_idle must not end before steps it releases
            await self._advance_workflows(batch)
        finally:
            self._outbox.release(batch)
        self._progressed.set()
        return True

    async def _flush_all(self) -> None:
        # the flush loop may be writing a batch that already left the outbox: wait for it to
        # land, or cancelling the loop on the way out drops that batch
        async with self._flush_lock:
            for _ in range(20):
                if not self._outbox.owes:
                    return
                if not await self._flush_once() and self._stop_now:
                    return

    async def _advance_workflows(self, batch: Batch) -> bool:
        """A step of a workflow whose outcome is stored may release the next steps: advance
        its workflow now (the maintenance sweep would, later). True if there was one."""
        workflows = {
            wf for finish in batch.stored if (wf := workflow_of(finish.claim.job_id)) is not None
        }
        for workflow_id in workflows:
            try:
                await advance(self.client, workflow_id)
            except Exception as exc:
                log.error("workflow %s: advancing failed (the sweep retries): %s", workflow_id, exc)
        return bool(workflows)

    # --- heartbeats -----------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self._heartbeat_once()

    async def _heartbeat_once(self) -> None:
        running = [r.claim for r in self._running.values()]
        # the reply names lost jobs by id: by the time it comes, a job lost under the token
        # sent may run here again under a new one (its retry, claimed meanwhile), not lost
        sent_tokens = {c.job_id: c.token for c in running}
        claims = running + self._outbox.claims()
        if not claims and not self.register:
            return  # an unregistered (in-process test) worker has nothing to report
        try:
            reply = await self._broker.heartbeat(self._info(), claims, self.lease_s)
        except Exception as exc:
            log.error("worker %s: heartbeat failed: %s", self.id, exc)
            return
        self.last_heartbeat_ok = time.monotonic()
        if self.on_heartbeat is not None:
            try:
                self.on_heartbeat()
            except Exception:  # an observer's bug must not stop the heartbeats
                log.exception("worker %s: on_heartbeat failed", self.id)
        await self._pipeline.renew_slots(list(self._running.values()))
        self._interrupt_as_told(reply, sent_tokens)

    def _info(self) -> WorkerInfo:
        return WorkerInfo(
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

    def _interrupt_as_told(self, reply: HeartbeatReply, sent_tokens: dict[str, str]) -> None:
        for job_id in reply.lost:
            run = self._running.get(job_id)
            if run is not None and not run.lost and run.claim.token == sent_tokens.get(job_id):
                log.warning("job %s (%s): lease lost; stopping it here", job_id, run.job.task)
                run.lost = True
                run.interrupt(Interrupt.LOST)
        for job_id in reply.cancel_requested:
            run = self._running.get(job_id)
            if run is not None and not run.interrupted:
                log.info("job %s (%s): cancel requested", job_id, run.job.task)
                run.interrupt(Interrupt.CANCEL)

    # --- maintenance ----------------------------------------------------------------------------

    async def _maintenance_loop(self) -> None:
        settings = self.settings
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
                    await self._prune(settings.result_ttl_s)
            except Exception as exc:
                log.error("worker %s: maintenance failed: %s", self.id, exc)

    async def _prune(self, result_ttl_s: float) -> None:
        cutoff = await self._broker.now() - result_ttl_s
        while await self._broker.prune(cutoff, 1000) == 1000:
            await asyncio.sleep(0)

    # --- stopping -------------------------------------------------------------------------------

    async def _drain(self) -> None:
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
        for run in leftovers:
            log.warning(
                "job %s (%s): still running at shutdown; handing it back", run.job.id, run.job.task
            )
            run.interrupt(Interrupt.SHUTDOWN)
        handles = [run.handle for run in leftovers if run.handle is not None]
        if handles:
            await asyncio.gather(*handles, return_exceptions=True)
        self._writes_by = time.monotonic() + STOP_WRITES_S


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
