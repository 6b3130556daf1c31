"""taskmill jobs list/show/retry/cancel/run/watch, on the app's admin API (``taskmill.admin``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from taskmill.admin import MAX_PAGE
from taskmill.app import App
from taskmill.brokers.base import JobPage
from taskmill.cli._base import (
    _STATES,
    CliError,
    Env,
    age,
    cli,
    dumps,
    meta_pairs,
    progress_text,
    state_text,
    target_options,
    when,
)
from taskmill.errors import JobNotFoundError
from taskmill.job import Job, JobState, MetaValue, describe

# --- jobs ---------------------------------------------------------------------------------------


@cli.group()
def jobs() -> None:
    """List, show, retry, cancel, run now and watch jobs."""


@jobs.command("list")
@click.option(
    "--state", "states", type=click.Choice(_STATES), multiple=True, help="Only jobs in this state "
    "(repeat for several)."
)  # fmt: skip
@click.option("--queue", help="Only jobs of this queue.")
@click.option("--task", "task_name", metavar="PREFIX", help="Only tasks whose name starts so.")
@click.option(
    "--meta", "meta", metavar="KEY=VALUE", multiple=True, callback=meta_pairs,
    help="Only jobs whose metadata holds this pair (repeat for several; VALUE is JSON if it "
    "reads as a number, true, false or null).",
)  # fmt: skip
@click.option(
    "--order", type=click.Choice(["enqueued", "finished"]), default="enqueued",
    show_default=True, help="Newest first, or finished jobs by finish time, latest first.",
)  # fmt: skip
@click.option("--limit", type=click.IntRange(1, MAX_PAGE), default=50, show_default=True)
@click.option("--cursor", metavar="CURSOR", help="The next page: the cursor a page printed.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@target_options
@click.pass_obj
def jobs_list(
    env: Env,
    states: tuple[str, ...],
    queue: str | None,
    task_name: str | None,
    meta: dict[str, MetaValue],
    order: str,
    limit: int,
    cursor: str | None,
    as_json: bool,
) -> None:
    """List jobs, newest first ("50 of 417"; the next page with --cursor)."""
    app = env.app()
    try:
        page = app.list_jobs(
            state=states or None,
            queue=queue,
            task=task_name,
            meta=meta,
            order="finished" if order == "finished" else "enqueued",
            limit=limit,
            cursor=cursor,
        )
    except ValueError as exc:  # a cursor from another listing, a pending state by finish time
        raise click.UsageError(str(exc)) from None
    if as_json:
        listing = {
            "total": page.total,
            "next_cursor": page.next_cursor,
            "jobs": [describe(j) for j in page.jobs],
        }
        click.echo(dumps(listing, indent=2))
        return
    if not page.jobs:
        env.err.print("no jobs match", highlight=False)
        return
    env.out.print(_jobs_table(page, order, app.now(), env.out))
    if page.next_cursor is not None:
        env.err.print(f"next page: --cursor {page.next_cursor}", highlight=False, markup=False)


@dataclass(frozen=True)
class _Column:
    header: str
    cell: Callable[[Job], str | Text]
    justify: str = "left"


def _columns(page: JobPage, order: str, now: float) -> list[_Column]:
    """The columns of a page, most useful first: a run-at column when the page has a
    scheduled job, a finish column when listing by finish time, metadata when any has some."""

    def run_at(j: Job) -> str:
        return f"in {age(j.run_at - now)}" if j.state is JobState.SCHEDULED else ""

    def ago(ts: float | None) -> str:
        return "-" if ts is None else age(now - ts) + " ago"

    columns = [
        _Column("id", lambda j: j.id),
        _Column("task", lambda j: Text(j.task)),
        _Column("state", lambda j: state_text(j.state.value)),
    ]
    if order == "finished":
        columns.append(_Column("finished", lambda j: ago(j.finished_at), "right"))
    if any(j.state is JobState.SCHEDULED for j in page.jobs):
        columns.append(_Column("run at", run_at, "right"))
    columns += [
        _Column("queue", lambda j: Text(j.queue)),
        _Column("enqueued", lambda j: ago(j.enqueued_at), "right"),
        _Column("attempt", lambda j: f"{j.attempt}/{j.max_attempts}", "right"),
        _Column("prio", lambda j: str(j.priority), "right"),
        _Column("progress", lambda j: Text(progress_text(j))),
    ]
    if any(j.meta for j in page.jobs):
        columns.append(_Column("meta", lambda j: Text(_meta_text(j))))
    return columns


def _jobs_table(page: JobPage, order: str, now: float, console: Console) -> Table:
    """The page as a table that fits the terminal: columns are dropped, least useful first,
    until the rest fit whole (an id is never cut: it is what the other commands take)."""

    columns = _columns(page, order, now)
    cells = [[c.cell(j) for j in page.jobs] for c in columns]
    total = "" if page.total is None else f" of {page.total}"
    how = "latest finished first" if order == "finished" else "newest first"

    def table_of(shown: int) -> Table:
        table = Table(
            title=f"jobs: {len(page.jobs)}{total}, {how}",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            collapse_padding=True,
        )
        for i, column in enumerate(columns[:shown]):
            table.add_column(
                column.header,
                justify=column.justify,  # type: ignore[arg-type]
                no_wrap=i != 1,  # only a task name too long for the narrowest table wraps
                overflow="fold",
            )
        for row in range(len(page.jobs)):
            table.add_row(*(cells[i][row] for i in range(shown)))
        return table

    unbounded = console.options.update_width(1 << 16)  # measure the table's natural width
    shown = len(columns)
    table = table_of(shown)
    while shown > 3 and Measurement.get(console, unbounded, table).maximum > console.width:
        shown -= 1
        table = table_of(shown)
    if shown < len(columns):
        hidden = ", ".join(c.header for c in columns[shown:])
        table.caption = f"not shown at {console.width} columns: {hidden} (--json has all)"
        table.caption_justify = "left"
    return table


def _meta_text(job: Job) -> str:
    return " ".join(f"{k}={dumps(v) if not isinstance(v, str) else v}" for k, v in job.meta.items())


def _show_rows(job: Job, info: dict[str, Any], now: float) -> list[tuple[str, str | Text]]:
    """The lines of ``jobs show``: every field the job has, the optional ones when set."""
    rows: list[tuple[str, str | Text]] = [
        ("id", job.id),
        ("task", Text(job.task)),
        ("queue", Text(job.queue)),
        ("state", state_text(job.state.value)),
        *_payload_rows(info["payload"]),
    ]
    if job.meta:
        rows.append(("meta", Text(dumps(job.meta))))
    rows += [
        ("priority", str(job.priority)),
        ("attempt", f"{job.attempt} of {job.max_attempts}"),
        ("enqueued", when(job.enqueued_at, now)),
        ("run at", when(job.run_at, now)),
        ("started", when(job.started_at, now)),
        ("finished", when(job.finished_at, now)),
        ("progress", Text(progress_text(job))),
    ]
    optional: list[tuple[str, object, Callable[[Any], str | Text]]] = [
        ("key", job.key, Text),
        ("worker", job.worker_id, Text),
        ("timeout", job.timeout_s, lambda s: f"{s:g} s"),
        ("soft timeout", _soft_timeout(info["payload"]), lambda s: f"{s:g} s"),
        ("lost leases", job.lost_leases or None, str),
        ("cancel", "requested" if job.cancel_requested else None, str),
    ]
    rows += [(name, shown(value)) for name, value, shown in optional if value is not None]
    if job.state is JobState.SUCCEEDED:
        rows.append(("result", Text(dumps(info["result"]))))
    return rows


def _payload_rows(payload: Any) -> list[tuple[str, str | Text]]:
    if isinstance(payload, list) and len(payload) in (2, 3):  # [args, kwargs, job options]
        return [("args", Text(dumps(payload[0]))), ("kwargs", Text(dumps(payload[1])))]
    return [("payload", Text(str(payload)))]  # not an [args, kwargs] pair: what is stored


def _soft_timeout(payload: Any) -> float | None:
    """A soft limit its send set (stored after the arguments); else the worker's task's."""
    options = payload[2] if isinstance(payload, list) and len(payload) == 3 else None
    soft = options.get("soft_timeout_s") if isinstance(options, dict) else None
    return float(soft) if isinstance(soft, int | float) else None


@jobs.command("show")
@click.argument("job_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@target_options
@click.pass_obj
def jobs_show(env: Env, job_id: str, as_json: bool) -> None:
    """Show a job: arguments, state, attempts, times, progress, metadata, result or error."""
    app = env.app()
    job = app.get_job(job_id)
    info = describe(job)
    if as_json:
        click.echo(dumps(info, indent=2))
        return
    now = app.now()
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    rows = _show_rows(job, info, now)
    for name, value in rows:
        grid.add_row(name, value)
    env.out.print(grid)
    if job.error is not None:
        label = "error" if job.state is JobState.FAILED else "last error"
        env.out.print(Text(f"{label}: {job.error.type}: {job.error.message}", style="red"))
        if job.error.traceback:
            env.out.print(Text(job.error.traceback.rstrip()))


def _state_or_none(app: App, job_id: str) -> JobState | None:
    try:
        return app.get_job(job_id).state
    except JobNotFoundError:
        return None


@jobs.command("retry")
@click.argument("job_ids", metavar="[ID]...", nargs=-1)
@click.option("--all-failed", is_flag=True, help="Retry every failed job (of --queue/--task).")
@click.option("--queue", help="With --all-failed: only this queue's failed jobs.")
@click.option("--task", "task_name", metavar="PREFIX", help="With --all-failed: only these tasks.")
@target_options
@click.pass_obj
def jobs_retry(
    env: Env,
    job_ids: tuple[str, ...],
    all_failed: bool,
    queue: str | None,
    task_name: str | None,
) -> None:
    """Retry failed or cancelled jobs: back to their queue with a fresh attempt budget."""
    if all_failed == bool(job_ids):
        raise click.UsageError("give job ids or --all-failed (not both)")
    if (queue or task_name) and not all_failed:
        raise click.UsageError("--queue and --task go with --all-failed")
    app = env.app()
    done = app.retry_jobs(queue=queue, task=task_name) if all_failed else app.retry_jobs(job_ids)
    for job_id in done:
        click.echo(job_id)
    missed = {job_id: _state_or_none(app, job_id) for job_id in job_ids if job_id not in done}
    if not missed:
        env.err.print(f"requeued {len(done)} job(s)", highlight=False)
        return
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
    job is asked to stop (it sees current_job().cancelled). Exit 1 if a job does not exist or
    has finished already (a cancelled one included)."""
    app = env.app()
    problems = []
    for job_id in job_ids:
        before = _state_or_none(app, job_id)
        if before is None:
            problems.append(f"job {job_id} does not exist")
            continue
        # cancel_job returns a finished job's state unchanged: a job cancelled before must
        # not read as cancelled by this command
        st = before if before.finished else app.cancel_job(job_id)
        if st is JobState.CANCELLED and not before.finished:
            click.echo(f"{job_id} cancelled")
        elif st is JobState.RUNNING:
            click.echo(f"{job_id} running: cancel requested")
        else:
            problems.append(f"job {job_id} already {st.value}")
    if problems:
        raise CliError("; ".join(problems))


