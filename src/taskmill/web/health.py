"""``GET /health`` and ``GET /ready``: for load balancers and orchestrators' probes.

Both answer without a login (probes cannot log in; ``taskmill.web.security.PUBLIC_PATHS``)
and show no job data: counts per queue and state, the oldest waiting job's age, paused or
not. Each waits at most ``WebConfig.health_timeout_s`` (2 s) for the broker.

- ``/health``: 200 ``{"status": "ok", "queues": {...}}`` when the broker answered the
  statistics in time; 503 ``{"status": "unavailable", "error": ...}`` otherwise (the reason is
  logged in full on ``taskmill.web``; the answer names only its kind).
- ``/ready``: 200 ``{"status": "ready"}`` when the broker is reachable (it read its clock), 503
  otherwise. Cheaper than ``/health``: use it for readiness, ``/health`` for monitoring.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from taskmill.web.context import web_of

log = logging.getLogger("taskmill.web")

T = TypeVar("T")

_NO_STORE = {"Cache-Control": "no-store"}


class _Unavailable(Exception):
    pass


async def _bounded(request: Request, call: Awaitable[T], what: str) -> T:
    timeout = web_of(request).config.health_timeout_s
    try:
        async with asyncio.timeout(timeout):
            return await call
    except TimeoutError:
        log.warning("%s: the broker did not answer within %g s", what, timeout)
        raise _Unavailable(f"the broker did not answer within {timeout:g} s") from None
    except Exception as exc:
        log.warning("%s: the broker failed: %s: %s", what, type(exc).__name__, exc)
        raise _Unavailable(f"the broker failed ({type(exc).__name__})") from None


def _unavailable(reason: str) -> JSONResponse:
    return JSONResponse({"status": "unavailable", "error": reason}, 503, headers=_NO_STORE)


async def health(request: Request) -> JSONResponse:
    app = web_of(request).app
    try:
        stats = await _bounded(request, app.astats(), "health")
    except _Unavailable as exc:
        return _unavailable(str(exc))
    queues: dict[str, Any] = {
        s.queue: {"counts": dict(s.counts), "oldest_waiting_s": s.oldest_waiting_s,
                  "paused": s.paused}
        for s in stats
    }  # fmt: skip
    return JSONResponse({"status": "ok", "queues": queues}, headers=_NO_STORE)


async def ready(request: Request) -> JSONResponse:
    app = web_of(request).app
    try:
        await _bounded(request, app.anow(), "ready")
    except _Unavailable as exc:
        return _unavailable(str(exc))
    return JSONResponse({"status": "ready"}, headers=_NO_STORE)


def routes() -> list[BaseRoute]:
    return [Route("/health", health), Route("/ready", ready)]
