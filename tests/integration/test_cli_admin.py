"""The admin commands of ``taskmill`` (issue 10): ``jobs list`` paging, filters and its table at
80 columns, ``jobs run``, the exit codes of every ``jobs`` command, ``tasks``, ``purge --all``
and the workers' counters. Real subprocesses on a SQLite file per test (``test_cli.Cli``)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from taskmill import App
from taskmill.testing import wait_until

from .test_cli import Cli, one_error_line, stop, wait_state

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    c = Cli(tmp_path)
    try:
        yield c
    finally:
        c.close()


def on_a_terminal(cli: Cli, *args: str, columns: int, timeout: float = 30.0) -> str:
    """Run ``taskmill ARGS`` on a pseudo-terminal ``columns`` wide; what it showed, without
    escape sequences."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {**cli.env, "COLUMNS": str(columns), "LINES": "50", "TERM": "xterm-256color"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskmill", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        cwd=cli.tmp_path,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=max(0.1, deadline - time.monotonic())) == 0, chunks
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return ANSI.sub("", b"".join(chunks).decode("utf-8", "replace")).replace("\r", "")


def test_jobs_list_is_readable_at_80_columns(cli: Cli) -> None:
    """Bug 8: at 80 columns every column but the id collapsed into a letter or two."""
    ids = [cli.send("add", "[1, 2]"), cli.send("steps", "[3]"), cli.send("add", "[4, 5]")]
    later = cli.send("add", "[6, 7]", "--delay", "600")
    screen = on_a_terminal(cli, "jobs", "list", columns=80)
    assert "…" not in screen, f"a column was cut short:\n{screen}"
    lines = screen.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80, screen
    header = next(line for line in lines if line.startswith("id "))
    shown = header.split()
    assert shown[:3] == ["id", "task", "state"], screen
    for name in ("run", "queue"):  # "run at": the scheduled job's column comes first
        assert name in shown, screen
    for job_id, task in [(ids[0], "add"), (ids[1], "steps"), (later, "add")]:
        row = next(line for line in lines if line.startswith(job_id))
        assert row.split()[1] == task, screen
    row = next(line for line in lines if line.startswith(later))
    assert "scheduled" in row and re.search(r"in (9m5\d|10m00)s", row), screen
    assert "jobs: 4 of 4, newest first" in screen
    assert "not shown at 80 columns:" in screen and "attempt" in screen

    wide = on_a_terminal(cli, "jobs", "list", columns=160)
    header = next(line for line in wide.splitlines() if line.startswith("id "))
    assert header.split() == [
        "id", "task", "state", "run", "at", "queue", "enqueued", "attempt", "prio", "progress",
    ]  # fmt: skip
    assert "not shown" not in wide


def test_jobs_list_pages_filters_and_json(cli: Cli) -> None:
    sent = [cli.send("add", f"[{n}, 1]") for n in range(5)]
    urgent = cli.send("steps", "[2]")
    later = cli.send("add", "[9, 9]", "--delay", "60")
    app = App(cli.url)
    try:
        tagged = app.send_task("add", [7, 7], meta={"user_id": 42, "agent_type": "sum"}).id
    finally:
        app.close()

    # pages of 3, newest first, "3 of 8" and the cursor of the next page on stderr
    seen: list[str] = []
    args = ["jobs", "list", "--limit", "3"]
    while True:
        r = cli.run(*args)
        assert r.returncode == 0, r.stderr
        assert f"jobs: {min(3, 8 - len(seen))} of 8, newest first" in r.stdout
        seen += re.findall(r"^(\S{36}) ", r.stdout, re.MULTILINE)
        match = re.search(r"next page: --cursor (\S+)", r.stderr)
        if match is None:
            break
        args = ["jobs", "list", "--limit", "3", "--cursor", match[1]]
    assert seen == [tagged, later, urgent, *reversed(sent)]

    listing = cli.json("jobs", "list", "--limit", "2")
    assert listing["total"] == 8 and listing["next_cursor"]
    assert [j["id"] for j in listing["jobs"]] == [tagged, later]
    job = listing["jobs"][1]
    for field in ("enqueued_at", "run_at"):
        moment = datetime.fromisoformat(job[field])
        assert moment.tzinfo is not None and moment.utcoffset() == UTC.utcoffset(None)
    assert job["started_at"] is None
    following = cli.json("jobs", "list", "--limit", "2", "--cursor", listing["next_cursor"])
    assert [j["id"] for j in following["jobs"]] == [urgent, sent[-1]]

    assert [j["id"] for j in cli.jobs("--task", "ad", "--limit", "100")] == [
        tagged, later, *reversed(sent),
    ]  # fmt: skip
    assert [j["id"] for j in cli.jobs("--task", "steps")] == [urgent]
    assert [j["id"] for j in cli.jobs("--meta", "user_id=42")] == [tagged]
    assert cli.jobs("--meta", 'user_id="42"') == []
    assert [j["id"] for j in cli.jobs("--meta", "user_id=42", "--meta", "agent_type=sum")] == [
        tagged
    ]
    assert cli.jobs("--meta", "agent_type=other") == []
    assert [j["id"] for j in cli.jobs("--state", "scheduled", "--state", "failed")] == [later]
    assert cli.jobs("--order", "finished") == []
    assert cli.job(tagged)["meta"] == {"user_id": 42, "agent_type": "sum"}
    shown = cli.ok("jobs", "show", tagged)
    assert re.search(r'^meta\s+\{"user_id": 42, "agent_type": "sum"\}$', shown, re.MULTILINE)
    assert "meta" not in cli.ok("jobs", "show", urgent).split()

    worker = cli.spawn("worker", "-c", "4")
    wait_state(cli, urgent, "succeeded")
    wait_state(cli, tagged, "succeeded")
    finished = cli.json("jobs", "list", "--order", "finished", "--limit", "100")
    assert finished["total"] == 7 and later not in [j["id"] for j in finished["jobs"]]
    table = cli.ok("jobs", "list", "--order", "finished")
    assert "latest finished first" in table and "finished" in table.split()
    assert stop(worker) == 0, cli.output()

    for bad, message in [
        (["--cursor", "garbage"], "invalid cursor 'garbage'"),
        (["--cursor", listing["next_cursor"], "--order", "finished"], "invalid cursor"),
        (["--order", "finished", "--state", "queued"], "lists finished jobs only"),
        (["--meta", "user_id"], "expected KEY=VALUE"),
        (["--meta", "bad key=1"], "meta key 'bad key'"),
        (["--limit", "1001"], "1001"),
    ]:
        r = cli.run("jobs", "list", *bad)
        assert r.returncode == 2, (bad, r.stderr)
        assert message in one_error_line(r), (bad, r.stderr)


