"""Worker-side Prometheus metrics (``taskmill worker --metrics-port PORT``).

What a worker process counts, by queue and task (never a job id or an argument):

- ``taskmill_worker_jobs_enqueued_total``: jobs this process stored through the app's
  enqueue pipeline (tasks sending tasks, periodic ticks, workflow steps);
- ``taskmill_worker_jobs_started_total`` and ``taskmill_worker_jobs_finished_total`` (with
  ``outcome``: succeeded, failed, retried, cancelled, released, lost);
- ``taskmill_worker_job_run_seconds`` and ``taskmill_worker_job_queue_wait_seconds``:
  histograms of the run time and of the wait between the job's due time and its start;
- ``taskmill_worker_outcomes_rejected_total``: outcomes the broker refused (a stale lease);
- ``taskmill_worker_broker_came_back_empty_total``: times a worker found the broker's epoch
  marker gone or changed (``Broker.epoch``): the broker lost its data.

**Cost.** The counts live in plain dicts of one ``JobMetrics`` per worker, updated on the
worker's event loop thread where the outcome is decided (``execution.Pipeline.run``) and where
the job starts: a few dict operations and a ``bisect`` per job, no lock, no I/O. Only
enqueues, which any thread may make (``send()`` from a task running in a thread), take a lock,
once per enqueue call. Every ``PUBLISH_INTERVAL_S`` the worker copies the counts into an
immutable ``Totals`` and hands it to its sink: that copy is what a scrape reads.

**One endpoint for ``-p N``.** A supervised worker process writes its ``Totals`` as a JSON file
named by its pid into a directory the supervisor made (``MetricsDir``), replacing it atomically
each time. The supervisor serves the sum of every file. When a child exits, the supervisor
folds its last file into the totals of the processes gone and deletes it: a restarted child
starts from zero beside them, so nothing is counted twice, and the survivors' counts are not
touched. A child killed outright loses what it counted since its last file (at most
``PUBLISH_INTERVAL_S``); one that stops normally writes its file last thing.

Serving needs ``prometheus-client`` (the ``metrics`` extra); counting does not.

>>> from taskmill.job import Job, JobState, Succeeded
>>> m = JobMetrics()
>>> job = Job("1", "app.add", "default", JobState.RUNNING, b"[]", run_at=10.0, started_at=10.5)
>>> m.started(job)
>>> m.finished(job, Succeeded(b"3"), 0.002, lost=False)
>>> totals = m.totals()
>>> totals.counters[("taskmill_worker_jobs_finished", ("default", "app.add", "succeeded"))]
1.0
>>> totals.histograms[("taskmill_worker_job_queue_wait_seconds", ("default", "app.add"))][-1]
0.5
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from taskmill.errors import ConfigurationError
from taskmill.job import Cancelled, Failed, Job, NewJob, Outcome, Released, RetryAt, Succeeded

if TYPE_CHECKING:
    from prometheus_client.registry import Collector, CollectorRegistry

    from taskmill.brokers.base import EnqueueResult

log = logging.getLogger("taskmill.worker")

PUBLISH_INTERVAL_S = 1.0
"""How often a worker copies its counts for scrapes (and, supervised, writes its file)."""

BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip
"""The upper bounds of both histograms' buckets, in seconds (and ``+Inf``)."""

OUTCOMES: dict[type[Outcome], str] = {
    Succeeded: "succeeded",
    Failed: "failed",
    RetryAt: "retried",
    Cancelled: "cancelled",
    Released: "released",
}
"""The ``outcome`` label of each outcome; a run whose lease was lost is ``lost``."""

ENQUEUED = "taskmill_worker_jobs_enqueued"
STARTED = "taskmill_worker_jobs_started"
FINISHED = "taskmill_worker_jobs_finished"
REJECTED = "taskmill_worker_outcomes_rejected"
EMPTIED = "taskmill_worker_broker_came_back_empty"
RUN = "taskmill_worker_job_run_seconds"
WAIT = "taskmill_worker_job_queue_wait_seconds"

COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    ENQUEUED: ("Jobs stored by the enqueue pipeline of the worker processes.", ("queue", "task")),
    STARTED: ("Jobs the worker processes started.", ("queue", "task")),
    FINISHED: ("Runs that ended, by outcome.", ("queue", "task", "outcome")),
    REJECTED: ("Outcomes the broker refused: the lease was stale (the job was recovered).", ()),
    EMPTIED: ("Times the broker's epoch marker was found gone: it lost its data.", ()),
}  # fmt: skip
"""Each counter's help text and label names (exposed with the ``_total`` suffix)."""

HISTOGRAMS: dict[str, tuple[str, tuple[str, ...]]] = {
    RUN: ("Run time of a job, from its call to its outcome, in seconds.", ("queue", "task")),
    WAIT: ("Time between a job's due time and its start, in seconds.", ("queue", "task")),
}
"""Each histogram's help text and label names."""

Key = tuple[str, tuple[str, ...]]
"""A series: the metric's name and its label values."""


