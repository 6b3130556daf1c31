"""Running worker processes: one worker in this process (``taskmill worker``), or a supervisor
of pools of them (``-p N``, ``--pool-spec``), with the liveness endpoint and the heartbeat pipe
a supervised child uses. The CLI parses options and calls these; nothing here knows click."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, cast

from taskmill.errors import BrokerError, ConfigurationError, TaskmillError
from taskmill.settings import MISSED_HEARTBEATS
from taskmill.worker.health import HealthServer, Status, heartbeat_status
from taskmill.worker.metrics import (
    FileSink,
    JobMetrics,
    LatestTotals,
    MetricsDir,
    MetricsServer,
    WorkerMetrics,
)
from taskmill.worker.runners import PoolKind
from taskmill.worker.supervisor import NO_RESTART_EXIT_CODE, Pool, Supervisor
from taskmill.worker.worker import Worker

if TYPE_CHECKING:
    from taskmill.client import AppParts
    from taskmill.worker.metrics import Totals

log = logging.getLogger("taskmill.worker")

# --- pools under one supervisor -----------------------------------------------------------------


@dataclass(frozen=True)
class PoolSpec:
    """One ``--pool-spec``: worker processes taking jobs from ``queues``."""

    queues: list[str]
    processes: int
    concurrency: int

    @property
    def label(self) -> str:
        return ",".join(self.queues)

    @classmethod
    def parse(cls, value: str, default_concurrency: int) -> PoolSpec:
        """``render:2`` or ``preview,default:4:8``; ``ValueError`` with a precise message."""
        parts = value.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"{value!r}: {_POOL_SPEC_SHAPE}")
        queues = list(dict.fromkeys(q.strip() for q in parts[0].split(",") if q.strip()))
        if not queues:
            raise ValueError(f"{value!r}: name at least one queue before the first ':'")
        processes = _whole_number(value, "PROCESSES", parts[1])
        concurrency = default_concurrency
        if len(parts) == 3:
            concurrency = _whole_number(value, "CONCURRENCY", parts[2])
        return cls(queues, processes, concurrency)


_POOL_SPEC_SHAPE = "expected QUEUES:PROCESSES[:CONCURRENCY], e.g. render:2 or preview,default:4:8"


def _whole_number(value: str, what: str, text: str) -> int:
    try:
        number = int(text.strip())
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{value!r}: {what} must be a whole number >= 1, not {text!r}")
    return number


FORK_KEEP_S = 60.0
"""How long after a death a pool keeps forking its restarts (then its fork server stops)."""


def supervise(
    app: AppParts,
    app_path: str,
    specs: list[PoolSpec],
    common: list[str],
    health_host: str,
    health_port: int | None,
    metrics: tuple[str, int] | None = None,
    lease_s: float | None = None,
    fork_restarts: bool = True,
) -> int:
    """Run the pools of ``specs`` under a supervisor until stopped; its exit code. With
    ``metrics`` (host, port), one endpoint serves the counts of every worker process, which
    each writes to a directory made here (``taskmill.worker.metrics``). ``lease_s``: the
    children's (``common`` passes it to them), which their heartbeat intervals follow.
    ``fork_restarts``: after a child died of its work, fork its pool's next children from a
    fork server (``taskmill.worker.forkserver``; Linux)."""
    metrics_dir = None if metrics is None else MetricsDir.create()
    if metrics_dir is not None:
        common = [*common, METRICS_DIR_OPTION, str(metrics_dir.path)]
        log.info("metrics: the worker processes write their counts to %s", metrics_dir.path)
    pools: list[Pool] = []
    for spec in specs:
        argv = [
            sys.executable, "-m", "taskmill", "worker", app_path,
            "-q", ",".join(spec.queues), "-c", str(spec.concurrency), "-p", "1", *common,
        ]  # fmt: skip
        pools.append(Pool(argv, spec.processes, spec.label))
        if len(specs) > 1:
            log.info(
                "pool %s: %d processes, concurrency %d each",
                spec.label,
                spec.processes,
                spec.concurrency,
            )
    settings = app.client.settings
    if lease_s is not None:
        settings = settings.with_lease(lease_s)
    supervisor = Supervisor(
        pools,
        heartbeat_max_age_s=settings.lost_after_s,
        on_exit=None if metrics_dir is None else metrics_dir.retire,
        fork_keep_s=FORK_KEEP_S if fork_restarts else 0.0,
    )
    servers: list[HealthServer | MetricsServer] = []
    try:
        if health_port is not None:
            servers.append(serve_health(health_host, health_port, supervisor.health))
        if metrics is not None and metrics_dir is not None:
            servers.append(serve_metrics(*metrics, metrics_dir.totals))
        return supervisor.run()
    finally:
        for server in servers:
            server.close()
        if metrics_dir is not None:
            metrics_dir.close()


METRICS_DIR_OPTION = "--metrics-dir"
"""The hidden option that tells a supervised worker process where to write its counts."""


def serve_metrics(host: str, port: int, source: Callable[[], Totals]) -> MetricsServer:
    server = MetricsServer(host, port, source)
    log.info("metrics endpoint on http://%s:%d/metrics", host, server.port)
    return server


def worker_metrics(
    metrics: tuple[str, int] | None, metrics_dir: str | None
) -> tuple[WorkerMetrics | None, MetricsServer | None]:
    """A worker process's metrics: written for its supervisor (``metrics_dir``), or served by
    itself on ``metrics`` (host, port)."""
    if metrics_dir is not None:
        return WorkerMetrics(JobMetrics(), FileSink(Path(metrics_dir))), None
    if metrics is None:
        return None, None
    latest = LatestTotals()
    server = serve_metrics(*metrics, lambda: latest.latest)
    return WorkerMetrics(JobMetrics(), latest), server


def serve_health(host: str, port: int, status: Callable[[], Status]) -> HealthServer:
    try:
        server = HealthServer(host, port, status).start()
    except OSError as exc:
        raise ConfigurationError(f"--health-port: cannot listen on {host}:{port}: {exc}") from None
    log.info("liveness endpoint on http://%s:%d/", host, server.port)
    return server


CLOSE_S = 1.0
"""How long a worker process waits for its broker connections to close at exit."""


def run_worker_process(
    app: AppParts,
    *,
    app_path: str,
    queues: list[str],
    concurrency: int,
    pool: str,
    max_tasks_per_child: int | None,
    drain_timeout_s: float,
    parent_pid: int | None,
    scheduler: bool = True,
    name: str | None = None,
    max_start_wait_s: float | None = None,
    heartbeat_fd: int | None = None,
    holdings_path: str | None = None,
    health: tuple[str, int] | None = None,
    metrics: tuple[str, int] | None = None,
    metrics_dir: str | None = None,
    lease_s: float | None = None,
) -> int:
    """One worker in this process, until a signal stops it (or its supervisor goes away).
    Returns the process's exit code: 0 after a stop, ``NO_RESTART_EXIT_CODE`` when it stopped
    on an error no restart fixes, 1 for any other error (logged). ``metrics``: serve its
    counts on (host, port); ``metrics_dir``: write them there for its supervisor.
    ``lease_s``: the worker's lease instead of the app's (``--lease``). ``holdings_path``:
    the file of the jobs it holds, for the supervisor's next process of its slot
    (``taskmill.worker.holdings``)."""
    counts, metrics_server = worker_metrics(metrics, metrics_dir)

    w = Worker(
        app,
        queues=queues,
        concurrency=concurrency,
        pool=cast("PoolKind", pool),  # click.Choice checked it
        app_path=app_path,
        max_tasks_per_child=max_tasks_per_child,
        drain_timeout_s=drain_timeout_s,
        scheduler=scheduler,
        name=name,
        max_start_wait_s=max_start_wait_s,
        on_heartbeat=None if heartbeat_fd is None else beat_to(heartbeat_fd),
        metrics=counts,
        lease_s=lease_s,
        holdings_path=holdings_path,
    )
    server = None if health is None else serve_health(*health, worker_health(w))

    async def main() -> None:
        w.install_signal_handlers()
        watch = None
        if parent_pid is not None:
            loop = asyncio.get_running_loop()
            loop.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            watch = asyncio.create_task(watch_parent(w, parent_pid))
        try:
            await w.run()
        except BaseException as exc:
            await _close_or_exit(app, w, watch, exc)
            raise
        await _close_or_exit(app, w, watch, None)

    try:
        asyncio.run(main())
    except Exception as exc:
        # logged, not printed bare: under a supervisor these lines join the others' log lines.
        # Only an unreachable broker is retried at start, so anything else that stopped the
        # start is for good: exit 3, which the supervisor does not restart
        what = "stopped" if w.connected.is_set() else "cannot start"
        if isinstance(exc, TaskmillError):
            log.error("worker %s %s: %s", w.id, what, exc)
        else:  # not one of ours (a bug, or an error a broker let through): the traceback
            log.exception("worker %s %s: %s: %s", w.id, what, type(exc).__name__, exc)
        return _error_code(w, exc)
    finally:
        if server is not None:
            server.close()
        if metrics_server is not None:
            metrics_server.close()
    stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if stuck:
        # a sync task that ignores its deadline keeps its pool thread alive, and Python would
        # wait for it at exit; the job was handed back already, so leave without it
        log.warning(
            "exiting with %d task thread(s) still running: %s",
            len(stuck),
            ", ".join(t.name for t in stuck),
        )
        _exit_now(0)
    return 0


async def _close_or_exit(
    app: AppParts, w: Worker, watch: asyncio.Task[None] | None, error: BaseException | None
) -> None:
    """After ``w`` stopped (on ``error``, if not None): close the app's connections, or leave
    the process at once if that takes too long."""
    if watch is not None:
        watch.cancel()
    if not await _closed_within(app, CLOSE_S):
        log.warning(
            "worker %s: the broker's connections did not close within %.0f s; exiting",
            w.id,
            CLOSE_S,
        )
        if error is not None:
            log.error("worker %s stopped: %s", w.id, error)
        _exit_now(0 if error is None else _error_code(w, error))


async def _closed_within(app: AppParts, seconds: float) -> bool:
    """Close the app's broker connections and end the loop's other tasks, within ``seconds``:
    False if that did not happen. A broker that cannot be reached must not hold the process
    at exit (the worker's last writes are bounded too, and closing writes nothing that
    matters), and tasks of a close cut short may not end when cancelled (a connection attempt
    to a silent server), which ``asyncio.run`` would wait for without end."""
    deadline = time.monotonic() + seconds
    try:
        async with asyncio.timeout(seconds):
            await app.client.aclose()
    except TimeoutError:
        return False
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    if not others:
        return True
    _, pending = await asyncio.wait(others, timeout=max(0.0, deadline - time.monotonic()))
    return not pending


def _error_code(w: Worker, exc: BaseException) -> int:
    """The exit code of a worker process that stopped on ``exc``: ``NO_RESTART_EXIT_CODE``
    when no restart can fix it (it never reached the broker, or the broker refused for good)."""
    final = not w.connected.is_set() or (isinstance(exc, BrokerError) and exc.permanent)
    return NO_RESTART_EXIT_CODE if final else 1


def _exit_now(code: int) -> NoReturn:
    """Exit without waiting for threads or tasks that would not end (logs flushed first)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def beat_to(fd: int) -> Callable[[], None]:
    """Tell the supervisor of each heartbeat: one byte on its pipe (see supervisor.py)."""
    os.set_blocking(fd, False)

    def beat() -> None:
        # a full pipe already tells of a recent beat; a closed one means the supervisor is gone
        # (_watch_parent drains this worker then)
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(fd, b".")

    return beat


