"""A local fake of the external services the handlers call (``examples._support.serving``
serves it).

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
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from examples._support.faults import FaultScript, http_status_or_timeout

PATHS = ("/events", "/sms")


@dataclass
class Faults:
    """What the fake will do wrong next, and what it was asked so far."""

    hang_s: float = 30.0
    pending: FaultScript[tuple[str, str | None]] = field(
        default_factory=lambda: FaultScript(
            http_status_or_timeout, "a status code 400-599 or 'timeout'"
        )
    )
    calls: Counter[str] = field(default_factory=Counter)
    in_flight: Counter[str] = field(default_factory=Counter)

    def add(self, path: str, user_id: str | None, errors: list[str]) -> None:
        self.pending.add((path, user_id), errors)

    def next(self, path: str, user_id: str | None) -> str | None:
        """The fault for this call: the user's own first, then the path's."""
        return self.pending.next((path, user_id), (path, None))


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
        return JSONResponse({"pending": faults.pending.total()})

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
