"""The dashboard's security rows not covered in ``tests/web/`` (which has the auth matrix over
the API, cross-site POSTs, the headers, escaping on the job page, the bind refusal off
loopback): S2, every route the router has, pages and static files and metrics included, asks
for a login except ``/health`` and ``/ready``; S3, no mutating route answers GET; S4, user
names match exactly; S5, hostile text in queue names, task names, arguments, errors and
metadata is escaped on every page, and no page has a script without the response's nonce or
an inline event handler; S1 on loopback: served without auth, saying so."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from examples._support.serving import Served
from examples._support.serving import serve as serve_asgi
from starlette.routing import Mount, Route

from servers import free_port
from taskmill import App, JobState
from taskmill.errors import ConfigurationError
from taskmill.testing import wait_until
from taskmill.web import WebConfig, create_app
from taskmill.web.security import PUBLIC_PATHS
from web.webapp import build_app

TESTS = Path(__file__).resolve().parents[1]
ALICE = ("alice@example.com", "alice-password-1")
AUTH = WebConfig(users={ALICE[0]: ALICE[1]})
HOSTILE = '<img src=x onerror="alert(1)"><script>alert(2)</script>'


class _Handlers(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found += [f"<{tag} {name}=...>" for name, _ in attrs if name.startswith("on")]


def _event_handlers(html: str) -> list[str]:
    """The inline event handler attributes (``onclick=``...) of the page's elements."""
    parser = _Handlers()
    parser.feed(html)
    return parser.found


