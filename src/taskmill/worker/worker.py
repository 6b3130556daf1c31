"""The worker: one asyncio loop that claims jobs in batches, runs them, and reports back.

Each claimed job runs in an asyncio task of its own, through the steps of
``execution.Pipeline``; its outcome goes to the ``outbox.Outbox`` until the broker has it.
``Worker`` keeps the table of running jobs, the claim loop and the life cycle, and starts the
other loops, each in a module of its own:

- claim (here): take up to as many due jobs as there are free slots, in one broker call that
  also carries the outcomes waiting to be written; with nothing due, wait for work
  (``idle.py``);
- flush: write outcomes (and coalesced progress) when no claim is coming to carry them
  (``flushing.py``);
- heartbeat: extend every held lease, learn of cancels and lost leases (``leases.py``);
- maintenance: recover expired leases (anyone's), sweep running workflows, prune old finished
  jobs, and now and then ask the broker what needs an operator (``maintenance.py``);
- events (``App(events=True)``): publish the jobs' events in the order they were made.

Opening the broker at start is ``opening.py``; building the parts of a run (and closing them)
``parts.py``; the stop request, the signals and the drain ``stopping.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from taskmill.errors import BrokerError
from taskmill.events import started
from taskmill.job import Failed, Job, Outcome, Released, RetryAt
from taskmill.urls import redact_url
from taskmill.worker.execution import JobRun, Pipeline
from taskmill.worker.flushing import Flusher, advance_workflows
from taskmill.worker.holdings import Holdings, take_over
from taskmill.worker.idle import IdleWait, first_of
from taskmill.worker.leases import LeaseKeeper
from taskmill.worker.maintenance import BrokerWarnings, maintain, watch_epoch
from taskmill.worker.names import worker_id
from taskmill.worker.opening import open_broker
from taskmill.worker.outbox import Outbox, Publisher
from taskmill.worker.parts import Parts
from taskmill.worker.reserve import HELD_PER_SLOT, Reserve
from taskmill.worker.runners import PoolKind
from taskmill.worker.stopping import (
    LastWrites,
    Stop,
    cancel_and_wait,
    drain,
    install_signal_handlers,
)

if TYPE_CHECKING:
    from taskmill.client import AppParts
    from taskmill.worker.metrics import WorkerMetrics

log = logging.getLogger("taskmill.worker")

_CLAIM_RETRY_FIRST_S = 0.05
_CLAIM_RETRY_CAP_S = 5.0


class Worker:
    """Runs the jobs of ``app`` (an ``App``, or anything with its ``registry`` and
    ``client``). ``taskmill worker`` builds one per process; tests may run one in-process
    (``await worker.run()`` and ``worker.stop()`` from any thread). With ``scheduler`` (the
    default) it also enqueues the app's periodic schedules' ticks.

    ``name`` is kept in the worker's id (``name@host-pid-random``, see
    ``taskmill.worker.names``). A broker that cannot be reached at start
    (``BrokerUnavailableError``) is retried, logged at WARNING each time, after 0.5 s doubling
    up to 30 s, for ever or until ``max_start_wait_s``; any other error at start is raised
    (``taskmill.worker.opening``).
    ``on_heartbeat`` is called on the worker's loop after each heartbeat the broker took.
    ``metrics`` counts its jobs (``taskmill.worker.metrics``; ``--metrics-port``).
    ``lease_s`` replaces the app's ``lease_s`` for this worker's claims (``taskmill worker
    --lease``); its heartbeat and recovery intervals follow it unless the app sets them
    (``Settings.with_lease``: ``ConfigurationError`` if the settings refuse it).
    ``holdings_path``: the file where it keeps the jobs it holds, and where it first finds
    those of the process it replaces (``taskmill.worker.holdings``; the supervisor's).
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
        holdings_path: str | None = None,
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
        self.holdings_path = holdings_path
        self._holdings: Holdings | None = None  # made once the broker is open
        # set once the broker is open: before it, run() only retries reaching the broker
        self.connected = asyncio.Event()
        self.started_at = time.time()
        self.jobs_done = 0
        self.processed = self.failed = 0  # runs with an outcome written, those that raised
        self.broker_came_back_empty = 0
        """Times this worker found the broker's epoch marker gone: it lost its data."""
        self.lease_s = settings.lease_s
        self.heartbeat_s = settings.effective_heartbeat_s
        self._running: dict[str, JobRun] = {}
        self._reserve = Reserve(concurrency)  # claims beyond the slots for jobs that cannot run
        self._stop = Stop(wake=self._wake_for_stop)  # run() tells it the loop to wake
        self._progressed = asyncio.Event()  # a job ended, or outcomes were written
        self._flush_wake = asyncio.Event()  # the outbox has something to write
        self._fatal: BrokerError | None = None  # a permanent broker error: run() raises it
        self._last_writes = LastWrites(self.id)  # after the drain: one deadline for them all
        self._warnings = BrokerWarnings(self.id)
        self._parts: Parts | None = None  # built by run(), once the broker is open
        # the parts the claim loop and each job use, once built
        self._pipeline: Pipeline
        self._outbox: Outbox
        self._flusher: Flusher
        self._publisher: Publisher | None = None  # events on: the jobs' events

    @property
    def last_heartbeat_ok(self) -> float | None:
        """``time.monotonic()`` when the last heartbeat the broker took came back."""
        return None if self._parts is None else self._parts.leases.last_ok

    @property
    def out_of_contact(self) -> bool:
        """No heartbeat taken for longer than the lease: the jobs it held are marked lost and
        it claims none until one is taken (``taskmill.worker.leases``)."""
        return self._parts is not None and self._parts.leases.out_of_contact

    @property
    def broker_warnings(self) -> dict[str, str]:
        """The broker's ``health_warnings`` when last asked: for an operator (the health
        endpoint shows them), not a reason to stop."""
        return self._warnings.current

    @property
    def waiting_for_work(self) -> bool:
        """Its last claim found nothing due: it waits for a wake-up (``Broker.wait``)."""
        return self._parts is not None and self._parts.idle.waiting

    # --- control (thread-safe) ----------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming; running jobs get ``drain_timeout_s`` to finish. Call again to stop
        at once (running jobs are handed back without spending an attempt)."""
        self._stop.request()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: the first drains (see ``stop``), the second stops at once.
        Call from inside ``run``'s loop, before or while it runs (the CLI does)."""
        install_signal_handlers(self._stop, worker_id=self.id)

    def _wake_for_stop(self) -> None:  # on the worker's loop (Stop.request)
        self._stop.set()
        self._progressed.set()
        if self._parts is not None:
            self._parts.idle.cancel()

    # --- life cycle -----------------------------------------------------------------------------

    async def run(self, *, until_idle: bool = False) -> int:
        """Run until stopped (or, with ``until_idle``, until nothing is due or running).
        Returns how many jobs this worker finished."""
        self._stop.loop = asyncio.get_running_loop()
        if self._stop.requested:
            self._stop.set()
        broker = await open_broker(
            self.client, self._stop, max_wait_s=self.max_start_wait_s, worker_id=self.id
        )
        if broker is None:
            return 0  # stopped while the broker was unreachable
        self.connected.set()
        await broker.attach()
        if self.holdings_path is not None:
            try:
                self._holdings = await take_over(  # the reserve: up to 3 x the slots
                    broker, self.holdings_path, HELD_PER_SLOT * self.concurrency, worker_id=self.id
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    await broker.detach()  # its connections on this loop: closed, not leaked
                raise
        parts = self._parts = Parts(
            self,
            broker,
            running=self._running,
            finished=self._finished,
            start=self._start,
            wake=self._flush_wake,
            progressed=self._progressed,
            stop=self._stop,
        )
        self._pipeline, self._outbox, self._flusher = parts.pipeline, parts.outbox, parts.flusher
        self._publisher = parts.publisher
        background = self._start_loops(until_idle, parts)
        try:  # from here every way out closes the parts (and detaches from the broker)
            if self.register:
                await parts.leases.beat()
                log.info(
                    "worker %s started: queues=%s concurrency=%d pool=%s broker=%s",
                    self.id,
                    ",".join(self.queues),
                    self.concurrency,
                    self.pool,
                    redact_url(self.client.url),
                )
            await self._claim_loop(until_idle, parts.leases, parts.idle)
            parts.pipeline.close_slots()  # jobs in reserve go back, unstarted
            await drain(
                self._running,
                self._progressed,
                self._stop,
                timeout_s=self.drain_timeout_s,
                worker_id=self.id,
            )
            self._last_writes.start()
            await self._last_writes.bounded(self._flusher.flush_all(), "writing the last outcomes")
        finally:
            await self._close(background, parts)
        if self._fatal is not None:
            raise self._fatal
        return self.jobs_done

    def _start_loops(self, until_idle: bool, parts: Parts) -> list[asyncio.Task[Any]]:
        loops = [
            asyncio.create_task(parts.flusher.run(), name="taskmill-flush"),
            asyncio.create_task(parts.leases.run(), name="taskmill-heartbeat"),
        ]
        if parts.publisher is not None:
            loops.append(asyncio.create_task(parts.publisher.run(), name="taskmill-events"))
        if self.metrics is not None:
            self.client.enqueue_observers.append(self.metrics.counts.enqueued)
            loops.append(asyncio.create_task(self.metrics.run(), name="taskmill-metrics"))
        if not until_idle:
            upkeep = maintain(parts.broker, self.client, self.settings, self._warnings)
            loops.append(asyncio.create_task(upkeep, name="taskmill-maint"))
            epoch = watch_epoch(parts.broker, self.id, self._came_back_empty)
            loops.append(asyncio.create_task(epoch, name="taskmill-epoch"))
            if self.scheduler and self.registry.schedules:
                from taskmill.scheduler import Scheduler

                schedules = Scheduler(self.app).run(self._stop.event)
                loops.append(asyncio.create_task(schedules, name="taskmill-scheduler"))
        return loops

    def _came_back_empty(self) -> None:
        self.broker_came_back_empty += 1
        if self.metrics is not None:
            self.metrics.counts.broker_came_back_empty()

    async def _close(self, background: list[asyncio.Task[Any]], parts: Parts) -> None:
        await cancel_and_wait(background)
        await parts.close(self._last_writes)
        if self._holdings is not None:
            self._holdings.close()  # a stop hands back or finishes all it held
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
        self._stop.at_once()

    # --- claiming -------------------------------------------------------------------------------

    async def _claim_loop(self, until_idle: bool, leases: LeaseKeeper, idle: IdleWait) -> None:
        backoff = _CLAIM_RETRY_FIRST_S
        while not self._stop.is_set():
            free = await self._free_slots(leases)
            if not free:
                continue
            # until_idle: a claim that finds nothing ends the run only if nothing could have
            # released work behind its back (a job running, a flush advancing a workflow);
            # progress made during the claim wakes the wait after it (the only one on it)
            quiet = not self._running and not self._outbox.writing
            self._progressed.clear()
            # no more held in all than the table of held jobs has room for
            want = min(
                free + self._reserve.extra(free),
                HELD_PER_SLOT * self.concurrency - len(self._running),
            )
            try:
                jobs, advanced = await self._finish_and_claim(want)
            except Exception as exc:
                if not await self._claim_failed(exc, backoff):
                    return
                backoff = min(backoff * 2, _CLAIM_RETRY_CAP_S)
                continue
            backoff = _CLAIM_RETRY_FIRST_S
            for job in jobs:
                self._start(job)
            if len(jobs) >= want or advanced:  # advanced: steps may have been released
                continue
            if not until_idle:
                if not jobs:
                    await idle.wait()
            elif not jobs and quiet and not self._running and self._outbox.settled:
                return
            else:
                await idle.wait(self._progressed)

    async def _free_slots(self, leases: LeaseKeeper) -> int:
        """How many jobs to claim: the free slots, and the standing reserve's free places
        (``reserve.py``); 0 after waiting for one, or for contact (out of contact, the leases
        are in doubt: no claim, see ``leases.py``)."""
        free = self.concurrency + self._reserve.standing(time.monotonic()) - len(self._running)
        if free <= 0:
            await self._wait_for_a_slot()
            return 0
        if not leases.in_contact.is_set():
            await self._wait_for_contact(leases)
            return 0
        return free

    async def _wait_for_contact(self, leases: LeaseKeeper) -> None:
        self._flusher.wake_if_pending()  # no claim will carry them meanwhile
        await first_of(leases.in_contact, self._stop.event)

    async def _wait_for_a_slot(self) -> None:
        self._progressed.clear()
        await self._progressed.wait()
        if len(self._running) > self.concurrency * 3 // 4:
            await asyncio.sleep(0)  # let completions that are ready land: bigger batches

    async def _finish_and_claim(self, free: int) -> tuple[list[Job], bool]:
        """Claim up to ``free`` jobs; the outcomes waiting ride along (one transaction).
        The jobs, and whether a workflow advanced (steps it released may be due)."""
        batch, jobs = await self._outbox.finish_and_claim(self.queues, free, self.lease_s)
        return jobs, await advance_workflows(self.client, batch)

    async def _claim_failed(self, exc: Exception, backoff: float) -> bool:
        """Wait ``backoff`` before the next claim; False if no retry can fix the error."""
        if isinstance(exc, BrokerError) and exc.permanent:
            self._stop_for_good(exc)
            return False
        log.error("worker %s: claim failed, retrying in %.2f s: %s", self.id, backoff, exc)
        await self._stop.sleep(backoff)
        return True

    # --- running ----------------------------------------------------------------------------

    def _start(self, job: Job) -> None:
        run = self._pipeline.begin(job, self._report_progress)
        self._running[job.id] = run
        if self._holdings is not None:
            run.held = self._holdings.hold(run.claim)
            run.ctx._mark_idle = partial(self._holdings.mark, run.held)
        if self.metrics is not None:
            self.metrics.counts.started(job)
        if self._publisher is not None:
            self._publisher.emit(started(job, time.time()))
        run.handle = asyncio.get_running_loop().create_task(self._pipeline.run(run))

    def _finished(self, run: JobRun, outcome: Outcome) -> None:
        """The pipeline's last step: the run's outcome to the outbox (or dropped)."""
        del self._running[run.job.id]
        self.jobs_done += 1
        if self._holdings is not None:
            self._holdings.release(run.held)
        if not run.interrupted and not isinstance(outcome, Released):
            took = None
            if run.ran and run.called_at is not None:  # the clock is read for these alone
                took = time.monotonic() - run.called_at
            self._reserve.finished(ran=run.ran, took_s=took)
        elif isinstance(outcome, Released) and not self._stop.requested:
            self._reserve.handed_back(time.monotonic())  # it waited in reserve too long
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
            # idle or stopping one leaves it to the flusher, and a job handed back from the
            # reserve goes at once (the claim loop waits for a slot: it is for others to take)
            if self.waiting_for_work or self._stop.requested or isinstance(outcome, Released):
                self._flush_wake.set()
        self._progressed.set()

    def _report_progress(self, job_id: str, fraction: float | None, message: str | None) -> None:
        run = self._running.get(job_id)  # from the task's thread
        if run is not None:
            self._outbox.report(run, fraction, message)


__all__ = ["Worker"]
