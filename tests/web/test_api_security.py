"""Who may do what, against the real server: the auth matrix (anonymous, wrong secret,
read-only, admin, by basic auth and by token, and loopback without auth) over every route of
the API; cross-site requests; the security headers; secrets kept out of the logs; the probes
when the broker is down. Auth does not depend on the broker: these run on SQLite, and the
probes' outage on a Redis server of the test's own."""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from servers import RedisServer
from taskmill import App, JobState
from taskmill.web import User, WebConfig
from taskmill.web.api import ENDPOINTS, PREFIX, Endpoint
from web.webapp import build_app

ADMIN = ("admin", "admin-password-1")
VIEWER = ("viewer", "viewer-password-1")
ADMIN_TOKEN = "admin-token-0123456789"
VIEWER_TOKEN = "viewer-token-0123456789"
SECRETS = [ADMIN[1], VIEWER[1], ADMIN_TOKEN, VIEWER_TOKEN]

AUTH = WebConfig(
    users={ADMIN[0]: ADMIN[1]},
    read_only_users={VIEWER[0]: VIEWER[1]},
    tokens=[ADMIN_TOKEN],
    read_only_tokens=[VIEWER_TOKEN],
)


def basic(name: str, password: str) -> dict[str, str]:
    encoded = base64.b64encode(f"{name}:{password}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def sqlite_app(tmp_path: Path) -> Iterator[App]:
    app = build_app(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield app
    app.close()


@pytest.fixture
def failed_id(sqlite_app: App) -> str:
    handle = sqlite_app.get_task("ops.fail").send()
    sqlite_app.run_until_idle()
    return handle.id


def _request(e: Endpoint, failed_id: str) -> tuple[str, str, dict[str, object] | None]:
    path = PREFIX + e.path.format(job_id=failed_id, queue="default", name="nightly-add")
    bodies: dict[str, dict[str, object]] = {
        "/jobs": {"task": "math.add", "args": [1, 2]},
        "/jobs/retry": {"all": True},
    }
    return e.method, path, bodies.get(e.path) if e.method == "POST" else None


def _call_every_route(
    client: httpx.Client, failed_id: str, headers: dict[str, str]
) -> dict[tuple[str, str], int]:
    """Each route of the API once, in the table's order: (method, path) -> status."""
    statuses = {}
    for e in ENDPOINTS:
        method, path, body = _request(e, failed_id)
        response = client.request(method, path, json=body, headers=headers)
        statuses[(e.method, e.path)] = response.status_code
        if response.status_code == 401:
            assert response.headers["www-authenticate"].startswith("Basic realm=")
    return statuses


ROLES: dict[str, tuple[dict[str, str], str]] = {
    "anonymous": ({}, "none"),
    "wrong password": (basic(ADMIN[0], "not-the-password"), "none"),
    "unknown user": (basic("mallory", ADMIN[1]), "none"),
    "wrong token": (bearer("not-a-token"), "none"),
    "read-only user": (basic(*VIEWER), "read"),
    "read-only token": (bearer(VIEWER_TOKEN), "read"),
    "admin user": (basic(*ADMIN), "write"),
    "admin token": (bearer(ADMIN_TOKEN), "write"),
}


def _allowed(status: int) -> bool:
    """Let through: answered by the route (409: events are off in this app)."""
    return status not in (401, 403) and status < 500


@pytest.mark.parametrize("role", sorted(ROLES))
def test_auth_matrix_over_every_route(
    role: str, sqlite_app: App, failed_id: str, serve: Callable[..., str]
) -> None:
    headers, may = ROLES[role]
    with httpx.Client(base_url=serve(sqlite_app, AUTH), timeout=10) as client:
        statuses = _call_every_route(client, failed_id, headers)
        for probe in ("/health", "/ready"):  # no login needed, whoever asks
            assert client.get(probe, headers=headers).status_code == 200
    wrong = {}
    for (method, path), status in statuses.items():
        if may == "none":
            expected_ok = status == 401
        elif may == "read":
            expected_ok = status == 403 if method == "POST" else _allowed(status)
        else:
            expected_ok = _allowed(status)
        if not expected_ok:
            wrong[f"{method} {path}"] = status
    assert wrong == {}, f"{role}: unexpected statuses"
    if may != "write":  # nothing changed
        assert sqlite_app.get_job(failed_id).state is JobState.FAILED
        assert not any(s.paused for s in sqlite_app.stats())
        assert sqlite_app.list_jobs().total == 1


def test_loopback_without_auth_is_an_admin(
    sqlite_app: App, failed_id: str, serve: Callable[..., str]
) -> None:
    with httpx.Client(base_url=serve(sqlite_app), timeout=10) as client:
        statuses = _call_every_route(client, failed_id, {})
    assert {k: v for k, v in statuses.items() if not _allowed(v)} == {}
    assert statuses[("POST", "/jobs")] == 201
    assert statuses[("POST", "/queues/{queue}/purge")] == 200
    assert statuses[("POST", "/schedules/{name}/trigger")] == 201


def test_a_read_only_user_of_the_hook_is_refused_actions(
    sqlite_app: App, serve: Callable[..., str]
) -> None:
    async def authenticate(request: object) -> User | None:
        headers = getattr(request, "headers", {})
        role = headers.get("x-role")
        return None if role is None else User(f"sso-{role}", can_write=role == "admin")

    config = WebConfig(authenticate=authenticate, users={ADMIN[0]: ADMIN[1]})
    with httpx.Client(base_url=serve(sqlite_app, config), timeout=10) as client:
        assert client.get("/api/v1/queues", headers={"x-role": "viewer"}).status_code == 200
        refused = client.post("/api/v1/queues/default/pause", headers={"x-role": "viewer"})
        assert refused.status_code == 403
        assert refused.json() == {"error": "user 'sso-viewer' is read-only"}
        acted = client.post("/api/v1/queues/default/pause", headers={"x-role": "admin"})
        assert acted.status_code == 200
        # the hook said nothing: the built-in users are tried next
        assert client.get("/api/v1/queues", headers=basic(*ADMIN)).status_code == 200
        assert client.get("/api/v1/queues").status_code == 401


# --- cross-site requests -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:1"},  # same host, another port: another origin
    ],
)
def test_a_cross_site_post_is_refused(
    headers: dict[str, str], sqlite_app: App, serve: Callable[..., str]
) -> None:
    with httpx.Client(base_url=serve(sqlite_app, AUTH), timeout=10) as client:
        all_headers = {**basic(*ADMIN), **headers}
        response = client.post("/api/v1/jobs", json={"task": "math.add", "args": [1, 2]},
                               headers=all_headers)  # fmt: skip
        assert response.status_code == 403
        assert response.json()["error"].startswith("cross-site request refused")
        paused = client.post("/api/v1/queues/default/pause", headers=all_headers)
        assert paused.status_code == 403
        # reading is not refused: GET changes nothing
        assert client.get("/api/v1/queues", headers=all_headers).status_code == 200
    assert sqlite_app.list_jobs().total == 0
    assert not any(s.paused for s in sqlite_app.stats())


