"""What every route is given: the taskmill ``App``, the configuration, the request's user."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException

if TYPE_CHECKING:
    from starlette.requests import Request

    from taskmill.app import App
    from taskmill.web.config import User, WebConfig


@dataclass(frozen=True)
class Web:
    """The application's state, one per ``create_app``: ``request.app.state.web``."""

    app: App
    config: WebConfig


def web_of(request: Request) -> Web:
    web: Web = request.app.state.web
    return web


def user_of(request: Request) -> User | None:
    """The user the auth middleware let in (None: an anonymous loopback client)."""
    user: User | None = getattr(request.state, "user", None)
    return user


def require_write(request: Request) -> User | None:
    """The user, if they may change things; a 403 otherwise."""
    user = user_of(request)
    if user is not None and not user.can_write:
        raise HTTPException(403, f"user {user.name!r} is read-only")
    return user


def csp_nonce(request: Request) -> str:
    """This response's Content-Security-Policy nonce, for the pages' own ``<script>`` tags."""
    nonce: str = getattr(request.state, "csp_nonce", "")
    return nonce


def who(request: Request) -> str:
    """The name an action is logged with."""
    user = user_of(request)
    client = request.client.host if request.client else "?"
    return f"{user.name}@{client}" if user is not None else f"anonymous@{client}"
