"""The yachtparty task processor (``examples/yachtparty``, seed 003) end to end: its HTTP
endpoints served by uvicorn on a loopback port, real ``taskmill worker`` processes, the
session's PostgreSQL (a database of each test's own), and the fake external services with
injected faults.

A minute of the retry policy lasts ``MINUTE_S`` here (``YACHTPARTY_MINUTE_S``): the policy
keeps its shape, 1, 2 and 4 minutes, and only the minute is shorter.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from examples._support.serving import Served, serve
from examples.yachtparty.config import Config
from examples.yachtparty.services import fake_services
from examples.yachtparty.tasks import Processor, build
from examples.yachtparty.web import create_web

from servers import PostgresServer
from taskmill.testing import wait_until

ROOT = Path(__file__).resolve().parents[2]


MINUTE_S = 0.2
FINISHED = ("succeeded", "failed", "cancelled")


@dataclass
class Yacht:
    """One processor: its web service, the fake services, and the workers a test starts."""

    config: Config
    processor: Processor
    api: httpx.Client
    services: httpx.Client
    tmp_path: Path
    workers: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = field(default_factory=list)

    def start_worker(self, *args: str) -> subprocess.Popen[bytes]:
        """``taskmill worker examples.yachtparty.worker:app``, registered when this returns."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKMILL_", "YACHT"))}
        env.update(self.config.to_env())
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        log = (self.tmp_path / f"worker-{len(self.workers)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskmill", "worker", "examples.yachtparty.worker:app",
             "--log-level", "warning", *args],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True,
        )  # fmt: skip
        self.workers.append((proc, log))

        def registered() -> bool:
            assert proc.poll() is None, f"the worker exited early:\n{self.worker_logs()}"
            return any(w.pid == proc.pid for w in self.processor.app.workers())

        wait_until(registered, timeout=30, what=f"worker {proc.pid} to register")
        return proc

    def worker_logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()}" for p in sorted(self.tmp_path.glob("worker-*.log"))
        )

    def kill_workers(self) -> None:
        for proc, log in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            log.close()
        self.workers.clear()

    def send(self, task_type: str, user_id: str, context: dict[str, Any], **more: Any) -> str:
        reply = self.api.post(
            "/tasks", json={"task_type": task_type, "user_id": user_id, "context": context, **more}
        )
        assert reply.status_code == 201, reply.text
        return str(reply.json()["task_id"])

    def task(self, task_id: str) -> dict[str, Any]:
        reply = self.api.get(f"/tasks/{task_id}")
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    def wait_status(self, task_id: str, status: str, timeout: float = 20) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            task = self.task(task_id)
            if task["status"] in FINISHED and task["status"] != status:
                raise AssertionError(f"task ended {task['status']}, not {status}: {task}")
            return task if task["status"] == status else None

        return wait_until(
            reached, timeout=timeout, interval=0.05,
            what=lambda: f"task {task_id} to be {status}\n{self.worker_logs()}",
        )  # fmt: skip

    def health(self) -> dict[str, Any]:
        reply = self.api.get("/health")
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    def add_users(self, *user_ids: str) -> None:
        for user_id in user_ids:
            reply = self.api.post("/users", json={"id": user_id, "name": user_id.title()})
            assert reply.status_code == 201, reply.text

    def inject(self, path: str, user_id: str, *errors: str) -> None:
        reply = self.services.post(
            "/faults", json={"path": path, "user_id": user_id, "errors": list(errors)}
        )
        assert reply.status_code == 200, reply.text

    def calls(self) -> dict[str, dict[str, int]]:
        return dict(self.services.get("/calls").json())


@pytest.fixture
def make_yacht(postgres_server: PostgresServer, tmp_path: Path) -> Iterator[Callable[..., Yacht]]:
    """``make_yacht(**config)``: a processor on a database of its own (``Config`` fields
    override the test defaults); everything stops, and the database goes, at teardown."""
    stack = contextlib.ExitStack()

    def make(hang_s: float = 5.0, **settings: Any) -> Yacht:
        name = f"yacht_{uuid.uuid4().hex[:12]}"
        url = postgres_server.create_database(name)
        stack.callback(_drop_database, postgres_server, name)
        fake: Served = serve(fake_services(hang_s=hang_s))
        stack.callback(fake.stop)
        defaults = Config(url, services_url=fake.url, minute_s=MINUTE_S, http_timeout_s=1.0)
        config = replace(defaults, **settings)
        processor = build(config)
        stack.callback(processor.close)
        web = serve(create_web(processor))
        stack.callback(web.stop)
        api = stack.enter_context(httpx.Client(base_url=web.url, timeout=15))
        services = stack.enter_context(httpx.Client(base_url=fake.url, timeout=15))
        yacht = Yacht(config, processor, api, services, tmp_path)
        stack.callback(yacht.kill_workers)
        return yacht

    with stack:
        yield make


