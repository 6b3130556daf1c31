"""taskmill jobs list/show/retry/cancel."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from rich.table import Table
from rich.text import Text

from taskmill.brokers.base import Broker
from taskmill.cli._base import (
    _STATES,
    CliError,
    Env,
    age,
    broker_call,
    cli,
    dumps,
    progress_text,
    state_text,
    target_options,
    when,
)
from taskmill.errors import JobNotFoundError
from taskmill.job import Job, JobState, describe

if TYPE_CHECKING:
    pass

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
    if isinstance(payload, list) and len(payload) in (2, 3):  # [args, kwargs, job options]
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
    options = payload[2] if isinstance(payload, list) and len(payload) == 3 else None
    soft_timeout = options.get("soft_timeout_s") if isinstance(options, dict) else None
    if isinstance(soft_timeout, int | float):  # set by its send; else the worker's task's
        rows.append(("soft timeout", f"{soft_timeout:g} s"))
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
    if broker_call(app, lambda b: b.get(job_id)) is None:
        raise JobNotFoundError(f"job {job_id} does not exist (or was pruned)")
    finish_waiting(wait_for(env, app, job_id, timeout))
