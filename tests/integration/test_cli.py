"""The ``taskmill`` command line, run as real subprocesses against a SQLite file per test.


Workers are real ``taskmill worker`` processes; every process a test starts is killed (with
its process group) when the test ends. Waiting is done by polling the CLI until a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest

from taskmill.testing import wait_until

HERE = Path(__file__).resolve().parent
T = TypeVar("T")
TASKS = "add, block, boom, chatty, flaky, steps"


class Cli:
    """Runs ``python -m taskmill`` with the test's environment; owns the processes it starts."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.url = f"sqlite:///{tmp_path}/jobs.db"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
        env["TASKMILL_URL"] = self.url
        env["TASKMILL_APP"] = "cliapp:app"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[tuple[Path, IO[bytes]]] = []

    def run(
        self,
        *args: str,
        input: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "taskmill", *args],
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            env=env or self.env,
            cwd=self.tmp_path,
            timeout=timeout,
        )

    def ok(self, *args: str, **kw: Any) -> str:
        r = self.run(*args, **kw)
        assert r.returncode == 0, f"taskmill {' '.join(args)}: rc={r.returncode}\n{r.stderr}"
        return r.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def jobs(self, *args: str) -> list[dict[str, Any]]:
        """The jobs of ``jobs list --json`` (one page)."""
        listed: list[dict[str, Any]] = self.json("jobs", "list", *args)["jobs"]
        return listed

    def job(self, job_id: str) -> dict[str, Any]:
        info: dict[str, Any] = self.json("jobs", "show", job_id)
        return info

    def send(self, task: str, args: str, *options: str) -> str:
        return self.ok("enqueue", task, args, *options).strip()

    def spawn(self, *args: str, name: str = "worker") -> subprocess.Popen[bytes]:
        log_path = self.tmp_path / f"{name}-{len(self.logs)}.log"
        log = log_path.open("wb")
        self.logs.append((log_path, log))
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskmill", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.tmp_path,
            start_new_session=True,  # its own process group: killing it takes its children
        )
        self.procs.append(proc)
        return proc

    def output(self) -> str:
        """Everything the spawned processes printed (for assertion messages)."""
        return "\n".join(f"--- {p.name}\n{p.read_text()}" for p, _ in self.logs)

    def close(self) -> None:
        for proc in self.procs:
            # the whole group, even if its leader is gone: a supervisor's children are in it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for _, log in self.logs:
            log.close()


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    c = Cli(tmp_path)
    try:
        yield c
    finally:
        c.close()


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got:\n{r.stderr}"
    assert lines[0].startswith("error: ")
    assert "Traceback" not in r.stderr
    return lines[0]


def alive_workers(cli: Cli) -> list[dict[str, Any]]:
    return [w for w in cli.json("workers") if w["status"] == "alive"]


def wait_state(cli: Cli, job_id: str, state: str, timeout: float = 20.0) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        info = cli.job(job_id)
        return info if info["state"] == state else None

    return wait_until(check, what=f"job {job_id} to be {state}", timeout=timeout)


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


# --- enqueue ------------------------------------------------------------------------------------


def test_enqueue_wait_runs_on_a_worker(cli: Cli) -> None:
    worker = cli.spawn("worker", "-c", "4")

    out = cli.ok("enqueue", "add", "[2, 3]", "--wait", "--timeout", "20").splitlines()
    assert len(out) == 2 and json.loads(out[1]) == 5

    out = cli.ok("enqueue", "steps", '{"n": 4, "pause_s": 0.01}', "--wait").splitlines()
    assert json.loads(out[1]) == "did 4 steps"
    info = cli.job(out[0])
    assert info["queue"] == "urgent" and info["priority"] == 5
    assert info["progress"] == 1.0 and info["progress_message"] == "step 4 of 4"

    out = cli.ok("enqueue", "flaky", "[1]", "--wait").splitlines()
    assert json.loads(out[1]) == 2  # the first attempt failed, the retry succeeded

    r = cli.run("enqueue", "boom", '["kaput"]', "--wait")
    assert r.returncode == 1
    assert "ValueError: kaput" in one_error_line(r)
    assert stop(worker) == 0, cli.output()