class Totals(msgspec.Struct, frozen=True):
    """Counts at one moment: counters by series, and histograms by series as the count in
    each bucket of ``BUCKETS_S`` (not cumulative), the ``+Inf`` one, then the sum."""

    counters: dict[Key, float] = msgspec.field(default_factory=dict)
    histograms: dict[Key, list[float]] = msgspec.field(default_factory=dict)


class _Wire(msgspec.Struct):
    """``Totals`` as JSON (JSON keys are strings): lists of [name, labels, value]."""

    counters: list[tuple[str, list[str], float]]
    histograms: list[tuple[str, list[str], list[float]]]


def dump_totals(totals: Totals) -> bytes:
    wire = _Wire(
        [(name, list(labels), v) for (name, labels), v in totals.counters.items()],
        [(name, list(labels), h) for (name, labels), h in totals.histograms.items()],
    )
    return msgspec.json.encode(wire)


def load_totals(data: bytes) -> Totals:
    wire = msgspec.json.decode(data, type=_Wire)
    return Totals(
        {(name, tuple(labels)): v for name, labels, v in wire.counters},
        {(name, tuple(labels)): h for name, labels, h in wire.histograms},
    )


def add_totals(parts: Iterable[Totals]) -> Totals:
    """The sum of several processes' counts."""
    counters: dict[Key, float] = {}
    histograms: dict[Key, list[float]] = {}
    for part in parts:
        for key, value in part.counters.items():
            counters[key] = counters.get(key, 0.0) + value
        for key, h in part.histograms.items():
            mine = histograms.get(key)
            if mine is None:
                histograms[key] = list(h)
            else:
                for i, v in enumerate(h):
                    mine[i] += v
    return Totals(counters, histograms)


_SLOTS = len(BUCKETS_S) + 2  # a histogram: the count of each bucket, of +Inf, then the sum


class _Series:
    """The counts of one (queue, task) in one worker: one lookup per start or outcome."""

    __slots__ = ("outcomes", "run", "started", "wait")

    def __init__(self) -> None:
        self.started = 0
        self.outcomes: dict[str, int] = {}
        self.run = [0.0] * _SLOTS
        self.wait = [0.0] * _SLOTS


