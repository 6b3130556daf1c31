"""taskmill enqueue: send a job by task name, and optionally wait for it."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape

from taskmill.app import App
from taskmill.cli._base import (
    CliError,
    Env,
    cli,
    dumps,
    meta_pairs,
    target_options,
)
from taskmill.errors import ConfigurationError
from taskmill.events import Event
from taskmill.handle import JobHandle
from taskmill.job import Job, JobState, MetaValue
from taskmill.serialization import decode
from taskmill.task import check_priority

if TYPE_CHECKING:
    pass

# --- enqueue ------------------------------------------------------------------------------------


def read_args_json(value: str | None) -> str | None:
    """ARGS_JSON as given, or read from a file (``@path``) or standard input (``-`` or
    ``@-``), for arguments too long or too awkward to quote on a command line."""
    if value is None or not (value == "-" or value.startswith("@")):
        return value
    source = value.removeprefix("@")
    try:
        if source == "-":
            return sys.stdin.read()
        with open(source, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        where = "standard input" if source == "-" else repr(source)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise click.BadParameter(f"cannot read {where}: {reason}", param_hint="ARGS_JSON") from None


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


def parse_priority(value: str | None) -> int | None:
    """``--priority``: a whole number or a name of ``taskmill.task.PRIORITIES``."""
    if value is None:
        return None
    try:
        return check_priority(int(value) if value.lstrip("+-").isdigit() else value.strip())
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="'--priority'") from None


@cli.command()
@click.argument("task_name", metavar="TASK")
@click.argument("args_json", metavar="[ARGS_JSON]", required=False)
@click.option("--queue", help="Queue (default: the task's).")
@click.option(
    "--priority",
    metavar="N|NAME",
    help="Higher runs first: -1000..1000, or urgent, high, normal, low (default: the task's).",
)
@click.option("--delay", type=click.FloatRange(min=0), help="Seconds before it may run.")
@click.option("--key", help="Unique key: while a job with it is pending, return that job.")
@click.option("--retries", type=click.IntRange(min=0), help="Attempts after the first.")
@click.option("--wait", is_flag=True, help="Wait for the result (progress shown on a terminal).")
@click.option(
    "--timeout", type=click.FloatRange(min=0), help="With --wait: give up after S seconds."
)
@click.option(
    "--external",
    is_flag=True,
    help="TASK is defined in another app: send it although this app does not have it.",
)
@click.option(
    "--meta", "meta", metavar="KEY=VALUE", multiple=True, callback=meta_pairs,
    help="Metadata stored with the job (repeat for several; VALUE is JSON if it reads as a "
    "number, true, false or null).",
)  # fmt: skip
@target_options
@click.pass_obj
def enqueue(
    env: Env,
    task_name: str,
    args_json: str | None,
    queue: str | None,
    priority: str | None,
    delay: float | None,
    key: str | None,
    retries: int | None,
    wait: bool,
    timeout: float | None,
    external: bool,
    meta: dict[str, MetaValue],
) -> None:
    """Send a job of TASK. ARGS_JSON is a JSON array of positional arguments or an object of
    keyword arguments: taskmill enqueue myapp.add '[1, 2]' or '{"a": 1, "b": 2}'; @FILE reads
    it from a file, - from standard input.

    Prints the job id; with --wait, then the result as JSON (exit 1 if the job failed or was
    cancelled)."""
    args, kwargs = parse_args_json(read_args_json(args_json))
    if timeout is not None and not wait:
        raise click.UsageError("--timeout is for --wait")
    options: dict[str, Any] = {
        "queue": queue,
        "priority": parse_priority(priority),
        "delay": delay,
        "key": key,
        "retries": retries,
        "meta": meta or None,
    }
    app = env.app()
    try:
        # a name the app does not have fails here, listing the ones it has (unless --external)
        handle = app.send_task(
            task_name,
            args,
            kwargs,
            external=external,
            **{k: v for k, v in options.items() if v is not None},
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
    """Wait until the job finishes, with a progress bar when stderr is a terminal: live from
    its events if the app publishes them (``events=True``), else polling the job."""
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

    last_progress: list[float | None] = [None]

    def show_state(job: Job | Event) -> None:
        description, fraction, message = bar_fields(job, last_progress[0])
        last_progress[0] = fraction
        progress.update(
            bar,
            description=escape(description),
            total=None if fraction is None else 1.0,
            completed=fraction or 0.0,
            message=message,
        )

    with progress:
        bar = progress.add_task("", total=None, message="")
        if app.settings.events:  # live: the job's events as they happen
            app.run_sync(_watch(app, handle, deadline, timeout, show_state))
            return handle.info()
        delay = 0.02
        while True:
            job = handle.info()
            show_state(job)
            if job.state.finished:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                hint = app.run_sync(app.client.no_worker_hint(job))
                raise CliError(f"job {job_id} is still {job.state.value} after {timeout} s{hint}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)


def bar_fields(job: Job | Event, last: float | None) -> tuple[str, float | None, str]:
    """What the progress bar shows for a job's stored state or event: description, fraction
    (None: unknown) and message. Transitions carry no progress, so the last known stays; a
    succeeded job is complete."""
    state = job.state if isinstance(job, Event) else job.state.value
    message = job.message if isinstance(job, Event) else job.progress_message
    fraction = job.progress if job.progress is not None else last
    if state == JobState.SUCCEEDED.value:
        fraction = 1.0
    return f"{job.task} {state}", fraction, message or ""


async def _watch(
    app: App,
    handle: JobHandle[Any],
    deadline: float | None,
    timeout: float | None,
    show: Callable[[Event], None],
) -> None:
    loop_deadline = None
    if deadline is not None:  # from the monotonic clock to the loop's
        loop_deadline = asyncio.get_running_loop().time() + (deadline - time.monotonic())
    try:
        async with asyncio.timeout_at(loop_deadline):
            async for event in handle.awatch():
                show(event)
    except TimeoutError:
        job = await handle.ainfo()
        hint = await app.client.no_worker_hint(job)
        raise CliError(
            f"job {handle.id} is still {job.state.value} after {timeout} s{hint}"
        ) from None


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