def test_enqueue_options_are_stored(cli: Cli) -> None:
    job_id = cli.send("add", "[1, 2]", "--queue", "bulk", "--priority", "7", "--delay", "60")
    info = cli.job(job_id)
    assert (info["queue"], info["priority"], info["state"]) == ("bulk", 7, "scheduled")
    assert info["payload"] == [[1, 2], {}]

    first = cli.send("add", "[1, 1]", "--key", "k1")
    r = cli.run("enqueue", "add", "[5, 5]", "--key", "k1")
    assert r.returncode == 0 and r.stdout.strip() == first
    assert "already pending" in r.stderr


def test_enqueue_wait_timeout(cli: Cli) -> None:
    r = cli.run("enqueue", "add", "[1, 2]", "--wait", "--timeout", "0.2")  # no worker runs
    assert r.returncode == 1
    assert one_error_line(r).endswith(
        "is still queued after 0.2 s; no worker is consuming queue 'default'"
    )


def test_enqueue_wait_timeout_with_a_worker_on_the_queue_gives_no_hint(cli: Cli) -> None:
    worker = cli.spawn("worker", "-q", "default")
    wait_until(lambda: alive_workers(cli), what="the worker to register", timeout=20)
    cli.ok("queues", "pause", "default")  # the worker takes nothing: the wait times out
    r = cli.run("enqueue", "add", "[1, 2]", "--wait", "--timeout", "0.2")
    assert r.returncode == 1
    assert one_error_line(r).endswith("is still queued after 0.2 s")
    assert stop(worker) == 0, cli.output()


def test_enqueue_external_sends_a_task_the_app_does_not_have(cli: Cli) -> None:
    r = cli.run("enqueue", "billing.charge", "[42]")
    assert r.returncode == 1 and "no task named 'billing.charge'" in one_error_line(r)
    assert cli.jobs() == []
    job_id = cli.send("billing.charge", "[42]", "--external", "--queue", "billing")
    info = cli.job(job_id)
    assert (info["task"], info["queue"], info["payload"]) == (
        "billing.charge",
        "billing",
        [[42], {}],
    )


def test_enqueue_priority_by_name(cli: Cli) -> None:
    by_name = {name: cli.send("add", "[1, 2]", "--priority", name) for name in ("urgent", "low")}
    assert {n: cli.job(i)["priority"] for n, i in by_name.items()} == {"urgent": 100, "low": -50}
    assert cli.job(cli.send("add", "[1, 2]", "--priority", "-7"))["priority"] == -7
    r = cli.run("enqueue", "add", "[1, 2]", "--priority", "asap")
    assert r.returncode == 2
    assert "unknown priority 'asap'" in one_error_line(r)
    assert "urgent (100), high (50), normal (0), low (-50)" in r.stderr


def test_enqueue_reads_arguments_from_a_file_or_standard_input(cli: Cli) -> None:
    (cli.tmp_path / "args.json").write_text('{"a": 20, "b": 22}')
    from_file = cli.send("add", "@args.json")
    from_stdin = cli.ok("enqueue", "add", "-", input="[3, 4]").strip()
    also_stdin = cli.ok("enqueue", "add", "@-", input="[5, 6]").strip()
    assert cli.job(from_file)["payload"] == [[], {"a": 20, "b": 22}]
    assert cli.job(from_stdin)["payload"] == [[3, 4], {}]
    assert cli.job(also_stdin)["payload"] == [[5, 6], {}]
    r = cli.run("enqueue", "add", "@missing.json")
    assert r.returncode == 2
    assert "ARGS_JSON" in one_error_line(r) and "cannot read 'missing.json'" in r.stderr
    r = cli.run("enqueue", "add", "-", input="[1,")
    assert r.returncode == 2 and "not valid JSON" in one_error_line(r)
    assert len(cli.json("jobs", "list")) == 3


def test_worker_given_a_file_path_says_to_use_module_colon_attribute(cli: Cli) -> None:
    r = cli.run("worker", "./cliapp.py")
    assert r.returncode == 2
    assert "'./cliapp.py' is a file path; name the app as module:attribute, e.g. cliapp:app" in (
        one_error_line(r)
    )