def test_a_same_origin_post_passes(sqlite_app: App, serve: Callable[..., str]) -> None:
    url = serve(sqlite_app, AUTH)
    with httpx.Client(base_url=url, timeout=10) as client:
        headers = {**basic(*ADMIN), "Origin": url, "Sec-Fetch-Site": "same-origin"}
        response = client.post("/api/v1/jobs", json={"task": "math.add", "args": [1, 2]},
                               headers=headers)  # fmt: skip
        assert response.status_code == 201


# --- headers -----------------------------------------------------------------------------------


def test_security_headers_on_every_response(sqlite_app: App, serve: Callable[..., str]) -> None:
    with httpx.Client(base_url=serve(sqlite_app, AUTH), timeout=10) as client:
        responses = [
            client.get("/api/v1/queues", headers=basic(*ADMIN)),
            client.get("/api/v1/queues"),  # 401
            client.get("/api/v1/nothing", headers=basic(*ADMIN)),  # 404
            client.post("/api/v1/queues/default/pause", headers=basic(*VIEWER)),  # 403
            client.get("/health"),
        ]
    nonces = set()
    for response in responses:
        csp = response.headers["content-security-policy"]
        for directive in ("default-src 'self'", "object-src 'none'", "frame-ancestors 'none'",
                          "base-uri 'none'", "form-action 'self'"):  # fmt: skip
            assert directive in csp, (response.request.url, csp)
        script_src = next(d for d in csp.split("; ") if d.startswith("script-src"))
        assert "'unsafe-inline'" not in script_src
        nonces.add(script_src.split("'nonce-")[1].rstrip("'"))
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "same-origin"
    assert len(nonces) == len(responses)  # a fresh nonce per response