def _drop_database(server: PostgresServer, name: str) -> None:
    with server.connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


# --- the cases ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_due_task_runs_and_is_logged_with_its_latency(make_yacht: Callable[..., Yacht]) -> None:
    yacht = make_yacht()
    yacht.add_users("alice")
    yacht.start_worker("-c", "4")
    research = yacht.send("research_solution", "alice", {"description": "a CRM for 12 people"})
    followup = yacht.send(
        "schedule_followup", "alice", {"message": "How was the demo?"}, delay_s=0.5
    )

    done = yacht.wait_status(research, "succeeded")
    assert done["result"]["event_id"] and done["attempt"] == 1
    (action,) = done["actions"]
    assert action["action_type"] == "process_research_solution"
    assert action["outcome"] == "succeeded" and action["attempt"] == 1
    assert action["latency_ms"] > 0 and action["wait_ms"] is not None
    later = yacht.wait_status(followup, "succeeded")
    assert _at(later["started_at"]) >= _at(later["scheduled_for"])  # not before it was due
    assert later["result"]["sid"].startswith("SM")
    # the followup's message, written by the handler under the job's id
    messages = yacht.api.get("/users/alice").json()["messages"]
    assert messages == [{"direction": "outbound", "body": "How was the demo?", "job_id": followup}]

    health = yacht.health()
    assert health["status"] == "healthy" and health["workers"] == {"alive": 1, "lost": 0}
    assert health["stats"]["tasksSucceeded"] == 2 and health["stats"]["tasksFailed"] == 0
    assert health["stats"]["successRate"] == "100.0%"
    assert health["byType"]["research_solution"]["succeeded"] == 1
    assert health["byType"]["research_solution"]["latencyMs"]["max"] > 0
    assert health["queue"]["counts"]["succeeded"] == 2
    assert yacht.calls()["calls"] == {"/events": 1, "/sms": 1}


@pytest.mark.timeout(60)
def test_urgent_runs_before_low_when_both_are_due(make_yacht: Callable[..., Yacht]) -> None:
    yacht = make_yacht()
    yacht.add_users("bob")
    yacht.start_worker("-c", "1")  # one slot: the claim order is the run order
    due = (datetime.now(UTC) + timedelta(seconds=2.5)).isoformat()  # after all four sends
    order = ["low", "medium", "high", "urgent"]  # sent lowest first
    ids = {
        p: yacht.send("research_solution", "bob", {"description": p}, priority=p, scheduled_for=due)
        for p in order
    }
    assert {yacht.task(i)["status"] for i in ids.values()} == {"scheduled"}
    tasks = {p: yacht.wait_status(i, "succeeded") for p, i in ids.items()}
    started = sorted(order, key=lambda p: _at(tasks[p]["started_at"]))
    assert started == ["urgent", "high", "medium", "low"]
    assert all(_at(t["started_at"]) >= _at(due) for t in tasks.values())


@pytest.mark.timeout(60)
def test_trigger_poll_runs_future_tasks_now(make_yacht: Callable[..., Yacht]) -> None:
    yacht = make_yacht()
    yacht.add_users("carol")
    yacht.start_worker("-c", "4")
    in_an_hour = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    research = yacht.send(
        "research_solution", "carol", {"description": "hiring"}, scheduled_for=in_an_hour
    )
    # carol never wrote: the check nudges her, and schedules the next check a day later
    check = yacht.send("re_engagement_check", "carol", {})
    first = yacht.wait_status(check, "succeeded")
    assert first["result"] == {"action": "nudged", "attempt": 1}
    assert yacht.task(research)["status"] == "scheduled"

    reply = yacht.api.post("/trigger-poll").json()
    assert reply["success"] and len(reply["task_ids"]) == 2 and research in reply["task_ids"]
    ran = yacht.wait_status(research, "succeeded")
    assert _at(ran["started_at"]) < _at(in_an_hour) - 3000  # an hour early
    (second,) = [t for t in reply["task_ids"] if t != research]
    assert yacht.wait_status(second, "succeeded")["result"] == {"action": "nudged", "attempt": 2}
    # the third check pauses the conversation; /process-task makes one task due now
    (third,) = yacht.api.post("/trigger-poll").json()["task_ids"]
    assert yacht.wait_status(third, "succeeded")["result"] == {"action": "paused"}
    carol = yacht.api.get("/users/carol").json()
    assert carol["conversation_paused"] is True
    assert [m["job_id"] for m in carol["messages"]] == [check, second]  # one nudge per check

    reply = yacht.api.post("/process-task", json={"task_id": research})
    assert reply.status_code == 409 and "completed already" in reply.json()["error"]
    later = yacht.send("research_solution", "carol", {"description": "x"}, delay_s=3600)
    assert yacht.api.post("/process-task", json={"task_id": later}).json()["action"] == "run_now"
    yacht.wait_status(later, "succeeded")
    assert yacht.api.post("/trigger-poll").json()["task_ids"] == []