def test_unknown_task_is_one_line(cli: Cli) -> None:
    r = cli.run("enqueue", "nope", "[1]")
    assert r.returncode == 1
    assert one_error_line(r) == (
        f"error: no task named 'nope' is registered in this app (known: {TASKS})"
    )
    assert r.stdout == ""


@pytest.mark.parametrize(
    ("args_json", "message"),
    [("[1,", "not valid JSON"), ("3", "JSON array"), ('"x"', "not str")],
)
def test_bad_args_json_is_a_usage_error(cli: Cli, args_json: str, message: str) -> None:
    r = cli.run("enqueue", "add", args_json)
    assert r.returncode == 2
    line = one_error_line(r)
    assert "ARGS_JSON" in line and message in line


@pytest.mark.parametrize(
    ("args_json", "message"),
    [
        ("[1]", "missing a required argument: 'b'"),
        ('{"a": 1, "b": 2, "c": 3}', "unexpected keyword argument 'c'"),
        ("[1, 2, 3]", "too many positional arguments"),
    ],
)
def test_wrong_arguments_name_the_task_and_store_nothing(
    cli: Cli, args_json: str, message: str
) -> None:
    r = cli.run("enqueue", "add", args_json)
    assert r.returncode == 1
    line = one_error_line(r)
    assert line.startswith("error: task 'add': ") and message in line
    assert cli.jobs() == []


def test_url_only_commands_and_app_required_for_worker(cli: Cli) -> None:
    env = {k: v for k, v in cli.env.items() if k != "TASKMILL_APP"}
    env.pop("TASKMILL_URL")
    r = cli.run("enqueue", "elsewhere.task", "[1]", "--url", cli.url, env=env)
    assert r.returncode == 0, r.stderr  # without the app, the job is stored as given
    job_id = r.stdout.strip()
    r = cli.run("--url", cli.url, "jobs", "show", job_id, "--json", env=env)
    assert json.loads(r.stdout)["task"] == "elsewhere.task"

    r = cli.run("--url", cli.url, "worker", env=env)
    assert r.returncode == 2 and "no app given" in one_error_line(r)
    r = cli.run("jobs", "list", env=env)
    assert r.returncode == 2 and "no app or broker given" in one_error_line(r)
    r = cli.run("worker", "no_such_module:app", env=env)
    assert r.returncode == 2 and "cannot import 'no_such_module'" in one_error_line(r)


# --- jobs ---------------------------------------------------------------------------------------


def test_jobs_list_filters_and_show(cli: Cli) -> None:
    a = cli.send("add", "[1, 2]")
    s = cli.send("steps", "[3]")
    listed = cli.jobs()
    assert [j["id"] for j in listed] == [s, a]  # newest first
    assert [j["id"] for j in cli.jobs("--queue", "urgent")] == [s]
    assert [j["id"] for j in cli.jobs("--task", "add")] == [a]
    assert cli.jobs("--state", "failed") == []
    assert len(cli.jobs("--limit", "1")) == 1

    table = cli.ok("jobs", "list")
    assert a in table and s in table and "queued" in table
    shown = cli.ok("jobs", "show", a)
    assert "[1, 2]" in shown and "0 of 4" in shown

    r = cli.run("jobs", "show", "no-such-id")
    assert r.returncode == 1
    assert one_error_line(r) == "error: job no-such-id does not exist (or was pruned)"
    r = cli.run("jobs", "list", "--state", "nonsense")
    assert r.returncode == 2
    one_error_line(r)


