"""``python -m examples.yachtparty``: the task processor, driven through its HTTP endpoints.

1. PostgreSQL: ``DATABASE_URL`` if set, else a throwaway server started here
   (``examples._support.servers``);
2. the fake external services, and the web service with a worker inside it (as the seed's one
   Cloud Run service), on loopback ports;
3. users, tasks of every type and priority (some due later, one an hour ahead), faults injected
   in the services, inbound messages (one for an unknown user: rolled back, job and all);
4. ``/trigger-poll`` for the task an hour ahead, ``/process-task`` for the one that failed for
   good once the SMS gateway is back; then a summary: tasks by type and outcome, latencies from
   the action log, and ``/health``.

A minute of the retry policy lasts ``YACHTPARTY_MINUTE_S`` seconds: 0.5 here unless set, so the
1/2/4-minute retries take 0.5/1/2 s. ``--serve`` keeps the service up afterwards (Ctrl-C stops).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from typing import Any

from rich.console import Console
from rich.table import Table

from examples._support.processes import interrupt_on_sigterm
from examples._support.servers import ServerMissingError, ThrowawayPostgres
from examples._support.serving import serve
from examples.yachtparty.config import Config, ConfigError
from examples.yachtparty.services import fake_services
from examples.yachtparty.tasks import Processor, build
from examples.yachtparty.web import create_web

FINISHED = {"succeeded", "failed", "cancelled"}
DEADLINE_S = 60.0


class Client:
    """JSON over HTTP to one base URL (the standard library's client: nothing to install)."""

    def __init__(self, base: str) -> None:
        self.base = base

    def __call__(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, method=method,
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, json.load(reply)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)


def scenario(api: Client, faults: Client, console: Console) -> tuple[dict[str, str], str]:
    """Send the demo's work; task id -> what it is, and the id of the followup that failed."""
    for user, name in (("alice", "Alice"), ("bob", "Bob"), ("carol", "Carol")):
        api("POST", "/users", {"id": user, "name": name})
    faults("POST", "/faults", {"path": "/events", "errors": ["500", "429", "timeout"]})
    # every attempt of bob's followup finds the SMS gateway down: it fails for good
    faults("POST", "/faults", {"path": "/sms", "user_id": "bob", "errors": ["503"] * 4})
    sent: dict[str, str] = {}

    def task(label: str, task_type: str, user: str, context: dict[str, Any], **more: Any) -> str:
        status, reply = api("POST", "/tasks", {"task_type": task_type, "user_id": user,
                                               "context": context, **more})  # fmt: skip
        assert status == 201, reply
        sent[reply["task_id"]] = label
        return str(reply["task_id"])

    priorities = ["urgent", "high", "medium", "low"]
    for n in range(12):
        user = ("alice", "bob", "carol")[n % 3]
        task("research", "research_solution", user, {"description": f"CRM for team #{n}"},
             priority=priorities[n % 4], delay_s=(n % 3) * 0.5)  # fmt: skip
    followup = task("followup (SMS down)", "schedule_followup", "bob",
                    {"message": "How did the intro go?"}, priority="high")  # fmt: skip
    for n in range(6):
        task("followup", "schedule_followup", "carol", {"message": f"Reminder {n}"},
             priority="low", delay_s=n * 0.2)  # fmt: skip
    task("profile", "update_user_profile", "alice", {"fields": {"company": "Acme", "title": "CTO"}})
    task("profile (bad field)", "update_user_profile", "bob", {"fields": {"is_admin": "yes"}})
    later = task("research (in an hour)", "research_solution", "carol",
                 {"description": "hiring plan"}, delay_s=3600)  # fmt: skip

    status, reply = api("POST", "/messages", {"user_id": "alice", "body": "Hi! Back from holiday."})
    console.print(f"POST /messages alice -> {status}: message and re-engagement check stored")
    sent[reply["task_id"]] = "re-engagement check"
    status, reply = api("POST", "/messages", {"user_id": "mallory", "body": "who am I?"})
    console.print(f"POST /messages mallory -> {status} {reply['error']!r}: nothing stored")

    _, reply = api("POST", "/trigger-poll")
    among = "among them" if later in reply["task_ids"] else "NOT among them"
    console.print(f"POST /trigger-poll -> {reply['message']} (the task an hour ahead {among})")
    wait_finished(api, list(sent))
    status, reply = api("POST", "/process-task", {"task_id": followup})
    assert status == 200, reply
    console.print(f"POST /process-task for the failed followup -> {reply['action']}")
    wait_finished(api, [followup])
    return sent, followup


def wait_finished(api: Client, task_ids: list[str]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    pending = set(task_ids)
    while pending:
        pending = {t for t in pending if api("GET", f"/tasks/{t}")[1]["status"] not in FINISHED}
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} task(s) still unfinished after {DEADLINE_S} s")
        time.sleep(0.2)


def summary(api: Client, sent: dict[str, str]) -> list[Table]:
    by_kind: dict[tuple[str, str], int] = {}
    for task_id in sent:
        task = api("GET", f"/tasks/{task_id}")[1]
        kind = (task["task_type"], task["status"])
        by_kind[kind] = by_kind.get(kind, 0) + 1
    outcomes = Table(title="tasks by type and outcome", title_justify="left")
    for column in ("task type", "status", "tasks"):
        outcomes.add_column(column, justify="right" if column == "tasks" else "left")
    for (task_type, status), n in sorted(by_kind.items()):
        outcomes.add_row(task_type, status, str(n))
    health = api("GET", "/health")[1]
    latency = Table(title="action log: attempts and latency (ms)", title_justify="left")
    for column in ("task type", "ok", "retrying", "failed", "p50", "p95", "max", "wait p50"):
        latency.add_column(column, justify="left" if column == "task type" else "right")
    for task_type, row in sorted(health["byType"].items()):
        ms = row.get("latencyMs", {})
        latency.add_row(
            task_type, *(str(row.get(k, 0)) for k in ("succeeded", "retrying", "failed")),
            *(f"{ms[k]:.1f}" if k in ms else "-" for k in ("p50", "p95", "max")),
            f"{row['waitMsP50']:.0f}" if "waitMsP50" in row else "-",
        )  # fmt: skip
    return [outcomes, latency]


def timeline(api: Client, task_id: str) -> Table:
    """One task's rows of the action log, times from its first start."""
    actions = api("GET", f"/tasks/{task_id}")[1]["actions"]
    t0 = actions[0]["started_at"]
    table = Table(title="bob's followup in the action log (s from its first start)",
                  title_justify="left")  # fmt: skip
    for column in ("attempt", "outcome", "due", "started", "latency ms", "error"):
        table.add_column(column, justify="left" if column in ("outcome", "error") else "right")
    for a in actions:
        table.add_row(
            str(a["attempt"]), a["outcome"], f"{a['scheduled_for'] - t0:+.2f}",
            f"{a['started_at'] - t0:+.2f}", f"{a['latency_ms']:.1f}",
            _short(a["error"]),
        )  # fmt: skip
    return table


def _short(error: str | None) -> str:
    """``pkg.mod.ServiceError: message`` as ``ServiceError: message``."""
    if error is None:
        return ""
    kind, _, message = error.partition(": ")
    return f"{kind.rsplit('.', 1)[-1]}: {message}"


def run(config: Config, console: Console, *, keep_serving: bool) -> int:
    with ExitStack() as stack:
        processor: Processor = build(config)
        stack.callback(processor.close)  # the service closes it too; this covers a failed start
        web = serve(create_web(processor, worker=True), port=int(os.environ.get("PORT", "0")))
        stack.callback(web.stop)
        console.print(
            f"[bold]yachtparty task processor[/bold] at {web.url} (dashboard: "
            f"{web.url}/taskmill/), a minute lasts {config.minute_s:g} s"
        )
        api = Client(web.url)
        sent, followup = scenario(api, Client(config.services_url), console)
        for table in [*summary(api, sent), timeline(api, followup)]:
            console.print(table)
        health = api("GET", "/health")[1]
        console.print("GET /health (without byType, shown above):")
        console.print_json(data={k: v for k, v in health.items() if k != "byType"})
        if keep_serving:
            console.print(f"serving at {web.url} until Ctrl-C")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


def main(argv: list[str]) -> int:
    console = Console(width=None if sys.stdout.isatty() else 110)
    interrupt_on_sigterm()  # SIGTERM stops the throwaway PostgreSQL as Ctrl-C does
    env = dict(os.environ)
    env.setdefault("YACHTPARTY_MINUTE_S", "0.5")
    env.setdefault("YACHTPARTY_HTTP_TIMEOUT_S", "1")
    with ExitStack() as stack:
        services = serve(fake_services(hang_s=3.0))
        stack.callback(services.stop)
        env["YACHTPARTY_SERVICES_URL"] = services.url
        if not (env.get("DATABASE_URL") or env.get("TASKMILL_URL")):
            try:
                postgres = ThrowawayPostgres(hint="or set DATABASE_URL=postgresql://user@host/db")
                env["DATABASE_URL"] = stack.enter_context(postgres).url
            except ServerMissingError as exc:
                console.print(f"[red]{exc}[/red]")
                return 2
            console.print(f"started a throwaway PostgreSQL at {env['DATABASE_URL']}")
        try:
            config = Config.from_env(env)
        except ConfigError as exc:
            console.print(f"[red]{exc}[/red]")
            return 2
        return run(config, console, keep_serving="--serve" in argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
