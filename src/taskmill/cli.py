"""The ``taskmill`` command line.

Every command finds its target from ``--app module:attr`` (or ``TASKMILL_APP``); the commands
that only read or manage stored jobs also work with just ``--url`` (or ``TASKMILL_URL``). With
an app, the app's URL is used and ``--url`` is ignored. ``--app`` and ``--url`` may be given
before the command (``taskmill --app myapp:app queues``) or after it.

Errors print one line, ``error: ...``, on stderr: exit code 2 for a command line that cannot be
used as written (bad option, unreadable ARGS_JSON, no app), 1 for everything else (unknown task
or job, arguments that do not fit the task, a broker error, a failed job under ``--wait``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from taskmill.app import DEFAULT_URL, App
from taskmill.brokers.base import Broker
from taskmill.errors import ConfigurationError, JobNotFoundError, TaskmillError
from taskmill.job import Job, JobState, QueueStats, WorkerInfo, describe
from taskmill.serialization import decode

if TYPE_CHECKING:
    from taskmill.worker.worker import PoolKind, Worker

T = TypeVar("T")

log = logging.getLogger("taskmill.cli")

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(process)d] %(message)s"
LOST_AFTER_HEARTBEATS = 3
"""A worker whose last heartbeat is older than this many heartbeat intervals is shown lost."""

_STATES = [s.value for s in JobState]


class CliError(click.ClickException):
    """A user error that is not about the command line's shape: exit code 1."""

    exit_code = 1


# --- where the app comes from -------------------------------------------------------------------


@dataclass
class Env:
    """What the group and its subcommands agree on: the target, consoles, the app to close."""

    app_path: str | None = None
    url: str | None = None
    url_from_flag: bool = False
    out: Console = field(default_factory=lambda: _console(stderr=False))
    err: Console = field(default_factory=lambda: _console(stderr=True))
    _app: App | None = None
    _loaded: bool = False

    def app(self, *, need_tasks: bool = False) -> App:
        """The app: loaded from the app path, else a task-less ``App(url)``."""
        if self._app is not None and (self._loaded or not need_tasks):
            return self._app
        path = self.app_path or os.environ.get("TASKMILL_APP") or None
        if path:
            app = load(path)
            if self.url_from_flag and self.url and self.url != app.url:
                self.err.print(
                    f"warning: --url is ignored: the app {path} uses {app.url}",
                    markup=False,
                    highlight=False,
                )
            self._app, self._loaded = app, True
            return app
        if need_tasks:
            raise click.UsageError(
                "no app given: pass APP or --app module:app, or set TASKMILL_APP"
            )
        url = self.url or os.environ.get("TASKMILL_URL") or None
        if url is None:
            if not os.path.exists(DEFAULT_URL.removeprefix("sqlite:///")):
                raise click.UsageError(
                    "no app or broker given: pass --app module:app or --url URL, or set "
                    "TASKMILL_APP or TASKMILL_URL"
                )
            url = DEFAULT_URL
        self._app = App(url)
        return self._app

    @property
    def has_app(self) -> bool:
        return self._loaded

    def close(self) -> None:
        if self._app is not None:
            self._app.close()


def load(path: str) -> App:
    """``load_app`` with the failures of the user's module reported as one usage line."""
    from taskmill.loader import load_app

    try:
        return load_app(path)
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from None
    except Exception as exc:
        # the user's module raised while importing: say where, in one line
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
        raise click.UsageError(
            f"cannot load app {path!r}: {type(exc).__name__}: {exc}{where}"
        ) from None


