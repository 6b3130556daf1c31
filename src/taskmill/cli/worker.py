"""taskmill worker: one worker process, or a supervisor of several."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import TYPE_CHECKING, cast

import click

from taskmill.brokers.base import Broker
from taskmill.cli._base import (
    CliError,
    Env,
    age,
    app_option,
    broker_call,
    cli,
    log,
    log_options,
    target_options,
)
from taskmill.errors import ConfigurationError
from taskmill.job import WorkerInfo
from taskmill.logs import LogFormat
from taskmill.logs import configure as configure_logging

if TYPE_CHECKING:
    from taskmill.settings import Settings
    from taskmill.worker.process import PoolSpec

# --- worker -------------------------------------------------------------------------------------


@cli.command()
@click.argument("app_arg", metavar="[APP]", required=False)
@click.option(
    "-q",
    "--queues",
    metavar="Q1,Q2",
    help="Queues to take jobs from (default: every queue the app's tasks use, and the app's "
    "default queue).",
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
@log_options("Log lines as text, or one JSON object a line (with job_id, task, queue, attempt).")
@click.option(
    "--scheduler/--no-scheduler",
    default=True,
    show_default=True,
    help="Also enqueue the app's periodic schedules (each tick once, however many run).",
)
@click.option(
    "--pool-spec",
    "pool_specs",
    metavar="QUEUES:PROCESSES[:CONCURRENCY]",
    multiple=True,
    help="A pool of worker processes on its own queues, e.g. render:2 or preview,default:4:8 "
    "(CONCURRENCY defaults to -c). Repeat for more pools; all run under one supervisor. "
    "Replaces -q and -p.",
)
@click.option(
    "--name",
    metavar="NAME",
    help="A name for the worker, kept in its id (NAME@host-pid-random): shown by 'taskmill "
    "workers', used by 'taskmill ping --name'. Every process of -p N or --pool-spec gets it.",
)
@click.option(
    "--health-port",
    type=click.IntRange(min=0, max=65535),
    help="Serve a liveness endpoint on this port: 200 while the worker (with -p N or "
    "--pool-spec: every worker process) heartbeated recently, 503 otherwise.",
)
@click.option(
    "--health-host",
    default="127.0.0.1",
    show_default=True,
    help="The address the liveness endpoint listens on (0.0.0.0: every interface).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    help="Serve Prometheus metrics (jobs enqueued, started, finished by outcome; run time and "
    "queue wait) on this port, at /metrics; with -p N or --pool-spec one endpoint counts "
    "every worker process. Needs prometheus-client (pip install 'taskmill[metrics]').",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="The address the metrics endpoint listens on (0.0.0.0: every interface).",
)
@click.option(
    "--max-start-wait",
    type=click.FloatRange(min=0),
    metavar="S",
    help="Give up (exit code 3) if the broker is still unreachable after S seconds at start "
    "(default: retry for ever, with back-off).",
)
@click.option(
    "--lease",
    type=click.FloatRange(min=0, min_open=True),
    metavar="S",
    help="How long this worker's claims last without a heartbeat (default: the app's lease_s): "
    "a killed worker's jobs run again after it. The heartbeat follows (a third of it, at most "
    "2 s) unless the app sets heartbeat_s.",
)
@click.option(
    "--fork-restarts/--no-fork-restarts",
    default=True,
    show_default=True,
    help="With -p N or --pool-spec, on Linux: once a worker process died, fork the ones that "
    "replace it from a process that imported the app once (milliseconds instead of a fresh "
    "interpreter's 0.3 s or more of CPU), for 60 s after the last death. Off: every restart "
    "starts afresh (for an app that opens connections at import).",
)
@click.option("--parent-pid", type=int, hidden=True)
@click.option("--heartbeat-fd", type=int, hidden=True)
@click.option("--holdings", hidden=True)
@click.option("--fork-server-fd", type=int, hidden=True)
@click.option("--metrics-dir", hidden=True)
@app_option
@click.pass_context
def worker(
    ctx: click.Context,
    app_arg: str | None,
    queues: str | None,
    concurrency: int,
    processes: int,
    pool: str,
    max_tasks_per_child: int | None,
    drain_timeout: float,
    log_level: str,
    log_format: str,
    scheduler: bool,
    pool_specs: tuple[str, ...],
    name: str | None,
    health_port: int | None,
    health_host: str,
    metrics_port: int | None,
    metrics_host: str,
    max_start_wait: float | None,
    lease: float | None,
    fork_restarts: bool,
    parent_pid: int | None,
    heartbeat_fd: int | None,
    holdings: str | None,
    fork_server_fd: int | None,
    metrics_dir: str | None,
) -> None:
    """Run jobs. SIGTERM or Ctrl-C drains (running jobs get --drain-timeout to finish); a
    second one stops at once, handing unfinished jobs back without spending an attempt.

    A broker that cannot be reached at start is retried with back-off (logged), by one
    process or many. Exit codes: 0 after a stop, 2 for a usage error, 3 if the worker could
    not start (the broker refused it, or --max-start-wait passed), 1 for other errors."""
    from taskmill.worker.process import PoolSpec, run_worker_process, supervise

    env = ctx.ensure_object(Env)
    if parent_pid is not None:
        # supervised: the supervisor forwards a terminal's Ctrl-C as SIGTERM already
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if app_arg:
        env.app_path = app_arg
    app = env.app(need_tasks=True)
    app_path = env.app_path or os.environ.get("TASKMILL_APP", "")
    if max_tasks_per_child is not None and pool != "process":
        raise click.UsageError("--max-tasks-per-child needs --pool process")
    if name is not None:
        _check_name(name)
    if lease is not None:
        _check_lease(app.settings, lease)
    pools = _parse_pool_specs(ctx, pool_specs, concurrency) if pool_specs else None
    queue_list = parse_queues(queues) if queues is not None else app.queues()
    configure_logging(log_level, cast("LogFormat", log_format))  # click.Choice checked it
    if queues is None and pools is None:
        log.info(
            "queues: %s (every queue the app's tasks use, and the app's default queue %r; "
            "-q chooses)",
            ",".join(queue_list),
            app.settings.default_queue,
        )
    if pools is None and processes == 1:
        if fork_server_fd is not None:  # a supervisor's fork server: this returns in a child
            holdings, heartbeat_fd = _serve_forks(app.client.url, fork_server_fd)
        code = run_worker_process(
            app,
            app_path=app_path,
            queues=queue_list,
            concurrency=concurrency,
            pool=pool,
            max_tasks_per_child=max_tasks_per_child,
            drain_timeout_s=drain_timeout,
            parent_pid=parent_pid,
            scheduler=scheduler,
            name=name,
            max_start_wait_s=max_start_wait,
            heartbeat_fd=heartbeat_fd,
            holdings_path=holdings,
            health=None if health_port is None else (health_host, health_port),
            metrics=None if metrics_port is None else (metrics_host, metrics_port),
            metrics_dir=metrics_dir,
            lease_s=lease,
        )
        if code:
            raise click.exceptions.Exit(code)
        return
    common = [
        "--pool", pool, "--drain-timeout", str(drain_timeout), "--log-level", log_level,
        "--log-format", log_format, "--parent-pid", str(os.getpid()),
        "--scheduler" if scheduler else "--no-scheduler",
    ]  # fmt: skip
    optional = {
        "--max-tasks-per-child": max_tasks_per_child,
        "--name": name,
        "--max-start-wait": max_start_wait,
        "--lease": lease,
    }
    common += [part for flag, v in optional.items() if v is not None for part in (flag, str(v))]
    specs = pools or [PoolSpec(queue_list, processes, concurrency)]
    metrics = None if metrics_port is None else (metrics_host, metrics_port)
    raise click.exceptions.Exit(
        supervise(
            app,
            app_path,
            specs,
            common,
            health_host,
            health_port,
            metrics,
            lease_s=lease,
            fork_restarts=fork_restarts,
        )
    )


def _serve_forks(url: str, fd: int) -> tuple[str, int]:
    """Be the supervisor's fork server (``taskmill.worker.forkserver``): the broker's module
    imported too, wait for requests; in each worker forked, its holdings file and heartbeat
    pipe. The server itself exits here when the supervisor no longer needs it."""
    from taskmill.brokers import broker_from_url
    from taskmill.worker.forkserver import serve_forks

    with contextlib.suppress(Exception):  # only to import it: the children make their own
        broker_from_url(url)
    place = serve_forks(fd)
    if place is None:
        raise click.exceptions.Exit(0)
    return place


def parse_queues(value: str) -> list[str]:
    names = list(dict.fromkeys(q.strip() for q in value.split(",") if q.strip()))
    if not names:
        raise click.BadParameter("name at least one queue", param_hint="'-q'")
    return names


def _check_name(name: str) -> None:
    from taskmill.worker.names import check_name

    try:
        check_name(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--name'") from None


def _check_lease(settings: Settings, lease: float) -> None:
    heartbeat = settings.heartbeat_s
    if heartbeat is not None and lease <= heartbeat:
        raise click.BadParameter(
            f"{lease:g} s is not longer than the app's heartbeat_s ({heartbeat:g} s): a claim "
            "must outlast the heartbeats that renew it; give a longer lease, or a shorter "
            "heartbeat_s to the App",
            param_hint="'--lease'",
        )
    try:
        settings.with_lease(lease)
    except ConfigurationError as exc:  # a rule added later: its own words
        raise click.BadParameter(f"{lease:g} s: {exc}", param_hint="'--lease'") from None


def _parse_pool_specs(
    ctx: click.Context, values: tuple[str, ...], default_concurrency: int
) -> list[PoolSpec]:
    from taskmill.worker.process import PoolSpec

    for option, param in (("-q", "queues"), ("-p", "processes")):
        if ctx.get_parameter_source(param) is not click.core.ParameterSource.DEFAULT:
            raise click.UsageError(
                f"--pool-spec sets each pool's queues and processes: drop {option}"
            )
    specs = []
    for value in values:
        try:
            specs.append(PoolSpec.parse(value, default_concurrency))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--pool-spec'") from None
    return specs


# --- ping ---------------------------------------------------------------------------------------


@cli.command()
@click.option("--name", metavar="NAME", help="A worker started with --name NAME.")
@click.option("--id", "worker_id", metavar="ID", help="The worker with this id.")
@click.option(
    "--max-age",
    type=click.FloatRange(min=0, min_open=True),
    metavar="S",
    help="How recent the heartbeat must be (default: three heartbeat intervals of the app's "
    "settings, the rule 'taskmill workers' uses to call a worker lost).",
)
@target_options
@click.pass_obj
def ping(env: Env, name: str | None, worker_id: str | None, max_age: float | None) -> None:
    """Exit 0 if a worker (with --name NAME, or --id ID; else any) heartbeated recently,
    else exit 1 with the reason. For container health checks and scripts."""
    if name is not None and worker_id is not None:
        raise click.UsageError("give --name or --id, not both")
    if name is not None:
        _check_name(name)
    app = env.app()
    max_age_s = max_age or app.settings.lost_after_s

    async def fetch(b: Broker) -> tuple[list[WorkerInfo], float]:
        return await b.list_workers(), await b.now()

    found, now = broker_call(app, fetch)
    matching, which = _matching(found, name, worker_id)
    if not matching:
        raise CliError(f"no worker{which} is registered")
    alive = [w for w in matching if now - w.heartbeat_at <= max_age_s]
    if not alive:
        latest = max(matching, key=lambda w: w.heartbeat_at)
        raise CliError(
            f"no worker{which} heartbeated in the last {age(max_age_s)} (the latest heartbeat: "
            f"{latest.id}, {age(now - latest.heartbeat_at)} ago)"
        )
    newest = max(alive, key=lambda w: w.heartbeat_at)
    click.echo(
        f"ok: {len(alive)} of {len(matching)} worker(s){which} alive; {newest.id} "
        f"heartbeated {age(now - newest.heartbeat_at)} ago"
    )


def _matching(
    found: list[WorkerInfo], name: str | None, worker_id: str | None
) -> tuple[list[WorkerInfo], str]:
    """The workers asked for, and how to say which (" named web", " with id …", or "")."""
    from taskmill.worker.names import name_of

    if worker_id is not None:
        return [w for w in found if w.id == worker_id], f" with id {worker_id}"
    if name is not None:
        return [w for w in found if name_of(w.id) == name], f" named {name}"
    return list(found), ""