def basic(name: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()}


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    app = build_app(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield app
    app.close()


@pytest.fixture
def served(app: App) -> Iterator[Served]:
    served = serve_asgi(create_app(app, AUTH), lifespan="off", grace_s=2, timeout_s=15)
    yield served
    served.stop()


def _every_route(app: App) -> list[tuple[str, str]]:
    """(method, path) of every route of the router, path parameters filled in."""
    found: list[tuple[str, str]] = []
    for route in create_app(app, AUTH).routes:
        if isinstance(route, Mount):
            found.append(("GET", f"{route.path}/htmx.min.js"))
        elif isinstance(route, Route):
            path = re.sub(r"\{[^}]+\}", "x", route.path)
            found += [(m, path) for m in sorted(route.methods or {"GET"}) if m != "HEAD"]
    return found


def test_s2_every_route_asks_for_a_login_but_the_probes(app: App, served: Served) -> None:
    routes = _every_route(app)
    assert len(routes) > 30 and ("GET", "/metrics") in routes and ("GET", "/static/htmx.min.js")
    open_routes, statuses = [], {}
    with httpx.Client(base_url=served.url, timeout=10) as client:
        for method, path in routes:
            status = client.request(method, path).status_code
            statuses[f"{method} {path}"] = status
            if status != 401:
                open_routes.append(f"{method} {path} -> {status}")
        unknown = client.get("/no/such/page").status_code
    assert sorted(open_routes) == sorted(f"GET {p} -> 200" for p in PUBLIC_PATHS)
    assert unknown == 401  # which paths exist is not shown either
    closed = len(routes) - len(PUBLIC_PATHS)
    print(f"S2: {len(routes)} routes from the router; {closed} answer 401 without a login, "
          f"the {len(PUBLIC_PATHS)} probes 200; an unknown path 401")  # fmt: skip


def test_s3_no_mutating_route_answers_get(app: App, served: Served) -> None:
    failed = app.get_task("ops.fail").send()
    app.run_until_idle()
    mutating = [(m, p) for m, p in _every_route(app) if m == "POST"]
    answered = {}
    with httpx.Client(base_url=served.url, timeout=10, headers=basic(*ALICE)) as client:
        for _, path in mutating:
            if ("GET", path) in _every_route(app):
                continue  # a page and its form's action share the path (/enqueue)
            answered[path] = client.get(path).status_code
    # 405, or 404 where the path reads as another GET route's (GET /api/v1/jobs/retry is the
    # job whose id is "retry"): either way nothing changes
    assert set(answered.values()) <= {404, 405}, answered
    assert app.get_job(failed.id).state is JobState.FAILED  # nothing was retried
    counts = {s: list(answered.values()).count(s) for s in sorted(set(answered.values()))}
    print(f"S3: {len(answered)} POST-only routes answer GET with {counts}; nothing changed")


@pytest.mark.parametrize(
    "name",
    ["alice@example.com.evil.com", "ALICE@example.com", "alice@example.com\n",
     "alice@example.com ", " alice@example.com", "alice@example", "alice@example.co"],
)  # fmt: skip
def test_s4_user_names_match_exactly(name: str, served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=10) as client:
        assert client.get("/api/v1/queues", headers=basic(*ALICE)).status_code == 200
        assert client.get("/api/v1/queues", headers=basic(name, ALICE[1])).status_code == 401
        assert client.get("/", headers=basic(name, ALICE[1])).status_code == 401


def test_s5_hostile_text_is_escaped_on_every_page(tmp_path: Path) -> None:
    app = App(f"sqlite:///{tmp_path / 'xss.db'}")

    @app.task(name="xss.fail", queue="xss", retries=0)
    def fail(text: str) -> None:
        raise ValueError(text)

    @app.task(name="xss.ok", queue="xss")
    def ok(text: str) -> str:
        return text

    try:
        refused = []
        for what, call in (
            ("queue name", lambda: ok.options(queue=HOSTILE).send("x")),
            ("task name", lambda: app.task(name=HOSTILE)(lambda: None)),
        ):
            try:
                call()
            except ConfigurationError as exc:
                refused.append(f"{what}: {type(exc).__name__}")
        # names are checked at declaration and at send (docs/payloads.md, limits): markup
        # cannot become a queue or task name, so it is in arguments, errors and metadata only
        assert refused == ["queue name: ConfigurationError", "task name: ConfigurationError"]
        failed = fail.options(meta={"note": HOSTILE}).send(HOSTILE)
        done = ok.send(HOSTILE)
        app.run_until_idle()
        served = serve_asgi(create_app(app), lifespan="off", grace_s=2, timeout_s=15)
        pages = ["/", "/jobs", "/jobs?state=failed", "/workers", "/schedules", "/workflows",
                 "/enqueue", f"/job?id={failed.id}", f"/job?id={done.id}",
                 f"/partials/job?id={failed.id}", "/jobs?queue=xss", "/partials/overview",
                 "/queues/purge?queue=xss"]  # fmt: skip
        problems = []
        try:
            with httpx.Client(base_url=served.url, timeout=10) as client:
                for path in pages:
                    response = client.get(path)
                    assert response.status_code == 200, (path, response.text[:300])
                    html = response.text
                    csp = response.headers["content-security-policy"]
                    nonce = re.search(r"'nonce-([^']+)'", csp)
                    assert nonce is not None, csp
                    if HOSTILE in html or "<img src=x" in html:
                        problems.append(f"{path}: unescaped")
                    for tag in re.findall(r"<script\b[^>]*>", html):
                        if "src=" not in tag and f'nonce="{nonce.group(1)}"' not in tag:
                            problems.append(f"{path}: inline script without the nonce: {tag}")
                    handlers = _event_handlers(html)
                    if handlers:
                        problems.append(f"{path}: inline event handlers {handlers}")
        finally:
            served.stop()
        assert problems == []
        print(f"S5: {len(pages)} pages with hostile text in arguments, errors, tracebacks and "
              f"metadata: all escaped, CSP with a fresh nonce, no script without it; refused at "
              f"send: {', '.join(refused) or 'none'}")  # fmt: skip
    finally:
        app.close()


def test_s1_loopback_without_auth_serves_and_says_so(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
    env["TASKMILL_URL"] = f"sqlite:///{tmp_path / 'jobs.db'}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    log = tmp_path / "dashboard.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskmill", "dashboard", "web.dashboard_app:app",
             "--host", "127.0.0.1", "--port", str(port)],
            env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:

            def ready() -> bool:
                assert proc.poll() is None, log.read_text()
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).is_success
                except httpx.TransportError:
                    return False

            wait_until(ready, timeout=30, what="the dashboard on 127.0.0.1")
            assert httpx.get(f"http://127.0.0.1:{port}/api/v1/queues").status_code == 200
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
    assert "auth: none, loopback clients only" in log.read_text()
