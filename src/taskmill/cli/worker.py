"""taskmill worker: one worker process, or a supervisor of several."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, cast

import click

from taskmill.app import App
from taskmill.cli._base import (
    LOG_FORMAT,
    Env,
    app_option,
    cli,
    log,
)
from taskmill.errors import BrokerError
from taskmill.worker.supervisor import BROKER_REFUSED_EXIT_CODE

if TYPE_CHECKING:
    from taskmill.worker.worker import PoolKind, Worker

# --- worker -------------------------------------------------------------------------------------


@cli.command()
@click.argument("app_arg", metavar="[APP]", required=False)
@click.option(
    "-q",
    "--queues",
    metavar="Q1,Q2",
    help="Queues to take jobs from (default: every queue the app's tasks use).",
)
@click.option(
    "-c", "--concurrency", type=click.IntRange(min=1), default=16, show_default=True,
    help="Jobs run at once by each process.",
)  # fmt: skip
@click.option(
    "-p", "--processes", type=click.IntRange(min=1), default=1, show_default=True,
    help="Worker processes (more than 1 runs them under a supervisor that restarts them).",
)  # fmt: skip
@click.option(
    "--pool",
    type=click.Choice(["async", "thread", "process"]),
    default="thread",
    show_default=True,
    help="Where sync tasks run: on the loop, in threads, or in child processes.",
)
@click.option(
    "--max-tasks-per-child",
    type=click.IntRange(min=1),
    help="With --pool process: replace a child after this many jobs.",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds running jobs get to finish after SIGTERM before they are handed back.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
)
@click.option(
    "--scheduler/--no-scheduler",
    default=True,
    show_default=True,
    help="Also enqueue the app's periodic schedules (each tick once, however many run).",
)
@click.option("--parent-pid", type=int, hidden=True)
@app_option
@click.pass_obj
def worker(
    env: Env,
    app_arg: str | None,
    queues: str | None,
    concurrency: int,
    processes: int,
    pool: str,
    max_tasks_per_child: int | None,
    drain_timeout: float,
    log_level: str,
    scheduler: bool,
    parent_pid: int | None,
) -> None:
    """Run jobs. SIGTERM or Ctrl-C drains (running jobs get --drain-timeout to finish); a
    second one stops at once, handing unfinished jobs back without spending an attempt."""
    if parent_pid is not None:
        # supervised: the supervisor forwards a terminal's Ctrl-C as SIGTERM already
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if app_arg:
        env.app_path = app_arg
    app = env.app(need_tasks=True)
    app_path = env.app_path or os.environ.get("TASKMILL_APP", "")
    if max_tasks_per_child is not None and pool != "process":
        raise click.UsageError("--max-tasks-per-child needs --pool process")
    queue_list = parse_queues(queues) if queues is not None else app.queues()
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr, format=LOG_FORMAT)
    if processes > 1:
        from taskmill.worker.supervisor import Supervisor

        argv = [
            sys.executable, "-m", "taskmill", "worker", app_path,
            "-q", ",".join(queue_list), "-c", str(concurrency), "-p", "1",
            "--pool", pool, "--drain-timeout", str(drain_timeout), "--log-level", log_level,
            "--parent-pid", str(os.getpid()),
            "--scheduler" if scheduler else "--no-scheduler",
        ]  # fmt: skip
        if max_tasks_per_child is not None:
            argv += ["--max-tasks-per-child", str(max_tasks_per_child)]
        raise click.exceptions.Exit(Supervisor(argv, processes).run())
    try:
        run_worker_process(
            app,
            app_path=app_path,
            queues=queue_list,
            concurrency=concurrency,
            pool=pool,
            max_tasks_per_child=max_tasks_per_child,
            drain_timeout_s=drain_timeout,
            parent_pid=parent_pid,
            scheduler=scheduler,
        )
    except BrokerError as exc:
        if parent_pid is None or not exc.permanent:
            raise
        # supervised: say so, and tell the supervisor that a restart would fail the same way
        click.echo(f"error: {exc}", err=True)
        raise click.exceptions.Exit(BROKER_REFUSED_EXIT_CODE) from None


def parse_queues(value: str) -> list[str]:
    names = list(dict.fromkeys(q.strip() for q in value.split(",") if q.strip()))
    if not names:
        raise click.BadParameter("name at least one queue", param_hint="'-q'")
    return names


def run_worker_process(
    app: App,
    *,
    app_path: str,
    queues: list[str],
    concurrency: int,
    pool: str,
    max_tasks_per_child: int | None,
    drain_timeout_s: float,
    parent_pid: int | None,
    scheduler: bool = True,
) -> None:
    """One worker in this process, until a signal stops it (or its supervisor goes away)."""
    from taskmill.worker import Worker

    async def main() -> None:
        w = Worker(
            app,
            queues=queues,
            concurrency=concurrency,
            pool=cast("PoolKind", pool),  # click.Choice checked it
            app_path=app_path,
            max_tasks_per_child=max_tasks_per_child,
            drain_timeout_s=drain_timeout_s,
            scheduler=scheduler,
        )
        w.install_signal_handlers()
        watch = None
        if parent_pid is not None:
            loop = asyncio.get_running_loop()
            loop.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            watch = asyncio.create_task(_watch_parent(w, parent_pid))
        try:
            await w.run()
        finally:
            if watch is not None:
                watch.cancel()
            await app.aclose()

    asyncio.run(main())
    stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if stuck:
        # a sync task that ignores its deadline keeps its pool thread alive, and Python would
        # wait for it at exit; the job was handed back already, so leave without it
        log.warning(
            "exiting with %d task thread(s) still running: %s",
            len(stuck),
            ", ".join(t.name for t in stuck),
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


async def _watch_parent(w: Worker, parent_pid: int) -> None:
    """A child of a supervisor that was killed outright drains rather than living on."""
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != parent_pid:
            log.warning("worker %s: the supervisor (pid %d) is gone; draining", w.id, parent_pid)
            w.stop()
            return
