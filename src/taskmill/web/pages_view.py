"""How the pages show things: the templates (Jinja2, autoescaped), times, ages, JSON values
with the configured names redacted, and the flash notice an action leaves."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import jinja2
from starlette.datastructures import URL, URLPath
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from taskmill.job import JobState
from taskmill.web.context import csp_nonce, user_of, web_of

DASH = "-"
"""What an unknown time or age is shown as."""

NAV = (
    ("page_overview", "Overview"),
    ("page_jobs", "Jobs"),
    ("page_workers", "Workers"),
    ("page_schedules", "Schedules"),
    ("page_workflows", "Workflows"),
    ("page_enqueue", "Enqueue"),
)

NOTICES = {
    "retried": "Retried {n} job(s).",
    "cancelled": "Cancelled {n} job(s) (a running job is asked to stop).",
    "ran": "{n} scheduled job(s) made due now.",
    "paused": "Queue paused: workers stop claiming from it.",
    "resumed": "Queue resumed.",
    "purged": "Purged {n} waiting job(s).",
    "triggered": "Schedule triggered: {n} job sent.",
    "deleted": "Deleted {n} finished job(s).",
    "unchanged": "Nothing to do: no job was in a state the action applies to.",
}
"""What an action's redirect says (``?done=retried&n=3``): fixed texts, so no request can put
words of its own on the page."""


def can_write(request: Request) -> bool:
    """Whether the page shows action buttons (the anonymous loopback client may write)."""
    user = user_of(request)
    return user is None or user.can_write


def _base_context(request: Request) -> dict[str, Any]:
    user = user_of(request)
    return {
        "csp_nonce": csp_nonce(request),
        "user_name": user.name if user is not None else None,
        "can_write": can_write(request),
        "can_delete": can_write(request),
        "site_title": web_of(request).config.title,
        "nav": NAV,
        "notice": notice_of(request),
    }


def notice_of(request: Request) -> str | None:
    """The text of the ``done`` notice in the URL, if it is one of ``NOTICES``."""
    text = NOTICES.get(request.query_params.get("done", ""))
    if text is None:
        return None
    n = request.query_params.get("n", "")
    return text.format(n=int(n) if n.isdigit() else "some")


def time_text(ts: float | None) -> str:
    """``2026-12-06 05:21:03 UTC`` (seconds since the epoch), or a dash."""
    if ts is None:
        return DASH
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def age_text(seconds: float | None) -> str:
    """A duration as people read it: ``42 s``, ``3 min 5 s``, ``2 h 10 min``, ``4 d 1 h``.

    >>> age_text(42.7), age_text(185), age_text(7800), age_text(349200), age_text(None)
    ('42 s', '3 min 5 s', '2 h 10 min', '4 d 1 h', '-')
    """
    if seconds is None:
        return DASH
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def json_text(value: Any) -> str:
    """A value as indented JSON (escaped by the template like any other text)."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def state_class(state: JobState | str | None) -> str:
    """The CSS class of a state's badge."""
    return f"state state-{state}" if state else "state"


def url_for(request: Request, name: str, /, **path_params: Any) -> URL:
    """The absolute URL of this application's route ``name``, under whatever prefix it is
    mounted at (``root_path``).

    Starlette's ``request.url_for`` asks the outermost router, which only finds this
    application's routes through an unnamed ``Mount`` whose app is this one; a named mount,
    or middleware wrapped around the dashboard, would hide them."""
    path: URLPath = request.app.url_path_for(name, **path_params)
    return path.make_absolute_url(app_base(request))


def app_base(request: Request) -> URL:
    """This application's own base URL: where it is mounted (``request.base_url`` is the
    outermost application's)."""
    root: str = request.scope.get("root_path", "")
    return request.url.replace(path=root.rstrip("/") + "/", query="", fragment="")


@jinja2.pass_context
def _template_url_for(context: Mapping[str, Any], name: str, /, **path_params: Any) -> URL:
    return url_for(context["request"], name, **path_params)


_env = jinja2.Environment(
    loader=jinja2.PackageLoader("taskmill.web", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(time=time_text, age=age_text, json=json_text, state_class=state_class)
_env.globals["url_for"] = _template_url_for  # before Jinja2Templates sets its own
templates = Jinja2Templates(env=_env, context_processors=[_base_context])


def render(
    request: Request, name: str, context: dict[str, Any], status_code: int = 200
) -> Response:
    """A page or a partial, with what every template is given (user, nonce, notice...)."""
    return templates.TemplateResponse(request, name, context, status_code=status_code)
