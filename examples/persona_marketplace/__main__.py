"""``python -m examples.persona_marketplace``: the marketplace on Redis, with one command.

1. start a throwaway ``redis-server`` (unless ``--redis-url`` names one), the fake source and
   embedding services, a ``taskmill worker --pool process`` process and the API (uvicorn);
2. ingest the persona ``eminescu``: its works source answers 429 then times out before it
   works (retried), its quotes source answers 500 every time (fails for good);
3. the quotes service recovers: retry the failed job through the API, until the persona is
   active;
4. print the status rows, the summary and the URLs (API, dashboard and its login), then serve
   until Ctrl-C (``--once``: stop at once).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from examples._support.processes import interrupt_on_sigterm, stop
from examples._support.servers import ThrowawayRedis
from examples._support.serving import serve
from examples.persona_marketplace.config import Config
from examples.persona_marketplace.fakes import FakeServices
from examples.persona_marketplace.serving import start_worker
from examples.persona_marketplace.tasks import build
from examples.persona_marketplace.web import create_api
from taskmill.web import WebConfig

PERSONA = "eminescu"
DEADLINE_S = 90.0


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    interrupt_on_sigterm()  # SIGTERM stops the worker and redis-server as Ctrl-C does
    console = Console(width=None if sys.stdout.isatty() else 120)
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="persona-") as tmp:
        workdir = Path(tmp)
        broker_url = options.redis_url or _throwaway_redis(stack, workdir, console)
        services = FakeServices().start()
        stack.callback(services.stop)
        config = Config(
            broker_url=broker_url,
            status_db=str(workdir / "status.db"),
            services_url=services.url,
            retry_base_s=0.5,
        )
        tasks = build(config)
        password = os.environ.get("PERSONA_DASHBOARD_PASSWORD") or secrets.token_urlsafe(12)
        api = create_api(tasks, WebConfig(users={"admin": password}))
        log = stack.enter_context((workdir / "worker.log").open("wb"))
        worker = start_worker(config, log, "-c", "3", "--log-level", "warning")
        stack.callback(_stop_worker, worker)
        served = serve(api, port=options.port)
        stack.callback(served.stop)
        console.print(
            f"[bold]persona marketplace[/bold] on {broker_url}: API {served.url}, "
            f"fake services {services.url}, worker pid {worker.pid}"
        )
        try:
            demo(console, served.url, services)
        except RuntimeError as exc:
            console.print(f"[red]demo failed: {exc}[/red]")
            console.print((workdir / "worker.log").read_text(errors="replace"))
            return 1
        console.print(
            f"\nAPI        {served.url}/api/personas/{PERSONA}   (OpenAPI: {served.url}/docs)\n"
            f"dashboard  {served.url}/dashboard/   log in as admin, password {password}",
            soft_wrap=True,
        )
        if not options.once:
            console.print("serving until Ctrl-C")
            _wait_for_interrupt()
    return 0


def demo(console: Console, base: str, services: FakeServices) -> None:
    services.set_fault(PERSONA, "works", plan=["429", "timeout"], then="ok")
    services.set_fault(PERSONA, "quotes", plan=[], then="500")
    sent = call("POST", f"{base}/api/personas/{PERSONA}/ingest")
    console.print(f"sent ingestion {sent['ingestion']}: jobs {sent['jobs']}")
    flow = until(
        lambda: _ended(call("GET", f"{base}/api/ingestions/{sent['ingestion']}")),
        "the ingestion to end",
    )
    console.print(rows_table("after the ingestion (quotes failed for good)", flow["jobs"]))
    console.print(f"summary: {json.dumps(flow['summary'])}")

    console.print("\nthe quotes service is back: retrying the failed job through the API")
    services.set_fault(PERSONA, "quotes", plan=[], then="ok")
    quotes = sent["jobs"]["quotes"]
    call("POST", f"{base}/api/jobs/{quotes}/retry")
    until(
        lambda: call("GET", f"{base}/api/jobs/{quotes}")["status"] == "completed",
        "the retried job to complete",
    )
    persona = call("GET", f"{base}/api/personas/{PERSONA}")
    console.print(rows_table(f"persona {PERSONA}: {persona['status']}", persona["jobs"]))


def rows_table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("source", "status", "attempt", "retries", "vectors", "error", "job_id"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(str(row[c]) if row[c] is not None else "" for c in table_columns(table)))
    return table


def table_columns(table: Table) -> list[str]:
    return [str(column.header) for column in table.columns]


def _ended(flow: dict[str, Any]) -> dict[str, Any] | None:
    return flow if flow["state"] != "running" else None


def call(method: str, url: str) -> Any:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def until(check: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise RuntimeError(f"waited {DEADLINE_S:g} s for {what}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m examples.persona_marketplace")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("PERSONA_REDIS_URL"),
        help="a Redis to use (add ?prefix=NAME: to keep its keys apart); "
        "default: start a throwaway redis-server",
    )
    parser.add_argument("--port", type=int, default=8000, help="the API's port (0: any free)")
    parser.add_argument("--once", action="store_true", help="stop after the demo's summary")
    return parser.parse_args(argv)


def _throwaway_redis(stack: ExitStack, workdir: Path, console: Console) -> str:
    directory = workdir / "redis"
    directory.mkdir()
    redis = ThrowawayRedis(directory, hint="or give the URL of a running Redis with --redis-url")
    redis.start()
    stack.callback(redis.stop)
    return redis.url


def _stop_worker(worker: subprocess.Popen[bytes]) -> None:
    stop(worker, timeout_s=40)  # SIGTERM: it drains, and running jobs get 30 s


def _wait_for_interrupt() -> None:
    with suppress(KeyboardInterrupt):
        threading.Event().wait()


if __name__ == "__main__":
    sys.exit(main())
