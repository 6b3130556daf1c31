"""Headless Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright for Python) against
the dashboard served by uvicorn, with a real worker on a thread, on SQLite.

``scripts/install-test-deps.sh`` installs the browser (``make test`` runs it); without it these
tests skip, saying so. Screenshots of the pages go to a temp dir, and to ``$TASKMILL_SCREENSHOTS``
when it is set.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asgi_server import serving
from browser.dashboard_app import ADMIN, AUTH, Dashboard, Gates, make_app
from taskmill.testing import running_worker
from taskmill.web import create_app

CHROMIUM = Path("/usr/bin/chromium")
HTTP_STATUS_MESSAGE = "Failed to load resource: the server responded with a status of"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing: `bash scripts/install-test-deps.sh` installs Debian's "
            "chromium (CI does)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[Dashboard]:
    gates = Gates()
    app = make_app("sqlite:///" + str(tmp_path / "jobs.db"), gates)
    try:
        with (
            running_worker(app, concurrency=4),
            serving(create_app(app, AUTH)) as base,
        ):
            yield Dashboard(app, base, gates)
            # a task still running (a test that failed half-way) would hold the worker's drain
            gates.page_one_seen.set()
            gates.page_three_seen.set()
            for job in app.list_jobs(state="running").jobs:
                app.cancel_job(job.id)
    finally:
        app.close()


@pytest.fixture
def page(browser: Any, dashboard: Dashboard) -> Iterator[Any]:
    """A page logged in as the admin, failing the test on any error in its console (a script
    the Content-Security-Policy refused, an htmx error). An HTTP error status is not one: the
    tests check the statuses they cause (a refused form is a 422).

    It closes before the dashboard stops (it depends on it): a page still polling a stopped
    server would log refused connections."""
    context = browser.new_context(http_credentials=ADMIN, viewport={"width": 1280, "height": 860})
    errors: list[str] = []
    tab = context.new_page()

    def on_console(message: Any) -> None:
        if message.type == "error" and not message.text.startswith(HTTP_STATUS_MESSAGE):
            errors.append(message.text)

    tab.on("console", on_console)
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.set_default_timeout(15_000)
    yield tab
    context.close()
    assert errors == [], f"errors in the browser's console: {errors}"


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Where screenshots go: a temp dir, and ``$TASKMILL_SCREENSHOTS`` if set."""
    dirs = [tmp_path_factory.mktemp("screenshots")]
    wanted = os.environ.get("TASKMILL_SCREENSHOTS")
    if wanted:
        Path(wanted).mkdir(parents=True, exist_ok=True)
        dirs.append(Path(wanted))
    return dirs
