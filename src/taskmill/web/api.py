"""The HTTP API, JSON under ``/api/v1``."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from taskmill.web.context import web_of


async def list_queues(request: Request) -> JSONResponse:
    stats = await web_of(request).app.astats()
    return JSONResponse([{"queue": s.queue, "counts": dict(s.counts)} for s in stats])


def routes() -> list[BaseRoute]:
    return [Route("/api/v1/queues", list_queues)]
