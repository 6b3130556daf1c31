"""taskmill in a FastAPI application (``pip install 'taskmill[fastapi]'``): everything of
``taskmill.integrations.starlette`` (a FastAPI application is a Starlette one), plus two
annotated dependencies. See docs/fastapi.md.

- ``TaskmillApp``: ``Annotated[App, Depends(taskmill_app)]``, the ``App`` the lifespan opened;
- ``TaskmillWorker``: ``Annotated[EmbeddedWorker, Depends(taskmill_worker)]``, its embedded
  worker (for a health route).

>>> import asyncio
>>> import httpx
>>> from fastapi import FastAPI
>>> from taskmill import App
>>> tasks = App("memory://")
>>> api = FastAPI(lifespan=taskmill_lifespan(tasks, worker=True))
>>> @api.get("/worker")
... def worker_state(worker: TaskmillWorker) -> dict[str, bool]:
...     return {"running": worker.running}
>>> async def probe() -> object:
...     async with api.router.lifespan_context(api):  # the server's startup and shutdown
...         transport = httpx.ASGITransport(app=api)
...         async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
...             return (await client.get("/worker")).json()
>>> asyncio.run(probe())
{'running': True}
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from taskmill.app import App
from taskmill.integrations.starlette import (
    STATE_APP,
    STATE_WORKER,
    WORKER_OPTIONS,
    Lifespan,
    TaskmillLifespan,
    check_prefix,
    dashboard_mount,
    event_json,
    forward_events,
    mount_dashboard,
    taskmill_app,
    taskmill_lifespan,
    taskmill_worker,
    worker_options,
)
from taskmill.worker.embed import EmbeddedWorker

TaskmillApp = Annotated[App, Depends(taskmill_app)]
"""An endpoint's parameter ``tasks: TaskmillApp`` is the ``App`` of ``taskmill_lifespan``."""
TaskmillWorker = Annotated[EmbeddedWorker, Depends(taskmill_worker)]
"""An endpoint's parameter ``worker: TaskmillWorker`` is the lifespan's embedded worker."""

__all__ = [
    "STATE_APP",
    "STATE_WORKER",
    "WORKER_OPTIONS",
    "Lifespan",
    "TaskmillApp",
    "TaskmillLifespan",
    "TaskmillWorker",
    "check_prefix",
    "dashboard_mount",
    "event_json",
    "forward_events",
    "mount_dashboard",
    "taskmill_app",
    "taskmill_lifespan",
    "taskmill_worker",
    "worker_options",
]