def _console(*, stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # piped output keeps full rows (ids are 36 characters) instead of wrapping at 80 columns
    width = None if stream.isatty() else 200
    return Console(stderr=stderr, width=width, soft_wrap=False)


def _remember_app(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.ensure_object(Env).app_path = value


def _remember_url(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        env = ctx.ensure_object(Env)
        env.url, env.url_from_flag = value, True


def app_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--app``, accepted after a command as well as before it."""
    return click.option(
        "--app",
        "app_path",
        metavar="MODULE:ATTR",
        expose_value=False,
        callback=_remember_app,
        help="The app (env TASKMILL_APP).",
    )(fn)


def target_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--app`` and ``--url``, accepted after a command as well as before it."""
    fn = click.option(
        "--url",
        metavar="URL",
        expose_value=False,
        callback=_remember_url,
        help="Broker URL (env TASKMILL_URL), used when no app is given.",
    )(fn)
    return app_option(fn)


def broker_call(app: App, fn: Callable[[Broker], Awaitable[T]]) -> T:
    """Run ``fn(broker)`` on the app's private loop and wait for it."""

    async def go() -> T:
        return await fn(await app.abroker())

    return app.run_sync(go())


# --- formatting ---------------------------------------------------------------------------------


def age(seconds: float | None) -> str:
    """A short human duration: ``850ms``, ``12.3s``, ``4m05s``, ``2h10m``, ``3d04h``."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def when(ts: float | None, now: float) -> str:
    """A timestamp as local time plus how long ago (or until) it is."""
    if ts is None:
        return "-"
    stamp = datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
    delta = now - ts
    return f"{stamp} ({age(delta)} ago)" if delta >= 0 else f"{stamp} (in {age(-delta)})"


def progress_text(job: Job) -> str:
    parts = []
    if job.progress is not None:
        parts.append(f"{job.progress * 100:.0f}%")
    if job.progress_message:
        parts.append(job.progress_message)
    return " ".join(parts) or "-"


_STATE_STYLE = {
    "scheduled": "cyan",
    "queued": "blue",
    "running": "yellow",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
}


def state_text(state: str) -> Text:
    return Text(state, style=_STATE_STYLE.get(state, ""))


def dumps(value: Any, *, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False, default=str)


# --- the group ----------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--app",
    "app_path",
    metavar="MODULE:ATTR",
    envvar="TASKMILL_APP",
    help="The app (env TASKMILL_APP).",
)
@click.option("--url", metavar="URL", help="Broker URL (env TASKMILL_URL).")
@click.version_option(package_name="taskmill", prog_name="taskmill")
@click.pass_context
def cli(ctx: click.Context, app_path: str | None, url: str | None) -> None:
    """taskmill: background jobs for Python.

    \b
      taskmill worker myapp:app -q urgent,default -c 16 -p 2
      taskmill enqueue myapp.resize '[42, 20]' --app myapp:app --wait
      taskmill jobs list --state failed ; taskmill jobs retry --all-failed
      taskmill queues ; taskmill workers
    """
    env = ctx.ensure_object(Env)
    env.app_path = app_path
    if url:
        env.url, env.url_from_flag = url, True
    ctx.call_on_close(env.close)


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
        ]  # fmt: skip
        if max_tasks_per_child is not None:
            argv += ["--max-tasks-per-child", str(max_tasks_per_child)]
        raise click.exceptions.Exit(Supervisor(argv, processes).run())
    run_worker_process(
        app,
        app_path=app_path,
        queues=queue_list,
        concurrency=concurrency,
        pool=pool,
        max_tasks_per_child=max_tasks_per_child,
        drain_timeout_s=drain_timeout,
        parent_pid=parent_pid,
    )


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


# --- enqueue ------------------------------------------------------------------------------------


def parse_args_json(text: str | None) -> tuple[list[Any], dict[str, Any]]:
    """ARGS_JSON: an array of positional arguments or an object of keyword arguments."""
    if text is None or not text.strip():
        return [], {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="ARGS_JSON") from None
    if isinstance(value, list):
        return value, {}
    if isinstance(value, dict):
        return [], value
    raise click.BadParameter(
        f"must be a JSON array (positional arguments) or object (keyword arguments), "
        f"not {type(value).__name__}",
        param_hint="ARGS_JSON",
    )


@cli.command()
@click.argument("task_name", metavar="TASK")
@click.argument("args_json", metavar="[ARGS_JSON]", required=False)
@click.option("--queue", help="Queue (default: the task's).")
@click.option("--priority", type=int, help="Higher runs first (default: the task's).")
@click.option("--delay", type=click.FloatRange(min=0), help="Seconds before it may run.")
@click.option("--key", help="Unique key: while a job with it is pending, return that job.")
@click.option("--retries", type=click.IntRange(min=0), help="Attempts after the first.")
@click.option("--wait", is_flag=True, help="Wait for the result (progress shown on a terminal).")
@click.option(
    "--timeout", type=click.FloatRange(min=0), help="With --wait: give up after S seconds."
)
@target_options
@click.pass_obj
def enqueue(
    env: Env,
    task_name: str,
    args_json: str | None,
    queue: str | None,
    priority: int | None,
    delay: float | None,
    key: str | None,
    retries: int | None,
    wait: bool,
    timeout: float | None,
) -> None:
    """Send a job of TASK. ARGS_JSON is a JSON array of positional arguments or an object of
    keyword arguments: taskmill enqueue myapp.add '[1, 2]' or '{"a": 1, "b": 2}'.

    Prints the job id; with --wait, then the result as JSON (exit 1 if the job failed or was
    cancelled)."""
    args, kwargs = parse_args_json(args_json)
    if timeout is not None and not wait:
        raise click.UsageError("--timeout is for --wait")
    app = env.app()
    if env.has_app:
        app.get_task(task_name)  # an unknown name fails here, listing the known ones
    options: dict[str, Any] = {
        "queue": queue,
        "priority": priority,
        "delay": delay,
        "key": key,
        "retries": retries,
    }
    try:
        handle = app.send_task(
            task_name, args, kwargs, **{k: v for k, v in options.items() if v is not None}
        )
    except TypeError as exc:  # the arguments do not bind (the message names the task)
        raise CliError(str(exc)) from None
    click.echo(handle.id)
    if handle.existing:
        env.err.print(
            f"note: a job with key {key!r} was already pending; that is the job above",
            markup=False,
            highlight=False,
        )
    if wait:
        job = wait_for(env, app, handle.id, timeout)
        finish_waiting(job)


def wait_for(env: Env, app: App, job_id: str, timeout: float | None) -> Job:
    """Poll the job until it finishes, with a progress bar when stderr is a terminal."""
    from rich.progress import (
        BarColumn,
        Progress,
        SpinnerColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    deadline = None if timeout is None else time.monotonic() + timeout
    handle = app.job(job_id)
    show = env.err.is_terminal
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[message]}", markup=False),
        console=env.err,
        transient=True,
        disable=not show,
    )
    delay = 0.02
    with progress:
        bar = progress.add_task("", total=None, message="")
        while True:
            job = handle.info()
            progress.update(
                bar,
                description=escape(f"{job.task} {job.state.value}"),
                total=None if job.progress is None else 1.0,
                completed=job.progress or 0.0,
                message=job.progress_message or "",
            )
            if job.state.finished:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise CliError(f"job {job_id} is still {job.state.value} after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)


def finish_waiting(job: Job) -> None:
    if job.state is JobState.SUCCEEDED:
        result = None if job.result is None else decode(job.result)
        click.echo(dumps(result))
        return
    if job.state is JobState.CANCELLED:
        raise CliError(f"job {job.id} ({job.task}) was cancelled")
    err = job.error
    detail = "no error was recorded" if err is None else f"{err.type}: {err.message}"
    raise CliError(f"job {job.id} ({job.task}) failed: {detail}")


# --- jobs ---------------------------------------------------------------------------------------


@cli.group()
def jobs() -> None:
    """List, show, retry and cancel jobs."""


@jobs.command("list")
@click.option("--state", type=click.Choice(_STATES), help="Only jobs in this state.")
@click.option("--queue", help="Only jobs of this queue.")
@click.option("--task", "task_name", metavar="TASK", help="Only jobs of this task.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@target_options
@click.pass_obj
def jobs_list(
    env: Env,
    state: str | None,
    queue: str | None,
    task_name: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List jobs, newest first."""
    app = env.app()
    st = JobState(state) if state else None

    async def fetch(b: Broker) -> tuple[list[Job], float]:
        found = await b.list_jobs(state=st, queue=queue, task=task_name, limit=limit)
        return found, await b.now()

    found, now = broker_call(app, fetch)
    if as_json:
        click.echo(dumps([describe(j) for j in found], indent=2))
        return
    if not found:
        env.err.print("no jobs match", highlight=False)
        return
    table = Table(title=f"jobs ({len(found)}, newest first)", title_justify="left")
    table.add_column("id", no_wrap=True, min_width=36)
    table.add_column("task")
    table.add_column("queue")
    table.add_column("state")
    table.add_column("prio", justify="right")
    table.add_column("attempt", justify="right")
    table.add_column("enqueued", justify="right")
    table.add_column("progress")
    for j in found:
        table.add_row(
            j.id,
            Text(j.task),
            Text(j.queue),
            state_text(j.state.value),
            str(j.priority),
            f"{j.attempt}/{j.max_attempts}",
            age(now - j.enqueued_at) + " ago",
            Text(progress_text(j)),
        )
    env.out.print(table)


@jobs.command("show")
@click.argument("job_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@target_options
@click.pass_obj
def jobs_show(env: Env, job_id: str, as_json: bool) -> None:
    """Show a job: arguments, state, attempts, times, progress, result or error."""
    app = env.app()

    async def fetch(b: Broker) -> tuple[Job | None, float]:
        return await b.get(job_id), await b.now()

    job, now = broker_call(app, fetch)
    if job is None:
        raise JobNotFoundError(f"job {job_id} does not exist (or was pruned)")
    info = describe(job)
    if as_json:
        click.echo(dumps(info, indent=2))
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    rows: list[tuple[str, str | Text]] = [
        ("id", job.id),
        ("task", Text(job.task)),
        ("queue", Text(job.queue)),
        ("state", state_text(job.state.value)),
    ]
    payload = info["payload"]
    if isinstance(payload, list) and len(payload) == 2:
        rows += [("args", Text(dumps(payload[0]))), ("kwargs", Text(dumps(payload[1])))]
    else:  # not an [args, kwargs] pair: show what is stored
        rows.append(("payload", Text(str(payload))))
    rows += [
        ("priority", str(job.priority)),
        ("attempt", f"{job.attempt} of {job.max_attempts}"),
        ("enqueued", when(job.enqueued_at, now)),
        ("run at", when(job.run_at, now)),
        ("started", when(job.started_at, now)),
        ("finished", when(job.finished_at, now)),
        ("progress", Text(progress_text(job))),
    ]
    if job.key is not None:
        rows.append(("key", Text(job.key)))
    if job.worker_id is not None:
        rows.append(("worker", Text(job.worker_id)))
    if job.timeout_s is not None:
        rows.append(("timeout", f"{job.timeout_s:g} s"))
    if job.lost_leases:
        rows.append(("lost leases", str(job.lost_leases)))
    if job.cancel_requested:
        rows.append(("cancel", "requested"))
    if job.state is JobState.SUCCEEDED:
        rows.append(("result", Text(dumps(info["result"]))))
    for name, value in rows:
        grid.add_row(name, value)
    env.out.print(grid)
    if job.error is not None:
        label = "error" if job.state is JobState.FAILED else "last error"
        env.out.print(Text(f"{label}: {job.error.type}: {job.error.message}", style="red"))
        if job.error.traceback:
            env.out.print(Text(job.error.traceback.rstrip()))


@jobs.command("retry")
@click.argument("job_ids", metavar="[ID]...", nargs=-1)
@click.option("--all-failed", is_flag=True, help="Retry every failed job.")
@target_options
@click.pass_obj
def jobs_retry(env: Env, job_ids: tuple[str, ...], all_failed: bool) -> None:
    """Retry failed or cancelled jobs: back to their queue with a fresh attempt budget."""
    if all_failed == bool(job_ids):
        raise click.UsageError("give job ids or --all-failed (not both)")
    app = env.app()

    async def go(b: Broker) -> tuple[list[str], dict[str, JobState | None]]:
        done = await b.retry(None if all_failed else list(job_ids))
        missed = {}
        for job_id in job_ids:
            if job_id not in done:
                job = await b.get(job_id)
                missed[job_id] = None if job is None else job.state
        return done, missed

    done, missed = broker_call(app, go)
    for job_id in done:
        click.echo(job_id)
    if not missed:
        env.err.print(f"requeued {len(done)} job(s)", highlight=False)
    else:
        reasons = [
            f"job {job_id} does not exist"
            if st is None
            else f"job {job_id} is {st.value} (only failed or cancelled jobs can be retried)"
            for job_id, st in missed.items()
        ]
        raise CliError("; ".join(reasons))


@jobs.command("cancel")
@click.argument("job_ids", metavar="ID...", nargs=-1, required=True)
@target_options
@click.pass_obj
def jobs_cancel(env: Env, job_ids: tuple[str, ...]) -> None:
    """Cancel jobs. A waiting job never runs; a running async job is cancelled; a running sync
    job is asked to stop (it sees current_job().cancelled)."""
    app = env.app()

    async def go(b: Broker) -> list[tuple[str, JobState | None]]:
        return [(job_id, await b.cancel(job_id)) for job_id in job_ids]

    problems = []
    for job_id, st in broker_call(app, go):
        if st is None:
            problems.append(f"job {job_id} does not exist")
        elif st is JobState.CANCELLED:
            click.echo(f"{job_id} cancelled")
        elif st is JobState.RUNNING:
            click.echo(f"{job_id} running: cancel requested")
        else:
            problems.append(f"job {job_id} already {st.value}")
    if problems:
        raise CliError("; ".join(problems))


# --- queues -------------------------------------------------------------------------------------


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@target_options
@click.pass_context
def queues(ctx: click.Context, as_json: bool) -> None:
    """Show queues: jobs per state, the oldest waiting job's age, paused or not.

    'taskmill queues pause Q' and 'taskmill queues resume Q' stop and restart claiming."""
    if ctx.invoked_subcommand is not None:
        return
    env = ctx.ensure_object(Env)
    app = env.app()
    stats = broker_call(app, lambda b: b.stats())
    if env.has_app:  # the app's queues with nothing in them yet are still worth a row
        seen = {s.queue for s in stats}
        stats += [
            QueueStats(queue=q, counts=dict.fromkeys(_STATES, 0))
            for q in app.queues()
            if q not in seen
        ]
        stats.sort(key=lambda s: s.queue)
    if as_json:
        click.echo(
            dumps(
                [
                    {
                        "queue": s.queue,
                        "counts": s.counts,
                        "oldest_waiting_s": s.oldest_waiting_s,
                        "paused": s.paused,
                    }
                    for s in stats
                ],
                indent=2,
            )
        )
        return
    if not stats:
        env.err.print("no queues yet", highlight=False)
        return
    table = Table(title="queues", title_justify="left")
    table.add_column("queue")
    for st in _STATES:
        table.add_column(st, justify="right", style=_STATE_STYLE[st])
    table.add_column("oldest waiting", justify="right")
    table.add_column("paused")
    for s in stats:
        table.add_row(
            Text(s.queue),
            *(str(s.counts.get(st, 0)) for st in _STATES),
            age(s.oldest_waiting_s),
            Text("paused", style="bold red") if s.paused else "",
        )
    env.out.print(table)


@queues.command("pause")
@click.argument("queue")
@target_options
@click.pass_obj
def queues_pause(env: Env, queue: str) -> None:
    """Stop workers claiming jobs of QUEUE (running jobs go on; sending still works)."""
    app = env.app()
    broker_call(app, lambda b: b.pause(queue, True))
    click.echo(f"queue {queue} paused")


@queues.command("resume")
@click.argument("queue")
@target_options
@click.pass_obj
def queues_resume(env: Env, queue: str) -> None:
    """Let workers claim from QUEUE again."""
    app = env.app()
    broker_call(app, lambda b: b.pause(queue, False))
    click.echo(f"queue {queue} resumed")


# --- workers ------------------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@target_options
@click.pass_obj
def workers(env: Env, as_json: bool) -> None:
    """List worker processes. "lost": no heartbeat for 3 intervals, and no sign-off."""
    app = env.app()

    async def fetch(b: Broker) -> tuple[list[WorkerInfo], float]:
        return await b.list_workers(), await b.now()

    found, now = broker_call(app, fetch)
    lost_after = LOST_AFTER_HEARTBEATS * app.settings.effective_heartbeat_s
    rows = [
        {
            "id": w.id,
            "host": w.host,
            "pid": w.pid,
            "queues": w.queues,
            "concurrency": w.concurrency,
            "running": len(w.running),
            "started_at": w.started_at,
            "heartbeat_age_s": round(now - w.heartbeat_at, 3),
            "status": "lost" if now - w.heartbeat_at > lost_after else "alive",
        }
        for w in found
    ]
    if as_json:
        click.echo(dumps(rows, indent=2))
        return
    if not rows:
        env.err.print("no workers registered", highlight=False)
        return
    table = Table(title="workers", title_justify="left")
    for name in ("id", "host", "pid", "queues", "slots", "running", "up", "heartbeat", "status"):
        table.add_column(name, no_wrap=name == "id", justify="right" if name == "pid" else "left")
    for w, row in zip(found, rows, strict=True):
        lost = row["status"] == "lost"
        table.add_row(
            w.id,
            Text(w.host),
            str(w.pid),
            Text(",".join(w.queues)),
            str(w.concurrency),
            str(len(w.running)),
            age(now - w.started_at),
            age(now - w.heartbeat_at) + " ago",
            Text("lost", style="bold red") if lost else Text("alive", style="green"),
        )
    env.out.print(table)


# --- purge --------------------------------------------------------------------------------------


@cli.command()
@click.argument("queue")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@target_options
@click.pass_obj
def purge(env: Env, queue: str, yes: bool) -> None:
    """Delete the scheduled and queued jobs of QUEUE (running and finished jobs stay)."""
    app = env.app()
    if not yes:
        stats = {s.queue: s for s in broker_call(app, lambda b: b.stats())}
        s = stats.get(queue)
        waiting = 0 if s is None else s.counts.get("scheduled", 0) + s.counts.get("queued", 0)
        click.confirm(f"Delete {waiting} waiting job(s) of queue {queue!r}?", abort=True, err=True)
    n = broker_call(app, lambda b: b.purge(queue))
    click.echo(f"purged {n} job(s) from queue {queue}")


# --- entry point --------------------------------------------------------------------------------


def _one_line(message: str) -> str:
    return " ".join(message.split())


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (errors reported as one line on stderr)."""
    try:
        rv = cli.main(args=argv, prog_name="taskmill", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()
        return exc.exit_code
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo(f"error: {_one_line(exc.format_message())}{hint}", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"error: {_one_line(exc.format_message())}", err=True)
        return exc.exit_code
    except click.Abort as exc:
        interrupted = isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt)
        click.echo("error: interrupted" if interrupted else "error: aborted", err=True)
        return 130 if interrupted else 1
    except TaskmillError as exc:
        click.echo(f"error: {_one_line(str(exc))}", err=True)
        return 1
    except BrokenPipeError:
        # the reader went away (`taskmill jobs list | head`): not an error worth a traceback
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return rv if isinstance(rv, int) else 0


def main() -> NoReturn:
    """The ``taskmill`` console script."""
    sys.exit(run())
