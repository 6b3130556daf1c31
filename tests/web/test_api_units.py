"""The parts of the API and its security that need no server: redaction, the configuration
from the environment, the loopback rules (a non-loopback client is staged through httpx's
ASGI transport), and the OpenAPI schema against the route table."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from starlette.routing import Route

from taskmill import App, ConfigurationError
from taskmill.web import WebConfig, create_app
from taskmill.web.api import ENDPOINTS, PREFIX, openapi_schema
from taskmill.web.redact import REDACTED, redact, redact_call
from taskmill.web.security import check_bind, is_loopback


@pytest.fixture
def app() -> Iterator[App]:
    app = App("memory://")

    @app.task(name="connect")
    def connect(host: str, password: str, *rest: str, **options: str) -> None: ...

    yield app
    app.close()


# --- redaction ---------------------------------------------------------------------------------


def test_redact_hides_matching_keys_at_any_depth() -> None:
    value = {"User": "ann", "DB_Password": "x", "nested": [{"apiToken": 1, "ok": {"secret": 2}}]}
    assert redact(value, ["password", "token", "secret"]) == {
        "User": "ann",
        "DB_Password": REDACTED,
        "nested": [{"apiToken": REDACTED, "ok": {"secret": REDACTED}}],
    }
    assert value["DB_Password"] == "x"  # a copy
    assert redact(value, []) is value


def test_positional_arguments_are_matched_to_parameter_names(app: App) -> None:
    task = app.get_task("connect")
    args, kwargs = redact_call(
        ["db.local", "pw", "a", "b"],
        {"token_file": "/t", "mode": "ro"},
        task,
        ["password", "token"],
    )
    assert args == ["db.local", REDACTED, "a", "b"]
    assert kwargs == {"token_file": REDACTED, "mode": "ro"}
    # *rest's name matches: every extra positional argument is hidden
    args, _ = redact_call(["h", "pw", "x", "y"], {}, task, ["rest"])
    assert args == ["h", "pw", REDACTED, REDACTED]
    # an unknown task: only keyword names can be matched
    assert redact_call(["h", "pw"], {}, None, ["password"]) == (["h", "pw"], {})


# --- configuration -----------------------------------------------------------------------------


def test_config_from_the_environment() -> None:
    config = WebConfig.from_env(
        {
            "TASKMILL_DASHBOARD_USERS": "ops:pass:with:colons, dev:pw2",
            "TASKMILL_DASHBOARD_READ_ONLY_USERS": "view:pw3",
            "TASKMILL_DASHBOARD_TOKENS": "t1,,t2",
        },
        users={"extra": "pw4"},
    )
    assert dict(config.users) == {"ops": "pass:with:colons", "dev": "pw2", "extra": "pw4"}
    assert dict(config.read_only_users) == {"view": "pw3"}
    assert config.tokens == ("t1", "t2") and config.read_only_tokens == ()
    assert not WebConfig.from_env({}).has_auth


@pytest.mark.parametrize(
    ("environ", "words"),
    [
        ({"TASKMILL_DASHBOARD_USERS": "ops:pw,justapassword"}, "item 2 is not 'name:password'"),
        ({"TASKMILL_DASHBOARD_USERS": "ops:"}, "item 1"),
        ({"TASKMILL_DASHBOARD_USERS": "a:1", "TASKMILL_DASHBOARD_READ_ONLY_USERS": "a:2"},
         "both read-only and not"),
    ],
)  # fmt: skip
def test_config_errors_never_echo_secrets(environ: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        WebConfig.from_env(environ)
    assert words in str(info.value)
    assert "justapassword" not in str(info.value)


def test_an_empty_secret_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="empty password or token"):
        WebConfig(tokens=[""])


# --- loopback ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_binding_beyond_loopback_needs_auth() -> None:
    check_bind("127.0.0.1", WebConfig())
    check_bind("0.0.0.0", WebConfig(tokens=["a-token"]))
    with pytest.raises(ConfigurationError, match="refusing to serve the dashboard on ::"):
        check_bind("::", WebConfig())


async def _get(asgi: object, client_host: str, path: str, **kwargs: object) -> httpx.Response:
    transport = httpx.ASGITransport(app=asgi, client=(client_host, 40000))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://dash.example") as c:
        return await c.get(path, **kwargs)  # type: ignore[arg-type]


def test_without_auth_only_loopback_clients_get_in(app: App) -> None:
    asgi = create_app(app)
    refused = asyncio.run(_get(asgi, "203.0.113.9", "/api/v1/queues"))
    assert refused.status_code == 403
    assert "only loopback clients" in refused.json()["error"]
    assert asyncio.run(_get(asgi, "203.0.113.9", "/health")).status_code == 200  # a probe
    assert asyncio.run(_get(asgi, "127.0.0.1", "/api/v1/queues")).status_code == 200
    assert asyncio.run(_get(asgi, "::1", "/api/v1/queues")).status_code == 200


def test_with_auth_a_loopback_client_logs_in_too(app: App) -> None:
    asgi = create_app(app, WebConfig(tokens=["a-long-token"]))
    assert asyncio.run(_get(asgi, "127.0.0.1", "/api/v1/queues")).status_code == 401
    headers = {"Authorization": "Bearer a-long-token"}
    allowed = asyncio.run(_get(asgi, "203.0.113.9", "/api/v1/queues", headers=headers))
    assert allowed.status_code == 200


def test_malformed_basic_credentials(app: App) -> None:
    asgi = create_app(app, WebConfig(users={"ops": "pw"}))
    response = asyncio.run(_get(asgi, "127.0.0.1", "/api/v1/queues",
                                headers={"Authorization": "Basic %%%"}))  # fmt: skip
    assert response.status_code == 401 and "malformed" in response.json()["error"]


# --- the OpenAPI schema ------------------------------------------------------------------------


def test_the_schema_lists_every_route_of_the_app(app: App) -> None:
    schema = openapi_schema()
    assert schema["openapi"].startswith("3.1")
    documented = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    served = {
        (method, route.path)
        for route in create_app(app).routes
        if isinstance(route, Route)
        and (route.path.startswith(PREFIX) or route.path in ("/health", "/ready"))
        for method in (route.methods or set()) - {"HEAD"}
    }
    assert served == documented
    assert len(ENDPOINTS) + 2 == len(documented)
    send = schema["paths"]["/api/v1/jobs"]["post"]
    assert send["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SendBody"
    }
    assert set(schema["components"]["schemas"]["SendBody"]["properties"]) >= {
        "task", "args", "kwargs", "queue", "priority", "delay", "run_at", "key", "job_id", "meta",
    }  # fmt: skip
    assert {"404", "422", "401", "403"} <= set(send["responses"])
    operation_ids = [op["operationId"] for ops in schema["paths"].values() for op in ops.values()]
    assert len(set(operation_ids)) == len(operation_ids)
    assert "pause_queue" in operation_ids


def test_mounted_under_a_prefix(app: App) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    host = Starlette(routes=[Mount("/taskmill", app=create_app(app))])
    probe = asyncio.run(_get(host, "203.0.113.9", "/taskmill/health"))
    assert probe.status_code == 200  # still a probe under the prefix: no login
    assert asyncio.run(_get(host, "203.0.113.9", "/taskmill/api/v1/queues")).status_code == 403
    missing = asyncio.run(_get(host, "127.0.0.1", "/taskmill/api/v1/nothing"))
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    schema = asyncio.run(_get(host, "127.0.0.1", "/taskmill/api/v1/openapi.json")).json()
    assert schema["servers"] == [{"url": "/taskmill"}]
