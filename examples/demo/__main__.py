"""``make demo``: send a few hundred jobs, run them on two worker processes, summarise.

1. delete the demo database and send ~420 jobs over the ``urgent`` and ``default`` queues
   (``send_many`` batches, plus single sends with a delay, a priority and a unique key);
2. start ``taskmill worker examples.demo.app:app -p 2 -c 8`` as a subprocess;
3. show the counts by state, live, until every job has finished;
4. SIGTERM the workers (they drain and exit), then print a summary per task.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import IO, Any

from rich import box
from rich.console import Console, Group, JustifyMethod
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from examples.demo.app import (
    DB_PATH,
    app,
    build_report,
    charge_card,
    resize_image,
    send_receipt,
    sync_inventory,
)
from taskmill import Job, JobHandle, JobState

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 50.0
STATES = [s.value for s in JobState]
FINISHED = {s.value for s in JobState if s.finished}


def reset_database() -> None:
    os.makedirs(os.path.dirname(DB_PATH), exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(DB_PATH + suffix).unlink(missing_ok=True)


def send_jobs() -> set[str]:
    """Every kind of send; returns the distinct job ids."""
    rng = random.Random(7)
    handles: list[JobHandle[Any]] = []
    handles += resize_image.send_many([(i, rng.randint(2, 5)) for i in range(120)])
    handles += send_receipt.send_many([(order,) for order in range(1, 101)])
    handles += charge_card.send_many([(order, rng.randint(500, 9000)) for order in range(1, 81)])
    handles += sync_inventory.send_many([{"sku": f"SKU-{n:05d}"} for n in range(100)])
    handles += build_report.send_many([(day,) for day in range(1, 6)])
    # single sends with options: a VIP receipt jumps the queue, some resizes wait a second
    handles.append(send_receipt.options(priority=50).send(9001))
    handles += [resize_image.options(delay=1.0).send(1000 + i, 2) for i in range(10)]
    # a unique key: the second send returns the job the first one stored
    first = charge_card.options(key="order-7777").send(7777, 12_500)
    again = charge_card.options(key="order-7777").send(7777, 12_500)
    assert again.id == first.id and again.existing
    handles += [first, again]
    return {h.id for h in handles}


def counts_by_queue() -> dict[str, dict[str, int]]:
    async def stats() -> dict[str, dict[str, int]]:
        broker = await app.abroker()
        return {s.queue: s.counts for s in await broker.stats()}

    return app.run_sync(stats())


def state_table(counts: dict[str, dict[str, int]]) -> Table:
    table = Table(title="jobs by state", title_justify="left")
    table.add_column("queue")
    for state in STATES:
        table.add_column(state, justify="right")
    totals = dict.fromkeys(STATES, 0)
    for queue in sorted(counts):
        table.add_row(queue, *(str(counts[queue].get(s, 0)) for s in STATES))
        for s in STATES:
            totals[s] += counts[queue].get(s, 0)
    table.add_row("all", *(str(totals[s]) for s in STATES), style="bold")
    return table


def watch(console: Console, total: int, workers: subprocess.Popen[bytes]) -> float:
    """Live counts until every job finished; returns the seconds it took."""
    bar = Progress(
        TextColumn("finished"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    task = bar.add_task("jobs", total=total)
    started = time.monotonic()
    counts = counts_by_queue()
    with Live(Group(bar, state_table(counts)), console=console, refresh_per_second=8) as live:
        while True:
            counts = counts_by_queue()
            finished = sum(n for c in counts.values() for s, n in c.items() if s in FINISHED)
            bar.update(task, completed=finished)
            live.update(Group(bar, state_table(counts)))
            if finished >= total:
                break
            if workers.poll() is not None:
                raise RuntimeError(f"the workers exited early (exit code {workers.returncode})")
            if time.monotonic() - started > DEADLINE_S:
                raise RuntimeError(f"not every job finished within {DEADLINE_S:.0f} s")
            time.sleep(0.15)
    console.line()
    return time.monotonic() - started


def all_jobs(limit: int) -> list[Job]:
    async def fetch() -> list[Job]:
        broker = await app.abroker()
        return await broker.list_jobs(limit=limit)

    return app.run_sync(fetch())


def summary(jobs: list[Job], wall_s: float) -> Table:
    by_task: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        by_task[job.task.rsplit(".", 1)[-1]].append(job)
    table = Table(
        title="summary",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    columns: list[tuple[str, JustifyMethod]] = [
        ("task", "left"),
        ("jobs", "right"),
        ("ok", "right"),
        ("failed", "right"),
        ("retries", "right"),
        ("wait p50", "right"),
        ("jobs/s", "right"),
        ("wall", "right"),
    ]
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=True)
    for name, group in sorted(by_task.items()):
        ok = sum(j.state is JobState.SUCCEEDED for j in group)
        failed = sum(j.state is JobState.FAILED for j in group)
        retries = sum(max(0, j.attempt - 1) for j in group)
        # time to first start, over jobs that ran once (a retry's start includes its back-off)
        waits = [j.started_at - j.run_at for j in group if j.attempt == 1 and j.started_at]
        first = min((j.started_at for j in group if j.started_at), default=0.0)
        last = max((j.finished_at for j in group if j.finished_at), default=first)
        span = max(last - first, 1e-6)
        table.add_row(
            f"{name} ({group[0].queue})",
            str(len(group)),
            str(ok),
            f"[red]{failed}[/red]" if failed else "0",
            str(retries),
            f"{statistics.median(waits):.2f} s" if waits else "-",
            f"{len(group) / span:.0f}",
            f"{span:.2f} s",
        )
    ok = sum(j.state is JobState.SUCCEEDED for j in jobs)
    failed = sum(j.state is JobState.FAILED for j in jobs)
    retries = sum(max(0, j.attempt - 1) for j in jobs)
    table.add_row(
        "all",
        str(len(jobs)),
        str(ok),
        str(failed),
        str(retries),
        "",
        f"{len(jobs) / wall_s:.0f}",
        f"{wall_s:.2f} s",
        style="bold",
    )
    return table


def start_workers(log: IO[bytes]) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["TASKMILL_DEMO_DB"] = DB_PATH  # the children must open the same file
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    argv = [
        sys.executable, "-m", "taskmill", "worker", "examples.demo.app:app",
        "-p", "2", "-c", "8", "--log-level", "warning",
    ]  # fmt: skip
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def main() -> int:
    # piped (CI, a log file): wide enough that the summary table is not squeezed
    console = Console(width=None if sys.stdout.isatty() else 120)
    reset_database()
    t0 = time.monotonic()
    ids = send_jobs()
    sent_s = time.monotonic() - t0
    console.print(
        f"[bold]taskmill demo[/bold]: sent {len(ids)} jobs in {sent_s * 1000:.0f} ms to "
        f"{app.url}; starting 2 worker processes x 8 slots"
    )
    # worker logs go to a file: they would tear the live view
    with tempfile.TemporaryFile() as log:
        workers = start_workers(log)
        try:
            wall_s = watch(console, len(ids), workers)
            workers.send_signal(signal.SIGTERM)  # drain and exit
            code = workers.wait(timeout=30)
        except BaseException as exc:
            workers.kill()
            workers.wait()
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
            if isinstance(exc, Exception):
                console.print(f"[red]demo failed: {exc}[/red]")
                return 1
            raise
        if code != 0:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
            console.print(f"[red]the workers exited with code {code}[/red]")
            return 1
    jobs = all_jobs(limit=len(ids) + 10)
    app.close()
    console.print(summary(jobs, wall_s))
    console.print(
        "The failed jobs stay inspectable and retryable:\n"
        f"  {taskmill_command()} jobs list --state failed --url {app.url}",
        soft_wrap=True,
    )
    return 0


def taskmill_command() -> str:
    """How to run ``taskmill`` from this shell: by name if it is on the PATH, else by the path
    of the script beside this interpreter (``make demo`` does not activate .venv)."""
    script = os.path.join(os.path.dirname(sys.executable), "taskmill")
    on_path = shutil.which("taskmill")
    if on_path and os.path.realpath(on_path) == os.path.realpath(script):
        return "taskmill"
    if os.path.exists(script):
        return os.path.relpath(script) if not os.path.relpath(script).startswith("..") else script
    return f"{sys.executable} -m taskmill"


if __name__ == "__main__":
    sys.exit(main())