class JobMetrics:
    """One worker's counts (see the module's docstring). ``started`` and ``finished`` are
    called on the worker's loop thread; ``enqueued`` from any thread."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str], _Series] = {}
        self._rejected = 0
        self._emptied = 0
        self._enqueue_lock = threading.Lock()
        self._enqueued: dict[tuple[str, str], int] = {}

    def _new(self, job: Job) -> _Series:
        series = self._series[(job.queue, job.task)] = _Series()
        return series

    def started(self, job: Job) -> None:
        s = self._series.get((job.queue, job.task)) or self._new(job)
        s.started += 1
        at = job.started_at
        if at is not None:  # both on the broker's clock
            wait = at - job.run_at
            if wait < 0.0:
                wait = 0.0
            h = s.wait
            h[bisect_left(BUCKETS_S, wait)] += 1
            h[-1] += wait

    def finished(self, job: Job, outcome: Outcome, run_s: float, *, lost: bool) -> None:
        s = self._series.get((job.queue, job.task)) or self._new(job)
        kind = "lost" if lost else OUTCOMES[type(outcome)]
        counts = s.outcomes
        counts[kind] = counts.get(kind, 0) + 1
        h = s.run
        h[bisect_left(BUCKETS_S, run_s)] += 1
        h[-1] += run_s

    def rejected(self, n: int) -> None:
        self._rejected += n

    def broker_came_back_empty(self) -> None:
        self._emptied += 1

    def enqueued(self, jobs: Sequence[NewJob], result: EnqueueResult) -> None:
        """A ``Client`` enqueue observer: count the jobs the broker stored."""
        existing = result.existing
        with self._enqueue_lock:
            counts = self._enqueued
            for i, job in enumerate(jobs):
                if i not in existing:
                    key = (job.queue, job.task)
                    counts[key] = counts.get(key, 0) + 1

    def totals(self) -> Totals:
        """A copy of the counts (call it on the worker's loop thread)."""
        with self._enqueue_lock:
            counters: dict[Key, float] = {
                (ENQUEUED, labels): float(n) for labels, n in self._enqueued.items()
            }
        histograms: dict[Key, list[float]] = {}
        for labels, s in self._series.items():
            if s.started:
                counters[(STARTED, labels)] = float(s.started)
                histograms[(WAIT, labels)] = list(s.wait)
            if s.outcomes:
                histograms[(RUN, labels)] = list(s.run)
            for kind, n in s.outcomes.items():
                counters[(FINISHED, (*labels, kind))] = float(n)
        counters[(REJECTED, ())] = float(self._rejected)  # 0 too: a series to alert on
        counters[(EMPTIED, ())] = float(self._emptied)
        return Totals(counters, histograms)


# --- where a worker's totals go -----------------------------------------------------------------


class Sink:
    """Takes a worker's totals every ``PUBLISH_INTERVAL_S`` and when it stops."""

    def publish(self, totals: Totals) -> None:
        raise NotImplementedError


@dataclass(eq=False)
class LatestTotals(Sink):
    """One worker process serving its own endpoint: the latest totals, read by scrapes."""

    latest: Totals = field(default_factory=Totals)

    def publish(self, totals: Totals) -> None:
        self.latest = totals  # one reference swap: a scrape reads the old or the new copy


@dataclass(eq=False)
class FileSink(Sink):
    """A supervised worker process: its totals in ``<dir>/<pid>.json``, replaced atomically."""

    directory: Path
    pid: int = field(default_factory=os.getpid)

    def publish(self, totals: Totals) -> None:
        path = self.directory / f"{self.pid}.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_bytes(dump_totals(totals))
            tmp.replace(path)
        except OSError as exc:  # the supervisor is gone with its directory: nothing to serve
            log.debug("metrics: cannot write %s: %s", path, exc)


@dataclass(eq=False)
class WorkerMetrics:
    """What a ``Worker`` is given to count its jobs: the counts, and where to publish them
    every ``interval_s`` (and once more when it stops)."""

    counts: JobMetrics
    sink: Sink
    interval_s: float = PUBLISH_INTERVAL_S

    def publish(self) -> None:
        self.sink.publish(self.counts.totals())

    async def run(self) -> None:
        """Publish every ``interval_s``, until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            self.publish()


# --- the supervisor's directory of totals -------------------------------------------------------


class MetricsDir:
    """The directory where each worker process of a supervisor writes its totals: made by
    ``create``, served summed by ``totals``, ``retire(pid)`` when a child exits, removed by
    ``close``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()  # scrapes (the server's thread) and retire (the loop's)
        self._retired = Totals()

    @classmethod
    def create(cls) -> MetricsDir:
        return cls(Path(tempfile.mkdtemp(prefix="taskmill-metrics-")))

    def retire(self, pid: int) -> None:
        """A child exited: fold its last totals into those of the processes gone."""
        path = self.path / f"{pid}.json"
        with self._lock:
            last = _read(path)
            if last is not None:
                self._retired = add_totals([self._retired, last])
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            with contextlib.suppress(FileNotFoundError):
                path.with_suffix(".tmp").unlink()

    def totals(self) -> Totals:
        with self._lock:
            live = [t for p in sorted(self.path.glob("*.json")) if (t := _read(p)) is not None]
            return add_totals([self._retired, *live])

    def close(self) -> None:
        for p in self.path.iterdir():
            with contextlib.suppress(OSError):
                p.unlink()
        with contextlib.suppress(OSError):
            self.path.rmdir()


def _read(path: Path) -> Totals | None:
    try:
        return load_totals(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as exc:  # not ours: say so, serve the rest
        log.warning("metrics: ignoring %s: %s", path, exc)
        return None


# --- serving -------------------------------------------------------------------------------------


def collector(source: Callable[[], Totals]) -> Collector:
    """A prometheus-client collector of the totals ``source`` returns at each scrape."""
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    class TotalsCollector:
        def collect(self) -> Iterable[Any]:
            totals = source()
            for name, (text, labels) in COUNTERS.items():
                family = CounterMetricFamily(name, text, labels=labels)
                for (series, values), value in sorted(totals.counters.items()):
                    if series == name:
                        family.add_metric(list(values), value)
                yield family
            for name, (text, labels) in HISTOGRAMS.items():
                hist = HistogramMetricFamily(name, text, labels=labels)
                for (series, values), h in sorted(totals.histograms.items()):
                    if series == name:
                        hist.add_metric(list(values), _cumulative(h), sum_value=h[-1])
                yield hist

    return TotalsCollector()


def _cumulative(h: list[float]) -> list[tuple[str, float]]:
    buckets, running = [], 0.0
    for bound, count in zip((*map(repr, BUCKETS_S), "+Inf"), h[:-1], strict=True):
        running += count
        buckets.append((bound, running))
    return buckets


def registry_of(source: Callable[[], Totals]) -> CollectorRegistry:
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        raise ConfigurationError(
            "--metrics-port needs prometheus-client: pip install 'taskmill[metrics]'"
        ) from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector(source))
    return registry


class MetricsServer:
    """``/metrics`` (any path, in fact) on ``host:port`` from a daemon thread (port 0: any free
    port; see ``port``); ``close()`` stops it."""

    def __init__(self, host: str, port: int, source: Callable[[], Totals]) -> None:
        registry = registry_of(source)  # first: it says what to install if it is missing
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(port, host, registry)
        except OSError as exc:
            raise ConfigurationError(
                f"--metrics-port: cannot listen on {host}:{port}: {exc}"
            ) from None
        self.host = host
        self.port: int = self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10.0)


__all__ = [
    "BUCKETS_S",
    "OUTCOMES",
    "PUBLISH_INTERVAL_S",
    "FileSink",
    "JobMetrics",
    "LatestTotals",
    "MetricsDir",
    "MetricsServer",
    "Sink",
    "Totals",
    "WorkerMetrics",
    "add_totals",
    "collector",
    "dump_totals",
    "load_totals",
]