@pytest.mark.timeout(60)
def test_a_failing_service_is_retried_at_1_2_4_minutes(make_yacht: Callable[..., Yacht]) -> None:
    yacht = make_yacht(minute_s=0.5)
    yacht.add_users("dave")
    yacht.start_worker("-c", "4")
    yacht.inject("/events", "dave", "500", "429", "timeout")
    task_id = yacht.send("research_solution", "dave", {"description": "pricing"}, priority="high")

    done = yacht.wait_status(task_id, "succeeded", timeout=30)
    assert done["attempt"] == 4 and done["max_attempts"] == 4
    actions = done["actions"]
    assert [a["outcome"] for a in actions] == ["retrying"] * 3 + ["succeeded"]
    assert [a["attempt"] for a in actions] == [1, 2, 3, 4]
    errors = [a["error"] for a in actions[:3]]
    assert "answered 500" in errors[0] and "answered 429" in errors[1]
    assert "did not answer within 1.0 s" in errors[2]
    # each retry was due 1, 2 and 4 minutes after the attempt before it failed: give or take
    # a moment, as the log row is written by a hook just after the outcome is decided, and
    # the outcome's write a moment later again (the database counts the delay from its own
    # clock); the margin is half a minute, and the three delays' ranges do not overlap
    for n, (before, after) in enumerate(itertools.pairwise(actions)):
        due_after_s = after["scheduled_for"] - before["logged_at"]
        assert abs(due_after_s - 0.5 * 2**n) <= 0.25, (n, actions)
        assert after["started_at"] >= after["scheduled_for"]
    assert yacht.calls()["calls"]["/events"] == 4
    stats = yacht.health()["stats"]
    assert (stats["tasksRetried"], stats["tasksSucceeded"], stats["tasksFailed"]) == (3, 1, 0)


@pytest.mark.timeout(60)
def test_a_permanent_failure_shows_and_is_retried_to_success(
    make_yacht: Callable[..., Yacht],
) -> None:
    yacht = make_yacht()
    yacht.add_users("erin")
    yacht.start_worker("-c", "4")
    yacht.inject("/sms", "erin", *["503"] * 4)  # down for every attempt
    followup = yacht.send("schedule_followup", "erin", {"message": "Still keen on the intro?"})
    bad = yacht.send("update_user_profile", "erin", {"fields": {"is_admin": "true"}})

    failed = yacht.wait_status(followup, "failed", timeout=30)
    assert failed["attempt"] == 4 and failed["error"].endswith("ServiceError: /sms answered 503")
    outcomes = [a["outcome"] for a in failed["actions"]]
    assert outcomes == ["retrying"] * 3 + ["failed"], yacht.worker_logs()
    refused = yacht.wait_status(bad, "failed")  # not retryable: one attempt
    assert refused["attempt"] == 1 and "is_admin may not be set" in refused["error"]
    health = yacht.health()
    assert health["queue"]["counts"]["failed"] == 2
    assert health["stats"]["tasksFailed"] == 2, yacht.worker_logs()
    assert health["stats"]["successRate"] == "0.0%"
    assert health["byType"]["schedule_followup"] == {"retrying": 3, "failed": 1}

    # the gateway is back: the webhook retries it, with a fresh budget of attempts
    reply = yacht.api.post("/process-task", json={"task_id": followup})
    assert reply.json() == {"success": True, "taskId": followup, "action": "retried"}
    done = yacht.wait_status(followup, "succeeded")
    assert done["result"]["sid"].startswith("SM")
    assert yacht.health()["queue"]["counts"]["failed"] == 1  # the bad profile update
    # five runs, one message: the handler's write is keyed by the job's id
    assert len(yacht.api.get("/users/erin").json()["messages"]) == 1
    assert yacht.calls()["calls"]["/sms"] == 5