# --- logs --------------------------------------------------------------------------------------


def test_secrets_are_never_logged_and_actions_are(
    sqlite_app: App, serve: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with httpx.Client(base_url=serve(sqlite_app, AUTH), timeout=10) as client:
        client.get("/api/v1/queues", headers=basic(ADMIN[0], VIEWER[1]))  # someone else's
        client.get("/api/v1/queues", headers=bearer(VIEWER_TOKEN + "x"))
        client.get("/api/v1/queues", headers=basic(*VIEWER))
        login = {"task": "auth.login", "kwargs": {"user": "ann", "password": "job-password-9"}}
        sent = client.post("/api/v1/jobs", headers=bearer(ADMIN_TOKEN), json=login)
        client.post("/api/v1/queues/text/pause", headers=basic(*ADMIN))
        client.post("/api/v1/queues/text/pause", headers=basic(*VIEWER))
    # the server's logs (the client's own, httpx's, are not the server's to keep clean)
    server_lines = [
        f"{record.getMessage()} {record.__dict__}"  # with the structured fields (extra=)
        for record in caplog.records
        if not record.name.startswith(("httpx", "httpcore"))
    ]
    for secret in [*SECRETS, "job-password-9"]:
        assert not [line for line in server_lines if secret in line]
    actions = [r.getMessage() for r in caplog.records if r.name == "taskmill.web"]
    assert f"token-1@127.0.0.1 sent job {sent.json()['id']} (auth.login)" in actions
    assert "admin@127.0.0.1 paused queue text" in actions
    assert not any("viewer" in a for a in actions)  # refused: not done, not logged as done


# --- probes when the broker is down ------------------------------------------------------------


def test_probes_answer_503_in_bounded_time_when_the_broker_is_down(
    redis_server_aof: RedisServer, serve: Callable[..., str]
) -> None:
    app = build_app(f"{redis_server_aof.url}?prefix=p{uuid.uuid4().hex[:8]}:")
    try:
        url = serve(app, WebConfig(health_timeout_s=1.0))
        with httpx.Client(base_url=url, timeout=20) as client:
            assert client.get("/health").status_code == 200
            redis_server_aof.freeze()  # accepts connections, answers nothing
            try:
                for probe in ("/health", "/ready"):
                    started = time.monotonic()
                    response = client.get(probe)
                    assert time.monotonic() - started < 5
                    assert response.status_code == 503
                    assert response.json() == {
                        "status": "unavailable",
                        "error": "the broker did not answer within 1 s",
                    }
            finally:
                redis_server_aof.thaw()
            redis_server_aof.kill()  # refuses connections
            response = client.get("/ready")
            assert response.status_code == 503
            assert response.json()["status"] == "unavailable"
    finally:
        redis_server_aof.start()  # the app's close talks to it
        app.close()