def test_failed_jobs_show_the_error_and_retry(cli: Cli) -> None:
    worker = cli.spawn("worker", "-c", "2")
    first = cli.send("boom", '["first"]')
    second = cli.send("boom", '["second"]')
    info = wait_state(cli, first, "failed")
    wait_state(cli, second, "failed")
    assert info["error"]["type"] == "ValueError" and info["error"]["message"] == "first"
    assert "raise ValueError(message)" in info["error"]["traceback"]
    shown = cli.ok("jobs", "show", first)
    assert "error: ValueError: first" in shown and "Traceback" in shown

    assert cli.ok("jobs", "retry", first).split() == [first]
    assert wait_state(cli, first, "failed")["attempt"] == 1  # a fresh budget, spent again

    retried = cli.ok("jobs", "retry", "--all-failed").split()
    assert sorted(retried) == sorted([first, second])

    ok = cli.send("add", "[1, 1]")
    wait_state(cli, ok, "succeeded")
    r = cli.run("jobs", "retry", ok, "missing-id")
    assert r.returncode == 1
    line = one_error_line(r)
    assert f"job {ok} is succeeded" in line and "job missing-id does not exist" in line
    r = cli.run("jobs", "retry")
    assert r.returncode == 2 and "--all-failed" in one_error_line(r)
    assert stop(worker) == 0, cli.output()


def test_cancel_waiting_and_running_jobs(cli: Cli, tmp_path: Path) -> None:
    waiting = cli.send("add", "[1, 2]", "--delay", "60")
    assert cli.ok("jobs", "cancel", waiting).strip() == f"{waiting} cancelled"
    assert cli.job(waiting)["state"] == "cancelled"

    worker = cli.spawn("worker", "-c", "2")
    running = cli.send("block", json.dumps([str(tmp_path / "never")]))
    wait_state(cli, running, "running")
    out = cli.ok("jobs", "cancel", running)
    assert out.strip() == f"{running} running: cancel requested"
    wait_state(cli, running, "cancelled")  # the sync task saw current_job().cancelled

    done = cli.send("add", "[1, 2]")
    wait_state(cli, done, "succeeded")
    r = cli.run("jobs", "cancel", done)
    assert r.returncode == 1 and one_error_line(r) == f"error: job {done} already succeeded"
    r = cli.run("jobs", "cancel", "no-such-id")
    assert r.returncode == 1 and "does not exist" in one_error_line(r)

    assert cli.ok("jobs", "retry", waiting).split() == [waiting]  # cancelled jobs can retry
    wait_state(cli, waiting, "succeeded")
    assert stop(worker) == 0, cli.output()


# --- queues, workers, purge -------------------------------------------------------------------


def queue_stats(cli: Cli) -> dict[str, dict[str, Any]]:
    return {q["queue"]: q for q in cli.json("queues")}


def test_queues_counts_and_pause(cli: Cli) -> None:
    assert {q: s["counts"]["queued"] for q, s in queue_stats(cli).items()} == {
        "default": 0,
        "urgent": 0,
    }  # the app's queues show before any job
    for i in range(3):
        cli.send("add", f"[{i}, 1]")
    cli.send("add", "[9, 9]", "--delay", "60")
    cli.send("steps", "[1]")
    cli.send("steps", "[2]")
    stats = queue_stats(cli)
    assert stats["default"]["counts"]["queued"] == 3
    assert stats["default"]["counts"]["scheduled"] == 1
    assert stats["urgent"]["counts"]["queued"] == 2
    assert stats["default"]["oldest_waiting_s"] >= 0
    table = cli.ok("queues")
    assert "default" in table and "oldest waiting" in table

    assert cli.ok("queues", "pause", "urgent").strip() == "queue urgent paused"
    assert queue_stats(cli)["urgent"]["paused"] is True
    worker = cli.spawn("worker", "-c", "4")
    wait_until(
        lambda: queue_stats(cli)["default"]["counts"]["succeeded"] == 3 or None,
        what="the default queue to drain",
        timeout=20,
    )
    assert queue_stats(cli)["urgent"]["counts"]["queued"] == 2  # paused: not claimed
    cli.ok("queues", "resume", "urgent")
    wait_until(
        lambda: queue_stats(cli)["urgent"]["counts"]["succeeded"] == 2 or None,
        what="the resumed urgent queue to drain",
        timeout=20,
    )
    assert stop(worker) == 0, cli.output()