@pytest.mark.timeout(60)
def test_a_task_of_a_killed_worker_completes_on_another(make_yacht: Callable[..., Yacht]) -> None:
    # a short lease, so that the dead worker's claim expires in seconds; a long HTTP timeout,
    # so that the call is still in flight when the worker dies
    yacht = make_yacht(lease_s=2.0, http_timeout_s=30.0, hang_s=5.0)
    yacht.add_users("frank")
    first = yacht.start_worker("-c", "2")
    yacht.inject("/events", "frank", "timeout")
    task_id = yacht.send("research_solution", "frank", {"description": "fundraising"})
    wait_until(
        lambda: yacht.calls()["in_flight"].get("/events") == 1,
        timeout=20, what="the handler's call to be in flight",
    )  # fmt: skip
    assert yacht.task(task_id)["status"] == "running"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=10)

    yacht.start_worker("-c", "2")
    done = yacht.wait_status(task_id, "succeeded", timeout=30)
    assert done["lost_leases"] == 1 and done["attempt"] == 2  # the killed run counts
    assert [a["outcome"] for a in done["actions"]] == ["succeeded"]  # the killed run logged none
    assert yacht.calls()["calls"]["/events"] == 2
    # and /health tells the dead worker from the live one, once it missed its heartbeats
    wait_until(
        lambda: yacht.health()["workers"] == {"alive": 1, "lost": 1},
        timeout=15, what=lambda: f"one worker lost: {yacht.health()['workers']}",
    )  # fmt: skip


@pytest.mark.timeout(60)
def test_a_message_and_its_job_commit_or_roll_back_together(
    make_yacht: Callable[..., Yacht],
) -> None:
    yacht = make_yacht()
    yacht.add_users("gina")
    reply = yacht.api.post("/messages", json={"user_id": "gina", "body": "hello"})
    assert reply.status_code == 201, reply.text
    check = reply.json()["task_id"]
    assert yacht.task(check)["status"] == "scheduled"  # due in a (short) day
    assert [m["body"] for m in yacht.api.get("/users/gina").json()["messages"]] == ["hello"]
    again = yacht.api.post("/messages", json={"user_id": "gina", "body": "anyone?"}).json()
    assert again["task_id"] == check  # one pending check per user

    numbers_before = _numbers_used(yacht)
    # no such user: the deferred foreign key fails the COMMIT, after both rows were written
    reply = yacht.api.post("/messages", json={"user_id": "nobody", "body": "hi"})
    assert reply.status_code == 404 and reply.json()["error"] == "no user 'nobody'"
    assert yacht.processor.app.list_jobs(meta={"user_id": "nobody"}).total == 0
    assert yacht.processor.app.list_jobs().total == 1
    with yacht.processor.db.connection() as conn:
        row = conn.execute("SELECT count(*) FROM messages WHERE user_id = 'nobody'").fetchone()
    assert row == (0,)
    # both rows were inserted, and the failed COMMIT took both back: a sequence is not
    # transactional, so each insert that ran used up a number of its table's sequence
    assert _numbers_used(yacht) == (numbers_before[0] + 1, numbers_before[1] + 1)


def _numbers_used(yacht: Yacht) -> tuple[int, int]:
    """The last numbers drawn for rows of the app's ``messages`` and taskmill's ``jobs``."""
    with yacht.processor.db.connection() as conn:
        row = conn.execute(
            "SELECT pg_sequence_last_value(pg_get_serial_sequence('messages', 'id')), "
            "pg_sequence_last_value(pg_get_serial_sequence('taskmill.jobs', 'seq'))"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


@pytest.mark.timeout(60)
def test_bad_input_is_refused_precisely_and_stores_nothing(
    make_yacht: Callable[..., Yacht],
) -> None:
    yacht = make_yacht()
    task = {"task_type": "research_solution", "user_id": "hal", "context": {"description": "x"}}
    refused = {
        "unknown task_type 'send_pigeon' (known: research_solution,": {
            **task, "task_type": "send_pigeon"},
        "missing a required argument: 'description'": {**task, "context": {}},
        "'priority' must be one of urgent, high, medium, low": {**task, "priority": "asap"},
        "'scheduled_for' needs a time zone": {**task, "scheduled_for": "2030-01-01T09:00"},
        "'delay_s' must be a number of seconds >= 0, not -5": {**task, "delay_s": -5},
        "'user_id' is a field of its own": {**task, "context": {"user_id": "x"}},
    }  # fmt: skip
    for message, body in refused.items():
        reply = yacht.api.post("/tasks", json=body)
        assert reply.status_code == 422 and message in reply.json()["error"], reply.text
    reply = yacht.api.post("/tasks", content=b"{not json", headers={"Content-Type": "x"})
    assert reply.status_code == 400 and reply.json()["error"] == "the body is not valid JSON"
    reply = yacht.api.post("/process-task", json={"task_id": "no-such-task"})
    assert reply.status_code == 404 and "no-such-task" in reply.json()["error"]
    assert yacht.processor.app.list_jobs().total == 0
