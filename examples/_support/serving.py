"""A web app served on a thread of this process, on a loopback port: how an example serves its
API and its fake services, and how the end-to-end tests serve them too."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from typing import Any, Literal

import uvicorn

from taskmill.testing import wait_until


@dataclass
class Served:
    """An ASGI app served by uvicorn; ``url`` is its base URL (no trailing slash)."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish (within the grace period), join."""
        self.server.should_exit = True
        self.thread.join(15)


def serve(
    asgi: Any,
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    lifespan: Literal["on", "off", "auto"] = "on",
    grace_s: int = 5,
    timeout_s: float = 30.0,
) -> Served:
    """Serve ``asgi`` on ``host:port`` (``port`` 0: one the OS picks, bound here first so that
    nothing takes it meanwhile); returns once the app's start-up (its lifespan) has run and the
    server accepts connections. ``grace_s`` bounds the shutdown: a request still waiting (on a
    fake's injected hang, an open WebSocket) must not hold it for ever."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    url = f"http://{host}:{sock.getsockname()[1]}"
    config = uvicorn.Config(
        asgi, log_level="warning", access_log=False, lifespan=lifespan,
        timeout_graceful_shutdown=grace_s,
    )  # fmt: skip
    server = uvicorn.Server(config)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # reported by the wait below
            errors.append(exc)
        finally:
            sock.close()

    thread = threading.Thread(target=run, name=f"uvicorn {url}", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), timeout=timeout_s,
                   what=f"{url} to start")  # fmt: skip
    except TimeoutError:
        server.should_exit = True
        raise
    if not server.started:
        raise RuntimeError(f"the server at {url} did not start: {errors[0] if errors else '?'}")
    return Served(url, server, thread)