def test_workers_listing_and_sigterm_drain(cli: Cli, tmp_path: Path) -> None:
    assert cli.json("workers") == []
    worker = cli.spawn("worker", "-c", "3", "-q", "urgent,default")
    (w,) = wait_until(lambda: alive_workers(cli) or None, what="the worker to register", timeout=20)
    assert w["pid"] == worker.pid and w["concurrency"] == 3
    assert w["queues"] == ["urgent", "default"]
    assert str(worker.pid) in cli.ok("workers")

    release = tmp_path / "release"
    job = cli.send("block", json.dumps([str(release)]))
    wait_state(cli, job, "running")
    wait_until(
        lambda: alive_workers(cli)[0]["running"] == 1 or None, what="the running count", timeout=20
    )
    drain_and_release(cli, worker, release, job)
    assert cli.json("workers") == []  # signed off


def drain_and_release(cli: Cli, proc: subprocess.Popen[bytes], release: Path, job_id: str) -> None:
    """SIGTERM ``proc`` while a ``block`` job runs: it must wait for the job, which then ends
    when ``release`` appears, and exit 0 with the job succeeded (drained, not abandoned)."""
    proc.send_signal(signal.SIGTERM)
    wait_until(
        lambda: "draining 1 running jobs" in cli.output() or None,
        what="the worker to start draining",
        timeout=20,
    )
    assert proc.poll() is None, "the worker must wait for its running job"
    release.touch()
    assert proc.wait(timeout=30) == 0, cli.output()
    info = cli.job(job_id)
    assert (info["state"], info["result"]) == ("succeeded", "released")


def test_worker_exits_with_a_task_thread_still_stuck(cli: Cli, tmp_path: Path) -> None:
    worker = cli.spawn("worker", "-c", "2", "--drain-timeout", "0.3")
    job = cli.send("block", json.dumps([str(tmp_path / "never"), 60]))
    wait_state(cli, job, "running")
    assert stop(worker, timeout=15) == 0, cli.output()
    info = cli.job(job)
    assert (info["state"], info["attempt"]) == ("queued", 0)  # handed back, attempt not spent
    assert "still running at shutdown" in cli.output()


def test_purge_asks_first(cli: Cli) -> None:
    for i in range(3):
        cli.send("add", f"[{i}, 0]")
    r = cli.run("purge", "default", input="n\n")
    assert r.returncode == 1 and "Delete 3 waiting job(s)" in r.stderr
    assert len(cli.jobs()) == 3
    r = cli.run("purge", "default", input="y\n")
    assert r.returncode == 0 and "purged 3 job(s)" in r.stdout
    cli.send("add", "[1, 0]")
    assert "purged 1 job(s)" in cli.ok("purge", "default", "--yes")
    assert cli.jobs() == []


# --- supervisor -------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_supervisor_restarts_a_killed_child_and_drains_on_sigterm(cli: Cli) -> None:
    supervisor = cli.spawn("worker", "-p", "2", "-c", "2", name="supervisor")

    def two_alive() -> list[dict[str, Any]] | None:
        found = alive_workers(cli)
        return found if len(found) == 2 else None

    first = wait_until(two_alive, what="two registered workers", timeout=20)
    pids = {w["pid"] for w in first}
    assert supervisor.pid not in pids and len(pids) == 2

    victim = first[0]
    os.kill(victim["pid"], signal.SIGKILL)

    def restarted() -> list[dict[str, Any]] | None:
        found = two_alive()
        if found is None or victim["pid"] in {w["pid"] for w in found}:
            return None
        new = {w["id"] for w in found} - {w["id"] for w in first}
        return found if len(new) == 1 else None

    replaced = wait_until(restarted, what="the supervisor to restart the killed worker", timeout=20)
    assert supervisor.poll() is None
    assert "(killed by SIGKILL); restarting in" in cli.output()

    release = cli.tmp_path / "release"
    job = cli.send("block", json.dumps([str(release)]))
    wait_state(cli, job, "running")
    drain_and_release(cli, supervisor, release, job)
    remaining = {w["id"] for w in cli.json("workers")}
    assert remaining == {victim["id"]}, "the live workers signed off; only the killed one is left"
    assert {w["id"] for w in replaced} & remaining == set()


FORKED = re.compile(r"worker process \d+ started \(pid (\d+), forked\)")
FORK_SERVER = re.compile(r"fork server started \(pid (\d+)\)")


