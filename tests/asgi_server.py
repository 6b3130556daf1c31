"""An ASGI application served for real (uvicorn on a free loopback port, in a thread), for the
dashboard's page and browser tests; and a stand-in for the dashboard's auth middleware while
``taskmill.web.security`` is not in the tree.

The stand-in only does what the pages rely on: HTTP basic auth against ``WebConfig.users`` /
``read_only_users`` (a 401 with ``WWW-Authenticate: Basic`` otherwise, so a browser logs in),
and ``request.state.user`` set to the ``User``. With the real middleware present
(``create_app`` adds it), nothing is wrapped.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import importlib.util
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

from servers import free_port
from taskmill.testing import wait_until
from taskmill.web import User, WebConfig

HAS_SECURITY = importlib.util.find_spec("taskmill.web.security") is not None


@contextlib.contextmanager
def serving(asgi: Any) -> Iterator[str]:
    """Serve ``asgi`` on ``127.0.0.1``; its base URL (``http://127.0.0.1:PORT``)."""
    port = free_port()
    config = uvicorn.Config(
        asgi, host="127.0.0.1", port=port, log_level="warning", lifespan="off", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), what="uvicorn to start")
        if not server.started:
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def with_auth(asgi: Any, config: WebConfig) -> Any:
    """``asgi`` behind basic auth for ``config``'s users: the real middleware's job once it
    exists (then ``asgi`` is returned as it is)."""
    return asgi if HAS_SECURITY else _StandInAuth(asgi, config)


class _StandInAuth:
    def __init__(self, app: Any, config: WebConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.config.has_auth:
            await self.app(scope, receive, send)
            return
        user = self._user(dict(scope["headers"]).get(b"authorization", b""))
        if user is None:
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [(b"www-authenticate", b'Basic realm="taskmill"')],
                }
            )
            await send({"type": "http.response.body", "body": b"log in"})
            return
        scope.setdefault("state", {})["user"] = user
        await self.app(scope, receive, send)

    def _user(self, header: bytes) -> User | None:
        if not header.startswith(b"Basic "):
            return None
        name, _, password = base64.b64decode(header[6:]).decode().partition(":")
        for users, can_write in ((self.config.users, True), (self.config.read_only_users, False)):
            expected = users.get(name)
            if expected is not None and hmac.compare_digest(expected, password):
                return User(name, can_write)
        return None
