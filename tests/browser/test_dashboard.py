"""The dashboard in headless Chromium: log in, see a failed job's traceback, retry it and watch
it succeed without a reload, cancel a running job, pause a queue, enqueue from the form, watch
a progress bar move; and a screenshot of every page."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect

from asgi_server import serving
from browser.dashboard_app import ADMIN, VIEWER, Dashboard
from taskmill import App, JobState, chain, current_job
from taskmill.testing import running_worker, wait_until
from taskmill.web import create_app

pytestmark = pytest.mark.timeout(120)


def _state_of(dashboard: Dashboard, job_id: str) -> JobState:
    return dashboard.app.get_job(job_id).state


def _wait_for_state(dashboard: Dashboard, job_id: str, state: JobState) -> None:
    wait_until(
        lambda: _state_of(dashboard, job_id) is state,
        timeout=20,
        what=lambda: f"job {job_id} to be {state.value} (it is {_state_of(dashboard, job_id)})",
    )


def test_log_in(browser: Any, dashboard: Dashboard) -> None:
    anonymous = browser.new_context()
    refused = anonymous.request.get(dashboard.base + "/")  # the browser's own HTTP client
    assert refused.status == 401 and refused.headers["www-authenticate"].startswith("Basic")
    with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
        anonymous.new_page().goto(dashboard.base + "/")  # no name and password to give
    anonymous.close()

    admin = browser.new_context(http_credentials=ADMIN)
    tab = admin.new_page()
    response = tab.goto(dashboard.base + "/")
    assert response is not None and response.status == 200
    expect(tab.locator("header .who")).to_have_text("admin")
    expect(tab.get_by_role("button", name="Pause").first).to_be_visible()
    admin.close()

    viewer = browser.new_context(http_credentials=VIEWER)
    tab = viewer.new_page()
    tab.goto(dashboard.base + "/")
    expect(tab.locator("header .who")).to_have_text("viewer (read-only)")
    expect(tab.locator("tr[data-queue='mail']")).to_be_visible()
    assert tab.locator("form[method='post']").count() == 0
    viewer.close()


def test_a_failed_job_shows_its_traceback_and_a_retry_succeeds_without_reload(
    page: Any, dashboard: Dashboard
) -> None:
    job = dashboard.app.tasks["shop.charge"].send(42, card_token="tok_live_123")
    _wait_for_state(dashboard, job.id, JobState.FAILED)
    page.goto(dashboard.url(f"/job?id={job.id}"))
    expect(page.locator("#job-state")).to_contain_text("failed")
    expect(page.locator("#traceback")).to_contain_text("Traceback (most recent call last)")
    expect(page.locator("#traceback")).to_contain_text(
        "RuntimeError: payment service down for order 42"
    )
    expect(page.locator("table.args")).to_contain_text("[redacted]")  # card_token
    assert "tok_live_123" not in page.content()

    dashboard.gates.payments_up.set()
    page.evaluate("window.notReloaded = true")
    page.get_by_role("button", name="Retry").click()
    expect(page.locator("#job-state")).to_contain_text("succeeded")
    expect(page.locator("#result")).to_contain_text("order 42 paid")
    expect(page.locator("#notice")).to_contain_text("Retried 1 job(s).")
    assert page.evaluate("window.notReloaded") is True  # the same document all along
    assert _state_of(dashboard, job.id) is JobState.SUCCEEDED


def test_cancel_a_running_job_and_see_it_stop(page: Any, dashboard: Dashboard) -> None:
    job = dashboard.app.tasks["shop.sync_catalog"].send()
    _wait_for_state(dashboard, job.id, JobState.RUNNING)
    page.goto(dashboard.url(f"/job?id={job.id}"))
    expect(page.locator("#job-state")).to_contain_text("running")
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#job-state")).to_contain_text("cancelled")
    assert _state_of(dashboard, job.id) is JobState.CANCELLED
    expect(page.get_by_role("button", name="Retry")).to_be_visible()  # it may run again


def test_pause_a_queue_and_see_its_jobs_wait(page: Any, dashboard: Dashboard) -> None:
    app = dashboard.app
    page.goto(dashboard.url("/"))
    mail = page.locator("tr[data-queue='mail']")
    mail.get_by_role("button", name="Pause").click()
    expect(mail.locator(".queue-status")).to_have_text("paused")
    expect(page.locator("#notice")).to_contain_text("Queue paused")
    assert {s.queue: s.paused for s in app.stats()}["mail"] is True

    waiting = app.tasks["mail.welcome"].send(7)
    other = app.tasks["shop.add"].send(1, 2)  # sent after it, on a queue that is not paused
    assert other.result(timeout=20) == 3  # the worker is running...
    assert waiting.status() is JobState.QUEUED  # ...and leaves the paused queue alone
    expect(mail.locator("td[data-state='queued']")).to_have_text("1")  # live refresh

    mail.get_by_role("button", name="Resume").click()
    expect(mail.locator(".queue-status")).to_have_text("active")
    _wait_for_state(dashboard, waiting.id, JobState.SUCCEEDED)
    expect(mail.locator("td[data-state='succeeded']")).to_have_text("1")
    expect(mail.locator("td[data-state='queued']")).to_have_text("0")


def test_enqueue_from_the_form(page: Any, dashboard: Dashboard) -> None:
    page.goto(dashboard.url("/enqueue"))
    page.select_option("select[name='task']", "shop.add")
    page.fill("textarea[name='args']", "[20]")
    page.fill("textarea[name='kwargs']", '{"b": "not a number"}')
    page.get_by_role("button", name="Enqueue").click()
    expect(page.locator("#form-error")).to_contain_text("argument 'b' (a JSON string)")
    assert dashboard.app.list_jobs().total == 0

    page.fill("textarea[name='kwargs']", '{"b": 22}')  # the form kept the rest
    page.get_by_role("button", name="Enqueue").click()
    expect(page).to_have_url(re.compile(r"/job\?id="))
    expect(page.locator("#job-state")).to_contain_text("succeeded")
    expect(page.locator("#result")).to_have_text("42")


def test_the_progress_bar_moves(page: Any, dashboard: Dashboard, screenshots: list[Path]) -> None:
    job = dashboard.app.tasks["reports.build"].send(3)
    _wait_for_state(dashboard, job.id, JobState.RUNNING)
    page.goto(dashboard.url(f"/job?id={job.id}"))
    bar = page.locator("#job-progress")
    expect(bar).to_have_attribute("value", "25")
    expect(page.locator("#job-live")).to_contain_text("page 1")
    dashboard.gates.page_one_seen.set()
    expect(bar).to_have_attribute("value", "75")
    expect(page.locator("#job-live")).to_contain_text("page 3")
    _screenshot(page, "job-running", screenshots)
    dashboard.gates.page_three_seen.set()
    expect(page.locator("#job-state")).to_contain_text("succeeded")
    expect(page.locator("#result")).to_have_text("3")


def test_a_screenshot_of_every_page(
    page: Any, dashboard: Dashboard, screenshots: list[Path]
) -> None:
    app = dashboard.app
    failed = app.tasks["shop.charge"].send(1001, card_token="tok_live_4242")
    _wait_for_state(dashboard, failed.id, JobState.FAILED)
    dashboard.gates.payments_up.set()
    for n in range(12):
        app.tasks["shop.charge"].send(2000 + n)
    app.tasks["mail.welcome"].options(delay=3600).send(5)
    flow = chain(app.tasks["shop.add"].s(1, 2), app.tasks["shop.add"].s(10)).send(app)
    assert flow.result(timeout=20) == 13
    wait_until(lambda: app.stats()[0].counts["queued"] == 0, what="the queues to drain")

    shots = {
        "overview": "/",
        "jobs": "/jobs",
        "job-failed": f"/job?id={failed.id}",
        "workers": "/workers",
        "schedules": "/schedules",
        "workflow": f"/workflows?id={flow.id}",
        "enqueue": "/enqueue",
    }
    page.set_viewport_size({"width": 1280, "height": 480})  # full_page: as tall as the page
    for name, path in shots.items():
        page.goto(dashboard.url(path))
        if name == "overview":
            expect(page.locator("#throughput svg")).to_be_visible()
        if name == "workers":
            expect(page.locator("table.workers")).to_contain_text("alive")
        _screenshot(page, name, screenshots)


def _screenshot(page: Any, name: str, screenshots: list[Path]) -> None:
    target = screenshots[0] / f"{name}.png"
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 10_000, name  # a rendered page, not a blank one
    for extra in screenshots[1:]:
        shutil.copy(target, extra / target.name)


def test_events_from_the_stream_show_on_the_job_page(browser: Any, tmp_path: Path) -> None:
    """With events on, the job page listens to the SSE stream (web/sse.py's) and lists what
    arrives, as text."""
    app = App("sqlite:///" + str(tmp_path / "jobs.db"), events=True, heartbeat_s=0.2)
    listened = threading.Event()

    @app.task(name="shop.render")
    def render() -> None:
        job = current_job()
        # the page subscribes at some point: report until it has seen a report
        while not listened.wait(0.1):
            job.progress(0.5, "<b>half</b>")

    handle = render.options(delay=3600).send()  # runs once the page is open
    dashboard = create_app(app)
    context = browser.new_context()
    errors: list[str] = []
    try:
        with running_worker(app), serving(dashboard) as base:
            tab = context.new_page()
            tab.on("pageerror", lambda error: errors.append(str(error)))
            tab.goto(f"{base}/job?id={handle.id}")
            handle.run_now()
            expect(tab.locator("#live-events")).to_contain_text("running 50 % <b>half</b>")
            assert tab.locator("#live-events b").count() == 0  # text, not markup
            listened.set()
            context.close()
    finally:
        listened.set()
        app.close()
    assert errors == []


def test_actions_on_every_matching_job_ask_first(page: Any, dashboard: Dashboard) -> None:
    app = dashboard.app
    waiting = app.tasks["mail.welcome"].options(delay=3600).send(1)
    page.goto(dashboard.url("/jobs?queue=mail"))
    asked: list[str] = []

    def answer(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.accept() if len(asked) > 1 else dialog.dismiss()

    page.on("dialog", answer)
    cancel_all = page.locator("button[data-action='cancel-matching']")
    cancel_all.click()  # "no": nothing happens
    assert asked == [cancel_all.get_attribute("data-confirm")]
    assert waiting.status() is JobState.SCHEDULED
    cancel_all.click()  # "yes"
    expect(page.locator("#notice")).to_contain_text("Cancelled 1 job(s)")
    assert len(asked) == 2 and waiting.status() is JobState.CANCELLED