@pytest.mark.timeout(90)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="restarts by fork: Linux only")
def test_after_a_death_the_pool_restarts_its_children_by_fork(cli: Cli) -> None:
    """The first death starts a fork server; once it is ready, replacements are forked from
    it, register, heartbeat and run jobs; a stop ends every process, the fork server too."""
    supervisor = cli.spawn("worker", "-p", "2", "-c", "2", name="supervisor")

    def alive_pids() -> set[int]:
        return {w["pid"] for w in alive_workers(cli)}

    dead: set[int] = set()
    forked = None
    for _ in range(6):  # the first replacement is fresh; so is any before the server is ready
        live = wait_until(
            lambda: p if len(p := alive_pids() - dead) == 2 else None,
            what=lambda: f"two live workers\n{cli.output()}",
            timeout=20,
        )
        victim = min(live)
        os.kill(victim, signal.SIGKILL)
        dead.add(victim)
        wait_until(
            lambda: len(alive_pids() - dead) == 2, what="the replacement to register", timeout=20
        )
        if found := FORKED.search(cli.output()):
            forked = int(found[1])
            break
    assert forked is not None, cli.output()
    server = int(FORK_SERVER.findall(cli.output())[-1])
    assert forked in alive_pids()
    for _ in range(4):  # each child claims some: the forked one runs jobs too
        out = cli.ok("enqueue", "add", "[2, 3]", "--wait", "--timeout", "20").splitlines()
        assert json.loads(out[1]) == 5
    assert supervisor.poll() is None
    assert stop(supervisor) == 0, cli.output()
    for pid in (server, forked):  # the supervisor waited for both before it exited
        assert not Path(f"/proc/{pid}").exists(), cli.output()


@pytest.mark.timeout(60)
def test_schedules_lists_next_runs_and_a_worker_runs_the_ticks(cli: Cli) -> None:
    rows = {r["name"]: r for r in cli.json("schedules", "--app", "cliapp:scheduled")}
    assert set(rows) == {"every-second", "nightly"}
    nightly = rows["nightly"]
    assert nightly["when"] == "cron 0 2 * * * (Europe/Paris)" and nightly["last_tick"] is None
    # 02:00 in Paris is 00:00 or 01:00 UTC (summer or winter time)
    assert len(nightly["next"]) == 3 and all(
        t[11:19] in ("00:00:00", "01:00:00") for t in nightly["next"]
    )
    worker = cli.spawn("worker", "cliapp:scheduled", "-c", "2")

    def ticked() -> dict[str, Any] | None:
        assert worker.poll() is None, cli.output()
        rows = {r["name"]: r for r in cli.json("schedules", "--app", "cliapp:scheduled")}
        every = rows["every-second"]
        return every if every["last_state"] == "succeeded" else None

    every = wait_until(ticked, what="a tick of every-second to succeed", timeout=20)
    assert every["last_tick"] < every["next"][0]
    table = cli.ok("schedules", "--app", "cliapp:scheduled")
    assert "every-second" in table and "nightly" in table
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0


@pytest.mark.timeout(60)
def test_schedules_trigger_sends_a_schedules_job_now(cli: Cli) -> None:
    job_id = cli.ok("schedules", "trigger", "nightly", "--app", "cliapp:scheduled").strip()
    shown = cli.json("jobs", "show", job_id, "--app", "cliapp:scheduled")
    assert (shown["task"], shown["state"]) == ("tick", "queued")
    rows = {r["name"]: r for r in cli.json("schedules", "--app", "cliapp:scheduled")}
    assert rows["nightly"]["last_tick"] is None  # its timetable did not move
    r = cli.run("schedules", "trigger", "weekly", "--app", "cliapp:scheduled")
    assert r.returncode == 1
    assert one_error_line(r) == ("error: no schedule named 'weekly' (known: every-second, nightly)")


@pytest.mark.timeout(30)
def test_scheduler_without_schedules_is_a_usage_error(cli: Cli) -> None:
    r = cli.run("scheduler", "--app", "cliapp:app")
    assert r.returncode == 2
    assert "has no periodic schedules" in one_error_line(r)


