"""The app the browser tests drive: its tasks, the gates the tests open, the logins."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from taskmill import App, current_job
from taskmill.web import WebConfig

ADMIN = {"username": "admin", "password": "a long admin secret"}
VIEWER = {"username": "viewer", "password": "a long viewer secret"}
AUTH = WebConfig(
    users={ADMIN["username"]: ADMIN["password"]},
    read_only_users={VIEWER["username"]: VIEWER["password"]},
)
GATE_TIMEOUT_S = 30.0


@dataclass
class Gates:
    """What the test lets the demo tasks do, and when."""

    payments_up: threading.Event = field(default_factory=threading.Event)
    page_one_seen: threading.Event = field(default_factory=threading.Event)
    page_three_seen: threading.Event = field(default_factory=threading.Event)


def make_app(url: str, gates: Gates) -> App:
    """The tasks the browser tests use: one that fails until payments are up, one that runs
    until cancelled, one that reports progress step by step, a plain one and a periodic one."""
    app = App(url, heartbeat_s=0.2, recover_interval_s=0.2, lease_s=5.0)

    @app.task(name="shop.charge", retries=0)
    def charge(order_id: int, card_token: str = "") -> str:
        if not gates.payments_up.is_set():
            raise RuntimeError(f"payment service down for order {order_id}")
        return f"order {order_id} paid"

    @app.task(name="shop.sync_catalog")
    async def sync_catalog() -> None:
        await asyncio.sleep(60)  # until cancelled

    @app.task(name="reports.build")
    def build_report(pages: int) -> int:
        job = current_job()
        job.progress(0.25, "page 1")
        gates.page_one_seen.wait(GATE_TIMEOUT_S)
        job.progress(0.75, "page 3")
        gates.page_three_seen.wait(GATE_TIMEOUT_S)
        return pages

    @app.task(name="shop.add")
    def add(a: int, b: int) -> int:
        return a + b

    @app.task(name="mail.welcome", queue="mail")
    def welcome(user_id: int) -> None: ...

    @app.periodic(cron="0 3 * * *", name="nightly-cleanup", args=(1, 2))
    @app.task(name="shop.cleanup")
    def cleanup(a: int, b: int) -> int:
        return a + b

    return app


@dataclass
class Dashboard:
    app: App
    base: str
    gates: Gates

    def url(self, path: str) -> str:
        return self.base + path