@jobs.command("run")
@click.argument("job_ids", metavar="ID...", nargs=-1, required=True)
@target_options
@click.pass_obj
def jobs_run(env: Env, job_ids: tuple[str, ...]) -> None:
    """Run scheduled jobs now: a delayed job, or one waiting for its next retry, becomes due
    at once (its attempt count unchanged). A job already queued is left as it is (exit 0);
    exit 1 if a job does not exist, is running or has finished."""
    app = env.app()
    problems = []
    for job_id in job_ids:
        try:
            before = app.run_job_now(job_id)
        except JobNotFoundError:
            problems.append(f"job {job_id} does not exist")
            continue
        if before is JobState.SCHEDULED:
            click.echo(f"{job_id} queued: due now")
        elif before is JobState.QUEUED:
            click.echo(f"{job_id} already queued: nothing to do")
        else:
            problems.append(f"job {job_id} is {before.value}: only a scheduled job can run now")
    if problems:
        raise CliError("; ".join(problems))


@jobs.command("watch")
@click.argument("job_id", metavar="ID")
@click.option("--timeout", type=click.FloatRange(min=0), help="Give up after S seconds.")
@target_options
@click.pass_obj
def jobs_watch(env: Env, job_id: str, timeout: float | None) -> None:
    """Follow a job until it finishes, as a live progress bar on a terminal; then print its
    result as JSON (exit 1 if it failed or was cancelled). Live from the job's events when
    the app publishes them (App(events=True)), else by polling."""
    from taskmill.cli.enqueue import finish_waiting, wait_for

    app = env.app()
    app.get_job(job_id)  # JobNotFoundError (exit 1) before any waiting
    finish_waiting(wait_for(env, app, job_id, timeout))
