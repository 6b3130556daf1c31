"""``python -m examples.gemini_video [COMMAND]``: GeminiVideo's worker fleet on taskmill.

- ``demo`` (the default): start a throwaway redis-server (unless ``--redis-url``), the fake
  Gemini service, every worker pool and the dashboard with a login; send a workload across
  the pools (with Gemini failures, a time limit overrun and a bad request in it), follow one
  render live, and print a summary per pool and queue; with ``--serve``, then print the
  dashboard's URL and login and stay up until Ctrl-C.
- ``workers [--dashboard-port P]``: the fleet alone (every pool from one ``taskmill worker``
  command, and the dashboard), on ``GEMINI_VIDEO_URL``, until SIGTERM or Ctrl-C.
- ``render PROJECT [--scenes N] [--watch]``: send a render; print its id, and with
  ``--watch`` its progress live until it finishes.
- ``watch JOB_ID``: follow a job's progress live.
- ``workload [--scale N]``: send the demo's mix; print each job as a line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from examples._support.processes import interrupt_on_sigterm
from examples._support.servers import ServerMissingError, ThrowawayRedis, free_port
from examples.gemini_video.fleet import DASHBOARD_USER, POOLS, Fleet, pool_of, run_foreground
from examples.gemini_video.gemini import FakeBehaviour, FakeGemini
from taskmill import Job, JobHandle
from taskmill.errors import TaskmillError

DEMO_TIME_SCALE = "0.01"  # the seed's limits / 100: a caption may take 9 s, a render 36 s
DEADLINE_S = 120.0
REDIS_HINT = "or pass --redis-url redis://HOST:PORT/0"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["demo", *argv]  # the demo's options without its name
    args = parser().parse_args(argv)
    command = args.command or "demo"
    if command == "workers":
        return run_foreground(args.dashboard_port)
    if command == "demo":
        interrupt_on_sigterm()  # cleans up as Ctrl-C does
        try:
            return demo(args.redis_url, args.dashboard_port, args.scale, args.serve)
        except (ServerMissingError, TaskmillError, TimeoutError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    try:
        return client_command(args)
    except TaskmillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def client_command(args: argparse.Namespace) -> int:
    """``render``, ``watch`` and ``workload``: a client of a running fleet."""
    from examples.gemini_video import client
    from examples.gemini_video.app import app, render_video

    with app:
        if args.command == "render":
            handle = render_video.send(args.project, args.scenes)
            print(handle.id, flush=True)
            return client.follow(app, handle.id, echo) if args.watch else 0
        if args.command == "watch":
            return client.follow(app, args.job_id, echo)
        for handle in client.send_workload(args.scale):
            job = handle.info()
            echo(json.dumps({"id": job.id, "task": job.task, "queue": job.queue}))
        return 0


def echo(line: str) -> None:
    print(line, flush=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m examples.gemini_video",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command")
    demo_p = sub.add_parser("demo", help="the whole demo (the default)")
    demo_p.add_argument(
        "--redis-url",
        default=os.environ.get("GEMINI_VIDEO_REDIS"),
        help="a Redis to use (default: start a throwaway redis-server)",
    )
    demo_p.add_argument("--dashboard-port", type=int, default=0, help="0: a free port")
    demo_p.add_argument("--scale", type=positive, default=4, help="how many of each kind of job")
    demo_p.add_argument("--serve", action="store_true", help="keep serving until Ctrl-C")
    workers_p = sub.add_parser("workers", help="every worker pool, from one command")
    workers_p.add_argument(
        "--dashboard-port",
        type=int,
        default=None,
        help="also serve the dashboard (login: GEMINI_VIDEO_DASHBOARD_PASSWORD)",
    )
    render_p = sub.add_parser("render", help="send a render")
    render_p.add_argument("project")
    render_p.add_argument("--scenes", type=positive, default=3)
    render_p.add_argument("--watch", action="store_true", help="follow its progress live")
    watch_p = sub.add_parser("watch", help="follow a job's progress live")
    watch_p.add_argument("job_id")
    workload_p = sub.add_parser("workload", help="send the demo's mix of jobs")
    workload_p.add_argument("--scale", type=positive, default=1)
    p.set_defaults(redis_url=None, dashboard_port=0, scale=4, serve=False)
    return p


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1, not {text!r}")
    return value


def demo(redis_url: str | None, dashboard_port: int, scale: int, serve: bool) -> int:
    console = Console(width=None if sys.stdout.isatty() else 120)
    with ExitStack() as stack:
        if not redis_url:
            redis_url = stack.enter_context(ThrowawayRedis(hint=REDIS_HINT)).url
            console.print(f"started a throwaway redis-server at {redis_url}")
        fake = FakeGemini(FakeBehaviour(rate_429=0.08, rate_500=0.05, rate_timeout=0.03, hang_s=5))
        stack.callback(fake.start().stop)
        fake.script("campaign-flaky", ["429", "500"])  # fails twice, then draws its scenes
        fake.outage("campaign-outage", True)  # Gemini down for this one: it fails for good
        password, password_file = dashboard_password(stack)
        port = dashboard_port or free_port()
        sep = "&" if "?" in redis_url else "?"
        os.environ.update(
            {
                "GEMINI_VIDEO_URL": f"{redis_url}{sep}prefix=gemini-video-{secrets.token_hex(3)}:",
                "GEMINI_API_URL": fake.url,
                "GEMINI_VIDEO_TIME_SCALE": os.environ.get(
                    "GEMINI_VIDEO_TIME_SCALE", DEMO_TIME_SCALE
                ),
                "GEMINI_VIDEO_DASHBOARD_PASSWORD": password,
            }
        )
        from examples.gemini_video import app as tasks  # reads the settings just made
        from examples.gemini_video.client import follow, send_workload

        stack.callback(tasks.app.close)
        log = stack.enter_context(tempfile.TemporaryFile())
        fleet = Fleet(dashboard_port=port, password=password).start(log)
        stack.callback(fleet.stop)
        count = fleet.wait_ready(tasks.app)
        console.print(
            f"[bold]GeminiVideo on taskmill[/bold]: {count} worker processes in "
            f"{len(POOLS)} pools, from one `taskmill worker` command"
        )
        handles = send_workload(scale)
        flaky = tasks.render_video.send("campaign-flaky", 3)
        handles += [
            flaky,
            tasks.render_video.send("campaign-outage", 2),
            tasks.render_video.options(priority="urgent").send("campaign-rush", 2),
            tasks.generate_captions.send("keynote-3h", 3 * 3600.0),  # overruns its time limit
            tasks.transcode.send("video-x", "mpeg1"),  # a bad request: fails at once
            *(tasks.app.trigger_schedule(name) for name in tasks.app.schedules),
        ]
        console.print(
            f"sent {len(handles)} jobs; following {flaky.id} live (Gemini fails it twice):"
        )
        follow(tasks.app, flaky.id, lambda line: console.print("  " + line, highlight=False))
        jobs = wait_finished(handles, fleet)
        console.print(summary(jobs, tasks.app.workers()))
        console.print(f"fake Gemini answered: {dict(sorted(fake.answered.items()))}")
        if serve:
            tell_where(console, port, password_file, os.environ["GEMINI_VIDEO_URL"])
            wait_for_interrupt(fleet)
        else:
            console.print(
                "run with --serve to keep Redis, the pools and the dashboard (with a "
                "login) up, and look at the failed jobs there"
            )
    return 0


def dashboard_password(stack: ExitStack) -> tuple[str, Path | None]:
    """The login's password: ``GEMINI_VIDEO_DASHBOARD_PASSWORD``, or one made for this run and
    kept in a file only its owner reads (a password is not printed)."""
    given = os.environ.get("GEMINI_VIDEO_DASHBOARD_PASSWORD")
    if given:
        return given, None
    password = secrets.token_urlsafe(12)
    directory = Path(tempfile.mkdtemp(prefix="gemini-video-"))
    path = directory / "dashboard-password"
    path.touch(mode=0o600)
    path.write_text(password + "\n")
    stack.callback(shutil.rmtree, directory, ignore_errors=True)
    return password, path


def wait_finished(handles: list[JobHandle[Any]], fleet: Fleet) -> list[Job]:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        jobs = [h.info() for h in handles]
        if all(j.state.finished for j in jobs):
            return jobs
        fleet.check_running()
        if time.monotonic() > deadline:
            left = [j.id for j in jobs if not j.state.finished]
            raise TimeoutError(f"{len(left)} jobs unfinished after {DEADLINE_S:.0f} s: {left}")
        time.sleep(0.25)


def summary(jobs: list[Job], workers: list[Any]) -> Table:
    """Per pool and queue: jobs, outcomes, retries, time limits hit, processes that ran them."""
    pid_of = {w.id: w.pid for w in workers}
    rows: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    pids: dict[tuple[str, str], set[int]] = defaultdict(set)
    for job in jobs:
        key = (pool_of(next(p.queues for p in POOLS if job.queue in p.queues)), job.queue)
        row = rows[key]
        row["jobs"] += 1
        row[job.state.value] += 1
        row["retries"] += max(0, job.attempt - 1)
        row["timed out"] += bool(job.error and job.error.type.endswith("TaskTimeoutError"))
        if job.worker_id in pid_of:
            pids[key].add(pid_of[job.worker_id])
    table = Table(title="summary", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("pool", "queue", "jobs", "succeeded", "failed", "retries", "timed out", "pids"):
        table.add_column(column, justify="left" if column in ("pool", "queue") else "right")
    for (pool, queue), row in sorted(rows.items()):
        failed = row["failed"]
        table.add_row(
            pool,
            queue,
            str(row["jobs"]),
            str(row["succeeded"]),
            f"[red]{failed}[/red]" if failed else "0",
            str(row["retries"]),
            str(row["timed out"]),
            ",".join(map(str, sorted(pids[(pool, queue)]))),
        )
    return table


def tell_where(console: Console, port: int, password_file: Path | None, url: str) -> None:
    where = f"cat {password_file}" if password_file else "GEMINI_VIDEO_DASHBOARD_PASSWORD"
    console.print(
        f"dashboard: http://127.0.0.1:{port}/  login: {DASHBOARD_USER}, password: {where}\n"
        "serving until Ctrl-C; the failed jobs stay visible and retryable; try:\n"
        f"  taskmill jobs list --state failed --url '{url}'\n"
        f"  taskmill workers --url '{url}'\n"
        f"  taskmill ping --name gemini-video --url '{url}'",
        soft_wrap=True,
        highlight=False,
    )


def wait_for_interrupt(fleet: Fleet) -> None:
    try:
        while True:
            fleet.check_running()
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