def worker_health(w: Worker) -> Callable[[], Status]:
    """The status of ``w``, about to start: made just before its run, so the start counts
    from now. The broker's warnings (``Worker.broker_warnings``), if any, are in it too."""
    max_age_s = MISSED_HEARTBEATS * w.heartbeat_s
    started = time.monotonic()

    def status() -> Status:
        healthy, details = heartbeat_status(
            w.last_heartbeat_ok,
            started=started,
            max_age_s=max_age_s,
            now=time.monotonic(),
            out_of_contact=w.out_of_contact,
        )
        # the broker's warnings are for an operator: they do not make the worker unhealthy
        warnings = w.broker_warnings
        extra = {"warnings": dict(warnings)} if warnings else {}
        return healthy, {**details, "worker": w.id, **extra}

    return status


async def watch_parent(w: Worker, parent_pid: int) -> None:
    """A child of a supervisor that was killed outright drains rather than living on."""
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != parent_pid:
            log.warning("worker %s: the supervisor (pid %d) is gone; draining", w.id, parent_pid)
            w.stop()
            return


__all__ = [
    "METRICS_DIR_OPTION",
    "PoolSpec",
    "beat_to",
    "run_worker_process",
    "serve_health",
    "serve_metrics",
    "supervise",
    "watch_parent",
    "worker_health",
    "worker_metrics",
]
