"""The dashboard's pages over HTTP (httpx against a real uvicorn), on SQLite, Redis and
PostgreSQL: every page renders, what jobs carry is shown escaped and redacted, a read-only user
sees no action and is refused every one, actions do what they say, and every link and form
works under a mount prefix."""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from markupsafe import escape
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from asgi_server import serving
from taskmill import App, JobState, chain
from taskmill.brokers import postgres as pg
from taskmill.web import WebConfig, create_app

SCRIPT = "<script>alert(1)</script>"
ADMIN = ("admin", "admin secret 1")
VIEWER = ("viewer", "viewer secret 2")
AUTH = WebConfig(users=dict([ADMIN]), read_only_users=dict([VIEWER]))


# --- an app on each broker, with a job in every interesting state -------------------------------


def _url(broker: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if broker == "sqlite":
        return "sqlite:///" + str(tmp_path / "jobs.db")
    if broker == "redis":
        server = request.getfixturevalue("redis_server")
        return f"{server.url}?prefix=t{uuid.uuid4().hex[:12]}:"
    server = request.getfixturevalue("postgres_server")
    return f"{server.url}?schema=t{uuid.uuid4().hex[:12]}"


def _cleanup(broker: str, url: str) -> None:
    if broker == "redis":
        client = redis.Redis.from_url(url.partition("?")[0])
        with client:
            keys = list(client.scan_iter(match=url.partition("prefix=")[2] + "*"))
            if keys:
                client.unlink(*keys)
    elif broker == "postgres":
        config = pg.parse_url(url)
        with psycopg.connect(config.conninfo, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {config.schema} CASCADE")


def make_app(url: str) -> App:
    app = App(url)

    @app.task(name="shop.charge", retries=0)
    def charge(order_id: int, note: str, password: str = "") -> None:
        raise ValueError(f"card declined for {note}")

    @app.task(name="shop.add")
    def add(a: int, b: int) -> int:
        return a + b

    @app.periodic(every=3600, name="hourly-add", args=(1, 1))
    @app.task(name="shop.tick")
    def tick(a: int, b: int) -> int:
        return a + b

    return app


class Site:
    """A served dashboard and what is stored: the ids of the jobs of each kind."""

    def __init__(self, app: App, base: str) -> None:
        self.app = app
        self.base = base
        self.ids: dict[str, str] = {}

    def client(self, who: tuple[str, str] | None = ADMIN) -> httpx.Client:
        return httpx.Client(base_url=self.base, auth=who, timeout=10)


def _fill(app: App) -> dict[str, str]:
    charge, add = app.tasks["shop.charge"], app.tasks["shop.add"]
    ids = {
        "failed": charge.send(7, SCRIPT, password="hunter2-secret").id,
        "succeeded": add.send(2, 3).id,
    }
    flow = chain(add.s(1, 2), add.s(10)).send(app)
    app.run_until_idle()
    ids["scheduled"] = add.options(delay=3600).send(4, 5).id
    ids["workflow"] = flow.id
    return ids


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    url = _url(request.param, request, tmp_path)
    app = make_app(url)
    try:
        ids = _fill(app)
        with serving(create_app(app, AUTH)) as base:
            s = Site(app, base)
            s.ids = ids
            yield s
    finally:
        app.close()
        _cleanup(request.param, url)


@pytest.fixture
def sqlite_site(tmp_path: Path) -> Iterator[Site]:
    """The same on SQLite alone, for what the pages do whatever the broker."""
    app = make_app("sqlite:///" + str(tmp_path / "jobs.db"))
    try:
        ids = _fill(app)
        with serving(create_app(app, AUTH)) as base:
            s = Site(app, base)
            s.ids = ids
            yield s
    finally:
        app.close()


# --- every page ---------------------------------------------------------------------------------


def _pages(ids: dict[str, str]) -> dict[str, list[str]]:
    """Each page's path, and text it must show."""
    return {
        "/": ["default", "Workers alive", "active", "Pause"],
        "/partials/overview": ["overview-live"],
        "/partials/throughput": ["<svg", "succeeded: 3", "failed: 1"],
        "/jobs": [ids["failed"], ids["succeeded"], ids["scheduled"]],
        "/jobs?state=failed": [ids["failed"], "1 job(s) match"],
        f"/job?id={ids['failed']}": ["ValueError", "Traceback", "card declined"],
        f"/job?id={ids['succeeded']}": ["succeeded", ">5<"],
        f"/partials/job?id={ids['scheduled']}": ["scheduled", "Run now"],
        "/workers": ["No worker is registered"],
        "/schedules": ["hourly-add", "shop.tick"],
        f"/workflows?id={ids['workflow']}": ["succeeded", f"wf:{ids['workflow']}:"],
        "/enqueue": ["shop.add", "shop.charge", "shop.tick"],
        "/workflows": ["Running workflows"],
        "/queues/purge?queue=default": ["Purge queue", "1</strong> scheduled"],
    }


def test_every_page_renders(site: Site) -> None:
    with site.client() as client:
        for path, texts in _pages(site.ids).items():
            response = client.get(path)
            assert response.status_code == 200, (path, response.text[:500])
            assert response.headers["content-type"].startswith("text/html"), path
            for text in texts:
                assert text in response.text, (path, text)
        js = client.get("/static/htmx.min.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert js.text.startswith("var htmx=")


def test_missing_things_are_404_and_bad_filters_400(site: Site) -> None:
    with site.client() as client:
        assert client.get("/job?id=no-such-job").status_code == 404
        assert client.get("/partials/job?id=no-such-job").status_code == 404
        assert client.get("/workflows?id=no-such-workflow").status_code == 404
        assert client.get("/queues/purge?queue=no-such-queue").status_code == 404
        found = client.get("/jobs?q=" + site.ids["failed"])
        assert found.status_code == 303 and found.headers["location"].endswith(site.ids["failed"])
        bad = client.get("/jobs?state=exploded")
        assert bad.status_code == 400 and "unknown job state &#39;exploded&#39;" in bad.text
        assert client.get("/jobs?cursor=forged").status_code == 400


def test_search_finds_a_job_by_its_key_else_says_nothing_matched(site: Site) -> None:
    keyed = site.app.tasks["shop.add"].options(key="order-42", delay=3600).send(4, 2)
    with site.client() as client:
        found = client.get("/jobs", params={"q": "order-42"})
        assert found.status_code == 303
        assert found.headers["location"].endswith("id=" + keyed.id)
        missing = client.get("/jobs", params={"q": "order-43"})
        assert missing.status_code == 404
        assert "There is no job with the id or pending key <code>order-43</code>" in missing.text
        assert "find a finished job by its id" in missing.text


# --- escaping and redaction ---------------------------------------------------------------------


def test_a_script_in_arguments_and_errors_is_shown_escaped(site: Site) -> None:
    with site.client() as client:
        page = client.get(f"/job?id={site.ids['failed']}").text
    assert SCRIPT not in page
    # as text in the argument, the error's message and its traceback
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3


def test_redacted_names_are_hidden_on_the_job_page(site: Site) -> None:
    charge = site.app.tasks["shop.charge"]
    job = charge.send(1, "x", "positional-secret-3").id  # password given by position
    with site.client() as client:
        shown = client.get(f"/job?id={job}").text + client.get(f"/job?id={site.ids['failed']}").text
    assert "hunter2-secret" not in shown and "positional-secret-3" not in shown
    assert shown.count("[redacted]") == 2
    assert "order_id" in shown and "note" in shown  # positional arguments shown by name


# --- who may do what ----------------------------------------------------------------------------

_ACTIONS = [
    ("/actions/retry", {"id": "{failed}"}),
    ("/actions/cancel", {"id": "{scheduled}"}),
    ("/actions/run-now", {"id": "{scheduled}"}),
    ("/actions/retry-matching", {"state": "failed"}),
    ("/actions/cancel-matching", {}),
    ("/actions/delete", {"id": "{succeeded}"}),
    ("/actions/delete-matching", {"state": "succeeded"}),
    ("/actions/pause", {"queue": "default"}),
    ("/actions/resume", {"queue": "default"}),
    ("/actions/purge", {"queue": "default", "confirm": "default"}),
    ("/actions/trigger", {"schedule": "hourly-add"}),
    ("/enqueue", {"task": "shop.add", "args": "[1, 2]"}),
]


def _snapshot(app: App) -> list[tuple[str, JobState]]:
    return sorted((j.id, j.state) for j in app.list_jobs(limit=1000).jobs)


def test_a_read_only_user_sees_no_action_and_is_refused_each(site: Site) -> None:
    pages = ["/", f"/job?id={site.ids['failed']}", f"/job?id={site.ids['scheduled']}", "/jobs",
             "/schedules", "/enqueue", "/queues/purge?queue=default"]  # fmt: skip
    before = _snapshot(site.app)
    with site.client(VIEWER) as viewer, site.client(ADMIN) as admin:
        for path in pages:
            seen = viewer.get(path)
            assert seen.status_code == 200, path
            assert 'method="post"' not in seen.text, path
            assert "viewer (read-only)" in seen.text
        assert sum('method="post"' in admin.get(path).text for path in pages) == len(pages)
        for path, fields in _ACTIONS:
            data = {k: v.format(**site.ids) for k, v in fields.items()}
            refused = viewer.post(path, data=data)
            assert refused.status_code == 403, (path, refused.status_code)
        assert viewer.get("/").status_code == 200
    assert _snapshot(site.app) == before  # nothing changed
    assert not site.app.stats()[0].paused


def test_anonymous_is_asked_to_log_in(site: Site) -> None:
    with site.client(None) as anonymous:
        response = anonymous.get("/")
        assert response.status_code == 401
        assert response.headers["www-authenticate"].lower().startswith("basic")
        assert anonymous.post("/actions/pause", data={"queue": "default"}).status_code == 401
    with site.client(("admin", "wrong")) as wrong:
        assert wrong.get("/").status_code == 401
    assert not site.app.stats()[0].paused


# --- what the actions do ------------------------------------------------------------------------


def _done(response: httpx.Response) -> str:
    assert response.status_code == 303, response.text[:500]
    return response.headers["location"]


def test_retry_one_job_and_come_back_to_its_page(site: Site) -> None:
    failed = site.ids["failed"]
    with site.client() as client:
        back = f"{site.base}/job?id={failed}"
        location = _done(client.post("/actions/retry", data={"id": failed, "next": back}))
        assert location == f"{back}&done=retried&n=1"
        assert "Retried 1 job(s)." in client.get(location).text
    assert site.app.get_job(failed).state is JobState.QUEUED


def test_actions_on_queues_jobs_and_schedules(sqlite_site: Site) -> None:
    app, ids = sqlite_site.app, sqlite_site.ids
    with sqlite_site.client() as client:
        _done(client.post("/actions/pause", data={"queue": "default"}))
        assert app.stats()[0].paused
        _done(client.post("/actions/resume", data={"queue": "default"}))
        assert not app.stats()[0].paused
        _done(client.post("/actions/run-now", data={"id": ids["scheduled"]}))
        assert app.get_job(ids["scheduled"]).state is JobState.QUEUED
        _done(client.post("/actions/cancel", data={"id": ids["scheduled"]}))
        assert app.get_job(ids["scheduled"]).state is JobState.CANCELLED
        _done(client.post("/actions/trigger", data={"schedule": "hourly-add"}))
        (sent,) = app.list_jobs(task="shop.tick").jobs
        assert sent.state is JobState.QUEUED
        assert client.post("/actions/trigger", data={"schedule": "nope"}).status_code == 404
        assert client.post("/actions/pause", data={}).status_code == 400


def test_delete_finished_jobs(sqlite_site: Site) -> None:
    app, ids = sqlite_site.app, sqlite_site.ids
    with sqlite_site.client() as client:
        assert 'data-action="page_delete"' in client.get(f"/job?id={ids['succeeded']}").text
        both = {"id": [ids["succeeded"], ids["scheduled"]]}  # only the finished one goes
        assert _done(client.post("/actions/delete", data=both)).endswith("done=deleted&n=1")
        assert client.get(f"/job?id={ids['succeeded']}").status_code == 404
        assert app.get_job(ids["scheduled"]).state is JobState.SCHEDULED
        matching = client.post("/actions/delete-matching", data={"state": "failed"})
        assert _done(matching).endswith("done=deleted&n=1")
    assert app.list_jobs(state="failed").total == 0
    assert app.get_job(ids["scheduled"]).state is JobState.SCHEDULED


def test_purge_asks_for_confirmation(sqlite_site: Site) -> None:
    app = sqlite_site.app
    with sqlite_site.client() as client:
        unconfirmed = _done(client.post("/actions/purge", data={"queue": "default"}))
        assert unconfirmed.endswith("/queues/purge?queue=default")
        assert app.stats()[0].counts["scheduled"] == 1
        wrong = client.post("/actions/purge", data={"queue": "default", "confirm": "other"})
        assert _done(wrong).endswith("/queues/purge?queue=default")
        assert app.stats()[0].counts["scheduled"] == 1
        done = _done(client.post("/actions/purge", data={"queue": "default", "confirm": "default"}))
        assert done.endswith("?done=purged&n=1")
    assert app.stats()[0].counts["scheduled"] == 0


def test_bulk_actions_on_the_selection_and_on_the_filter(sqlite_site: Site) -> None:
    app = sqlite_site.app
    charge = app.tasks["shop.charge"]
    more = [charge.send(n, "again").id for n in range(3)]
    app.run_until_idle()
    waiting = [app.tasks["shop.add"].options(delay=600).send(n, n).id for n in range(2)]
    with sqlite_site.client() as client:
        _done(client.post("/actions/retry", data={"id": more[:2]}))
        assert [app.get_job(i).state for i in more] == [JobState.QUEUED] * 2 + [JobState.FAILED]
        _done(client.post("/actions/cancel", data={"id": waiting}))
        assert {app.get_job(i).state for i in waiting} == {JobState.CANCELLED}
        # every failed or cancelled job of the task, across pages (none of the others)
        location = _done(client.post("/actions/retry-matching", data={"task": "shop.charge"}))
        assert location.endswith("done=retried&n=2")  # the first failed one, and more[2]
        assert app.list_jobs(state="failed").total == 0
        assert {app.get_job(i).state for i in waiting} == {JobState.CANCELLED}
        location = _done(client.post("/actions/cancel-matching", data={"state": "queued"}))
        assert location.endswith("done=cancelled&n=4")  # the four retried ones
        assert app.list_jobs(state="queued").total == 0
        assert client.post("/actions/retry-matching", data={"state": "bogus"}).status_code == 400


def test_enqueue_from_the_form(sqlite_site: Site) -> None:
    app = sqlite_site.app
    total = app.list_jobs().total
    with sqlite_site.client() as client:
        location = _done(
            client.post(
                "/enqueue",
                data={
                    "task": "shop.add",
                    "args": "[20]",
                    "kwargs": '{"b": 22}',
                    "priority": "high",
                    "queue": "bulk",
                    "delay": "",
                    "key": "k-1",
                },
            )
        )
        job = app.get_job(location.partition("id=")[2])
        assert (job.task, job.queue, job.priority, job.key) == ("shop.add", "bulk", 50, "k-1")
        errors = {
            "task: choose a task": ({"task": ""}, 400),
            "args: not JSON": ({"task": "shop.add", "args": "[1,"}, 400),
            "args: must be a JSON list": ({"task": "shop.add", "args": '{"a": 1}'}, 422),
            "kwargs: must be a JSON object": ({"task": "shop.add", "kwargs": "[1]"}, 422),
            "missing a required argument: &#39;b&#39;": ({"task": "shop.add", "args": "[1]"}, 422),
            "no task named &#39;shop.nope&#39;": ({"task": "shop.nope"}, 404),
            "delay: a number of seconds": (
                {"task": "shop.add", "args": "[1, 2]", "delay": "x"},
                400,
            ),
        }
        for message, (data, status) in errors.items():
            answer = client.post("/enqueue", data=data)
            assert answer.status_code == status, (data, answer.status_code)
            assert message in answer.text, (message, answer.text[:2000])
            for value in data.values():
                assert str(escape(value)) in answer.text  # the form keeps what was typed
    assert app.list_jobs().total == total + 1  # nothing stored by the refused sends


# --- under a prefix -----------------------------------------------------------------------------

_LINK = re.compile(r'(?<![\w-])(?:href|action|formaction|hx-get|hx-post|src)="([^"]*)"')


def _links(page: str) -> set[str]:
    return {html.unescape(m) for m in _LINK.findall(page)}


def _host_app() -> Starlette:
    """A host application of its own at ``/``: Starlette here; FastAPI is the same (it is a
    Starlette), and Django's asgi.py mounts its own application the same way (docs)."""

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("the host application")

    return Starlette(routes=[Route("/", home)])


def test_every_link_and_form_works_under_a_prefix(sqlite_site: Site) -> None:
    app, ids = sqlite_site.app, sqlite_site.ids
    host = Starlette(
        routes=[
            # named, and wrapped in middleware: neither hides the dashboard's routes
            Mount("/tasks", app=create_app(app, AUTH), name="tasks"),
            Mount("/", app=_host_app()),
        ]
    )
    with serving(host) as base, httpx.Client(base_url=base, auth=ADMIN, timeout=10) as client:
        assert client.get("/").text == "the host application"
        seen: set[str] = set()
        pages = ["/", "/jobs", f"/job?id={ids['failed']}", "/schedules", "/enqueue", "/workers"]
        for path in ["/tasks" + p for p in [*pages, f"/workflows?id={ids['workflow']}"]]:
            page = client.get(path)
            assert page.status_code == 200, path
            seen |= _links(page.text)
        assert seen, "no links found"
        for link in seen:
            path = link.removeprefix(base)
            assert path.startswith("/tasks/"), link
        gets = {link for link in seen if "/actions/" not in link and not link.endswith("/enqueue")}
        for link in gets:
            assert client.get(link).status_code == 200, link
        pause = client.post(
            "/tasks/actions/pause", data={"queue": "default", "next": f"{base}/tasks/"}
        )
        assert _done(pause) == f"{base}/tasks/?done=paused"
        assert app.stats()[0].paused
        sent = _done(client.post("/tasks/enqueue", data={"task": "shop.add", "args": "[1, 2]"}))
        assert sent.startswith(f"{base}/tasks/job?id=")
        assert client.get(sent).status_code == 200
        foreign = client.post(
            "/tasks/actions/resume", data={"queue": "default", "next": "https://evil.example/"}
        )
        assert _done(foreign) == f"{base}/tasks/?done=resumed"  # never sent off the app


# --- live updates -------------------------------------------------------------------------------


@pytest.mark.parametrize("events", [False, True])
def test_pages_name_the_event_stream_only_when_there_is_one(tmp_path: Path, events: bool) -> None:
    app = App("sqlite:///" + str(tmp_path / "jobs.db"), events=events)

    @app.task(name="shop.add")
    def add(a: int, b: int) -> int:
        return a + b

    job = add.send(1, 2).id
    dashboard = create_app(app)
    try:
        with serving(dashboard) as base, httpx.Client(base_url=base, timeout=10) as client:
            page = client.get(f"/job?id={job}").text
            overview = client.get("/").text
    finally:
        app.close()
    if events:
        assert f'data-events-url="{base}/api/v1/events?job_id={job}"' in page
        assert f'data-events-url="{base}/api/v1/events"' in overview
    else:  # events off: nothing is published, the pages poll
        assert "data-events-url" not in page and "data-events-url" not in overview


def test_each_action_is_logged_with_who_did_it(
    sqlite_site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="taskmill.web")
    ids = sqlite_site.ids
    with sqlite_site.client() as client:
        _done(client.post("/actions/retry", data={"id": ids["failed"]}))
        _done(client.post("/actions/pause", data={"queue": "default"}))
        _done(client.post("/enqueue", data={"task": "shop.charge", "args": '[1, "x", "pw-9"]'}))
    lines = [r.getMessage() for r in caplog.records if r.name == "taskmill.web"]
    assert lines[0] == f"admin@127.0.0.1 retried 1 job(s): {ids['failed']}"
    assert lines[1] == "admin@127.0.0.1 paused queue default"
    assert lines[2].startswith("admin@127.0.0.1 enqueued shop.charge as job ")
    assert not any("pw-9" in line or ADMIN[1] in line for line in lines)  # no secret logged
