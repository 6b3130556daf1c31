"""``create_app``: the one ASGI application (pages, API, health, metrics) for a taskmill App."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from taskmill.web import api, health, metrics, pages
from taskmill.web.config import WebConfig
from taskmill.web.context import Web
from taskmill.web.security import SecurityMiddleware

if TYPE_CHECKING:
    from taskmill.app import App


def create_app(app: App, config: WebConfig | None = None) -> Starlette:
    """The dashboard, the HTTP API under ``/api/v1``, ``/health``, ``/ready`` and ``/metrics``
    for ``app``, as one Starlette application (mount it under any prefix)."""
    config = config or WebConfig()
    routes: list[BaseRoute] = [
        *api.routes(),
        *health.routes(),
        *metrics.routes(),
        *pages.routes(),
    ]
    asgi = Starlette(
        routes=routes,
        middleware=[Middleware(SecurityMiddleware, config=config)],
        exception_handlers=api.exception_handlers(),
    )
    asgi.state.web = Web(app, config)
    return asgi