def test_jobs_commands_keep_the_documented_exit_codes(cli: Cli) -> None:
    """docs/cli.md: 0 when done, 1 for a job that does not exist or is in the wrong state,
    2 for a command line that cannot be used as written."""
    waiting = cli.send("add", "[1, 2]", "--delay", "600")
    assert cli.ok("jobs", "cancel", waiting).strip() == f"{waiting} cancelled"
    # Bug 11: cancelling it again exited 0, reading "cancelled" as if this call did it
    r = cli.run("jobs", "cancel", waiting)
    assert r.returncode == 1 and one_error_line(r) == f"error: job {waiting} already cancelled"
    r = cli.run("jobs", "cancel", waiting, "no-such-id")
    assert r.returncode == 1
    assert one_error_line(r) == (
        f"error: job {waiting} already cancelled; job no-such-id does not exist"
    )
    r = cli.run("jobs", "cancel")
    assert r.returncode == 2 and "Missing argument" in one_error_line(r)

    later = cli.send("add", "[3, 4]", "--delay", "600")
    assert cli.ok("jobs", "run", later).strip() == f"{later} queued: due now"
    assert cli.job(later)["state"] == "queued"
    assert cli.ok("jobs", "run", later).strip() == f"{later} already queued: nothing to do"
    r = cli.run("jobs", "run", waiting)
    assert r.returncode == 1
    assert one_error_line(r) == (
        f"error: job {waiting} is cancelled: only a scheduled job can run now"
    )
    r = cli.run("jobs", "run", "no-such-id")
    assert r.returncode == 1 and "job no-such-id does not exist" in one_error_line(r)
    r = cli.run("jobs", "run")
    assert r.returncode == 2

    for args in (["show", "no-such-id"], ["watch", "no-such-id", "--timeout", "1"]):
        r = cli.run("jobs", *args)
        assert r.returncode == 1, args
        assert "job no-such-id does not exist" in one_error_line(r), args
    r = cli.run("jobs", "retry", later)
    assert r.returncode == 1 and f"job {later} is queued" in one_error_line(r)
    assert cli.ok("jobs", "retry", waiting).split() == [waiting]  # cancelled: retried
    for args in (["retry"], ["retry", waiting, "--all-failed"], ["retry", waiting, "--queue", "q"]):
        r = cli.run("jobs", *args)
        assert r.returncode == 2, args
        one_error_line(r)
    r = cli.run("jobs", "list", "--state", "nonsense")
    assert r.returncode == 2
    assert cli.run("jobs", "list").returncode == 0


def test_tasks_purge_all_and_the_workers_counters(cli: Cli) -> None:
    listed = {t["name"]: t for t in cli.json("tasks")}
    assert sorted(listed) == ["add", "block", "boom", "chatty", "flaky", "steps"]
    assert (listed["steps"]["queue"], listed["steps"]["priority"]) == ("urgent", 5)
    assert listed["boom"]["retries"] == 0 and listed["add"]["schedules"] == []
    table = cli.ok("tasks")
    assert "tasks (6)" in table and "urgent" in table
    env = {k: v for k, v in cli.env.items() if k != "TASKMILL_APP"}
    r = cli.run("tasks", env=env)
    assert r.returncode == 2 and "no app given" in one_error_line(r)

    for n in range(3):
        cli.send("add", f"[{n}, 0]")
    cli.send("steps", "[1]", "--delay", "60")
    r = cli.run("purge", "--all", input="n\n")
    assert r.returncode == 1 and "Delete 4 waiting job(s) of 2 queue(s)?" in r.stderr
    out = cli.ok("purge", "--all", "--yes").splitlines()
    assert sorted(out) == [
        "purged 1 job(s) from queue urgent",
        "purged 3 job(s) from queue default",
    ]
    assert cli.jobs() == []
    for args in ([], ["default", "--all"]):
        r = cli.run("purge", *args)
        assert r.returncode == 2 and "give a QUEUE or --all" in one_error_line(r)

    worker = cli.spawn("worker", "-c", "2")
    ok, bad = cli.send("add", "[1, 1]"), cli.send("boom", '["no"]')
    wait_state(cli, ok, "succeeded")
    wait_state(cli, bad, "failed")

    def counted() -> dict[str, object] | None:
        found = [w for w in cli.json("workers") if w["pid"] == worker.pid]
        return found[0] if found and (found[0]["processed"], found[0]["failed"]) == (2, 1) else None

    wait_until(counted, what="the worker's counters to reach 2 processed, 1 failed", timeout=20)
    table = cli.ok("workers")
    assert "processed" in table and "failed" in table
    assert stop(worker) == 0, cli.output()
    assert json.loads(cli.ok("workers", "--json")) == []
