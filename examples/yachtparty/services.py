"""A local fake of the external services the handlers call, and a way to serve an ASGI app.

- ``POST /events``: the event bus that starts the Solution Saga (``research_solution``);
- ``POST /sms``: the SMS gateway (``schedule_followup``);
- ``POST /faults``: ``{"path": "/events", "errors": ["500", "429", "timeout"]}`` makes the
  next calls to that path fail, one fault per call, in order: a status code, or ``timeout``
  (no answer for ``hang_s`` seconds, so the caller's timeout fires first); with
  ``"user_id": "bob"``, only the calls for that user (a call's body names its ``user_id``);
- ``GET /calls``: calls so far per path (answered or not), and calls in flight.

Every call takes a few milliseconds, as a real service over a network would.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from taskmill.testing import wait_until

PATHS = ("/events", "/sms")


@dataclass
class Faults:
    """What the fake will do wrong next, and what it was asked so far."""

    hang_s: float = 30.0
    pending: dict[tuple[str, str | None], deque[str]] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    in_flight: Counter[str] = field(default_factory=Counter)

    def add(self, path: str, user_id: str | None, errors: list[str]) -> None:
        for error in errors:
            if error != "timeout" and not (error.isdigit() and 400 <= int(error) <= 599):
                raise ValueError(f"a fault is a status code 400-599 or 'timeout', not {error!r}")
        self.pending.setdefault((path, user_id), deque()).extend(errors)

    def next(self, path: str, user_id: str | None) -> str | None:
        """The fault for this call: the user's own first, then the path's."""
        for key in ((path, user_id), (path, None)):
            queue = self.pending.get(key)
            if queue:
                return queue.popleft()
        return None


async def _hang(request: Request, seconds: float) -> None:
    """No answer for ``seconds``, or until the caller gives up and hangs up."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not await request.is_disconnected():
        await asyncio.sleep(0.05)


def _bad_request(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=400)


def fake_services(hang_s: float = 30.0) -> Starlette:
    """The fake as a Starlette app; ``app.state.faults`` is its ``Faults``."""
    faults = Faults(hang_s=hang_s)

    async def call(request: Request) -> JSONResponse:
        path = request.url.path
        faults.calls[path] += 1
        faults.in_flight[path] += 1
        try:
            body = await request.json()
            await asyncio.sleep(random.uniform(0.005, 0.03))
            fault = faults.next(path, body.get("user_id"))
            if fault == "timeout":
                await _hang(request, faults.hang_s)
            elif fault is not None:
                return JSONResponse({"error": f"injected {fault}"}, status_code=int(fault))
            if path == "/events":
                return JSONResponse({"event_id": str(uuid.uuid4()), "type": body.get("type")})
            return JSONResponse({"sid": "SM" + uuid.uuid4().hex[:16], "to": body.get("user_id")})
        finally:
            faults.in_flight[path] -= 1

    async def add_faults(request: Request) -> JSONResponse:
        body = await request.json()
        path, errors, user_id = body.get("path"), body.get("errors"), body.get("user_id")
        if path not in PATHS:
            return _bad_request(f"path must be one of {', '.join(PATHS)}, not {path!r}")
        if not isinstance(errors, list) or not all(isinstance(e, str) for e in errors):
            return _bad_request('errors must be a list of strings, such as ["500", "timeout"]')
        try:
            faults.add(path, user_id, errors)
        except ValueError as exc:
            return _bad_request(str(exc))
        return JSONResponse({"pending": sum(len(q) for q in faults.pending.values())})

    async def calls(request: Request) -> JSONResponse:
        return JSONResponse({"calls": dict(faults.calls), "in_flight": dict(faults.in_flight)})

    routes = [Route(p, call, methods=["POST"]) for p in PATHS]
    routes += [
        Route("/faults", add_faults, methods=["POST"]),
        Route("/calls", calls, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    app.state.faults = faults
    return app


@dataclass
class Served:
    """An ASGI app served by uvicorn on a loopback port, on a thread of this process."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def serve(asgi: Any, *, port: int = 0, timeout_s: float = 30.0) -> Served:
    """Serve ``asgi`` on 127.0.0.1 (``port`` 0: one the OS picks, bound here so nothing else
    takes it meanwhile); returns once the app's start-up (its lifespan) has run and the server
    accepts connections."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(
        asgi, log_level="warning", access_log=False, lifespan="on",
        timeout_graceful_shutdown=2,
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
    wait_until(
        lambda: server.started or not thread.is_alive(), timeout=timeout_s, what=f"{url} to start"
    )
    if not server.started:
        raise RuntimeError(f"the server at {url} did not start: {errors[0] if errors else '?'}")
    return Served(url, server, thread)