@pytest.mark.timeout(60)
def test_enqueue_wait_and_jobs_watch_follow_live_events(cli: Cli) -> None:
    worker = cli.spawn("worker", "cliapp:live", "-c", "2")
    out = cli.ok(
        "enqueue", "live_steps", "[3]", "--wait", "--timeout", "30", "--app", "cliapp:live"
    )
    job_id, result = out.strip().splitlines()
    assert json.loads(result) == "did 3 steps"
    # a finished job: its result at once
    watched = cli.ok("jobs", "watch", job_id, "--app", "cliapp:live", "--timeout", "10")
    assert json.loads(watched) == "did 3 steps"
    r = cli.run("jobs", "watch", "no-such-job", "--app", "cliapp:live")
    assert r.returncode == 1 and "does not exist" in one_error_line(r)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0


def test_worker_logs_json_lines_with_job_fields(cli: Cli) -> None:
    worker = cli.spawn("worker", "-p", "2", "--log-format", "json")
    failed = cli.send("boom", '["kaput"]')
    succeeded = cli.send("add", "[1, 2]")
    log_path = cli.logs[-1][0]

    def entries() -> list[dict[str, Any]]:
        return [json.loads(line) for line in log_path.read_text().splitlines() if line]

    def job_lines() -> list[dict[str, Any]] | None:
        lines = [e for e in entries() if e.get("job_id") in (failed, succeeded)]
        return lines if len(lines) == 2 else None

    lines = wait_until(job_lines, what="a log line for each job", timeout=20)
    by_id = {e["job_id"]: e for e in lines}
    assert by_id[failed]["level"] == "error" and by_id[failed]["task"] == "boom"
    assert by_id[failed]["error"] == "ValueError: kaput"
    assert "raise ValueError(message)" in by_id[failed]["traceback"]
    assert by_id[succeeded]["level"] == "info" and by_id[succeeded]["attempt"] == 1
    assert by_id[succeeded]["duration_s"] >= 0 and by_id[succeeded]["queue"] == "default"
    assert stop(worker) == 0, cli.output()
    assert all(e["pid"] and e["message"] for e in entries())  # every line of every process


@pytest.mark.timeout(60)
def test_jobs_show_reads_the_arguments_of_a_job_sent_with_a_soft_timeout(cli: Cli) -> None:
    from taskmill import App

    with App(cli.url) as app:
        job_id = app.send_task("add", [1, 2], soft_timeout=2.5, timeout=9).id
    shown = cli.ok("jobs", "show", job_id)
    assert "[1, 2]" in shown and "payload" not in shown
    assert "soft timeout  2.5 s" in shown and "timeout       9 s" in shown


def test_enqueue_stores_metadata_that_jobs_list_filters_on(cli: Cli) -> None:
    tagged = cli.send("add", "[1, 2]", "--meta", "user_id=42", "--meta", "created_by=cli")
    cli.send("add", "[3, 4]", "--meta", "user_id=7")
    assert cli.job(tagged)["meta"] == {"user_id": 42, "created_by": "cli"}
    listed = cli.json("jobs", "list", "--meta", "user_id=42")
    assert [j["id"] for j in listed["jobs"]] == [tagged]
    r = cli.run("enqueue", "add", "[1, 2]", "--meta", "no-equals-sign")
    assert r.returncode == 2 and "--meta" in r.stderr


def test_a_task_in_a_process_pool_child_logs_as_the_worker_does(cli: Cli) -> None:
    worker = cli.spawn("worker", "--pool", "process", "-c", "1", "--log-format", "json")
    job_id = cli.send("chatty", '["hello"]')
    log_path = cli.logs[-1][0]

    def said() -> dict[str, Any] | None:
        for line in log_path.read_text().splitlines():
            entry = json.loads(line) if line.startswith("{") else {}
            if entry.get("message") == "the task says hello":
                return entry
        return None

    entry = wait_until(said, what="the child's log line", timeout=30)
    assert entry["logger"] == "cliapp.chatty" and entry["level"] == "info"
    assert entry["pid"] != worker.pid  # written by the child, formatted as the worker's lines
    assert wait_state(cli, job_id, "succeeded")["result"] == "hello"
    assert stop(worker) == 0, cli.output()
