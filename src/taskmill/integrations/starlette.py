"""taskmill in a Starlette or FastAPI application (``pip install 'taskmill[fastapi]'``, or
Starlette alone with the ``web`` extra). See docs/fastapi.md.

- ``taskmill_lifespan(app, worker=..., then=...)``: the application's lifespan. At startup it
  opens the taskmill ``App``, runs your own lifespan (``then``), and starts a worker on the
  server's event loop if ``worker`` asks for one; at shutdown it drains that worker, ends
  your lifespan, and closes the ``App``. The ``App`` and the worker are on
  ``request.app.state.taskmill`` and ``request.app.state.taskmill_worker``.
- ``taskmill_app(connection)`` and ``taskmill_worker(connection)``: those two, for
  ``Depends`` (FastAPI) or a plain call (Starlette), with a clear error when the lifespan did
  not run.
- ``forward_events(websocket, events)``: live job events (``handle.awatch()``,
  ``app.events(...)``) to a browser over a WebSocket, as JSON, until they end or the client
  goes away.
- ``mount_dashboard(site, app, "/tasks", config)``: taskmill's dashboard, HTTP API, health and
  metrics (``taskmill.web.create_app``) under a prefix of your application, behind the
  dashboard's own auth (with none configured: loopback clients only).

Sends need nothing more: ``await some_task.asend(...)`` in an endpoint stores the job from
the server's event loop without blocking it.

>>> import asyncio
>>> from starlette.applications import Starlette
>>> from taskmill import App
>>> tasks = App("memory://")
>>> @tasks.task()
... async def double(x: int) -> int:
...     return 2 * x
>>> site = Starlette(lifespan=taskmill_lifespan(tasks, worker={"concurrency": 2}))
>>> async def serve() -> int:  # what the server does at startup, then at shutdown
...     async with site.router.lifespan_context(site):
...         assert site.state.taskmill_worker.running
...         handle = await double.asend(21)  # as an endpoint would
...         return await handle.aresult(timeout=10)
>>> asyncio.run(serve())
42
>>> site.state.taskmill_worker.running  # shutdown drained it
False
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import HTTPConnection
from starlette.routing import Mount
from starlette.websockets import WebSocket, WebSocketDisconnect

from taskmill.app import App
from taskmill.errors import ConfigurationError
from taskmill.events import Event
from taskmill.web import WebConfig, create_app
from taskmill.worker.embed import EmbeddedWorker
from taskmill.worker.worker import Worker

Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]
"""A Starlette/FastAPI lifespan: given the application, an async context manager that may
yield a state mapping (``request.state``) or None."""

STATE_APP = "taskmill"
"""The attribute of ``request.app.state`` holding the taskmill ``App``."""
STATE_WORKER = "taskmill_worker"
"""The attribute of ``request.app.state`` holding the embedded worker (None without one)."""

# the Worker's own options, less the two the lifespan gives it
WORKER_OPTIONS = frozenset(inspect.signature(Worker.__init__).parameters) - {"self", "app"}


class TaskmillLifespan:
    """The lifespan ``taskmill_lifespan`` returns: call it with the application (Starlette
    does) to get the async context manager of one server run. It can run again after it
    ended (a test client entered twice): each run opens the ``App`` and makes a new worker.
    """

    def __init__(
        self,
        app: App,
        *,
        worker: bool | Mapping[str, Any] = False,
        then: Lifespan | None = None,
    ) -> None:
        if not isinstance(app, App):
            raise ConfigurationError(
                f"taskmill_lifespan needs a taskmill App, not {type(app).__name__}"
            )
        if then is not None and not callable(then):
            raise ConfigurationError(
                "then= is your own lifespan: a function of the application returning an async "
                f"context manager (an @asynccontextmanager), not {type(then).__name__}"
            )
        self.app = app
        self.worker_options = worker_options(app, worker)
        self.then = then

    def __repr__(self) -> str:
        worker = "no worker" if self.worker_options is None else f"worker {self.worker_options}"
        return f"<TaskmillLifespan {self.app!r}, {worker}>"

    def __call__(self, site: Any) -> AbstractAsyncContextManager[Any]:
        return self._run(site)

    @asynccontextmanager
    async def _run(self, site: Any) -> AsyncIterator[Any]:
        state = site.state
        setattr(state, STATE_WORKER, None)
        async with AsyncExitStack() as stack:
            # closed even when opening fails half-way (a broker made, its connect refused)
            stack.push_async_callback(self.app.aclose)
            await self.app.aopen()
            setattr(state, STATE_APP, self.app)
            # your lifespan before the worker: the jobs may use what it sets up, and the
            # worker drains before your lifespan tears that down
            user_state = None
            if self.then is not None:
                user_state = await stack.enter_async_context(self.then(site))
            if self.worker_options is not None:
                embedded = self.app.worker(**self.worker_options)
                setattr(state, STATE_WORKER, await stack.enter_async_context(embedded))
            yield user_state


def taskmill_lifespan(
    app: App,
    *,
    worker: bool | Mapping[str, Any] = False,
    then: Lifespan | None = None,
) -> TaskmillLifespan:
    """A lifespan for ``FastAPI(lifespan=...)`` or ``Starlette(lifespan=...)`` that opens
    ``app`` at startup and closes it at shutdown.

    ``worker``: ``True`` or a mapping of ``app.worker`` options (``concurrency``, ``queues``,
    ``pool``, ``drain_timeout_s``, ``max_start_wait_s``, ``name``, ``scheduler``, …; see
    docs/embedding.md) runs a worker on the server's event loop, started once your lifespan
    has started and drained (up to ``drain_timeout_s``) before it ends. ``then``: your own
    lifespan, run inside (the ``App`` is open while it runs); the state it yields, if any,
    is the application's lifespan state as usual.

    Startup order: open the ``App``, enter ``then``, start the worker; shutdown is the
    reverse. ``request.app.state.taskmill`` is the ``App``, ``request.app.state.
    taskmill_worker`` the worker (or None). An unknown worker option, or one out of range, is
    a ``ConfigurationError`` (or the ``Worker``'s ``ValueError``) here, not at startup.

    >>> tasks = App("memory://")
    >>> taskmill_lifespan(tasks, worker={"concurency": 8})
    Traceback (most recent call last):
    taskmill.errors.ConfigurationError: unknown worker option(s) ['concurency']; known: ...
    """
    return TaskmillLifespan(app, worker=worker, then=then)


def worker_options(app: App, worker: bool | Mapping[str, Any]) -> dict[str, Any] | None:
    """The options of the embedded worker ``worker`` asks for (None: no worker), checked
    now: a typo must fail at import, not when the server starts."""
    if worker is False:
        return None
    if worker is True:
        return {}
    if not isinstance(worker, Mapping):
        raise ConfigurationError(
            "worker= is True, False, or a mapping of worker options such as "
            f"{{'concurrency': 8}}, not {type(worker).__name__}"
        )
    options = dict(worker)
    unknown = sorted(set(options) - WORKER_OPTIONS)
    if unknown:
        raise ConfigurationError(
            f"unknown worker option(s) {unknown}; known: {', '.join(sorted(WORKER_OPTIONS))}"
        )
    if isinstance(options.get("queues"), str):
        raise ConfigurationError(
            f"queues is a list of queue names: queues=[{options['queues']!r}], not a string"
        )
    Worker(app, **options)  # its own checks of the values (concurrency, pool and app_path)
    return options


# --- the App and the worker, for endpoints ---------------------------------------------------


def taskmill_app(connection: HTTPConnection) -> App:
    """The taskmill ``App`` that ``taskmill_lifespan`` opened, for a request or a WebSocket.
    For FastAPI: ``tasks: App = Depends(taskmill_app)`` (or ``TaskmillApp`` from
    ``taskmill.integrations.fastapi``)."""
    app = getattr(connection.app.state, STATE_APP, None)
    if not isinstance(app, App):
        raise RuntimeError(
            "no taskmill App on this application's state: pass "
            "lifespan=taskmill_lifespan(app, ...) to FastAPI(...) or Starlette(...) (and, "
            "with TestClient, enter it as a context manager so the lifespan runs)"
        )
    return app


def taskmill_worker(connection: HTTPConnection) -> EmbeddedWorker:
    """The worker that ``taskmill_lifespan(..., worker=...)`` runs in this process, for a
    health route (``worker.healthy``). ``RuntimeError`` if it runs none."""
    taskmill_app(connection)  # the lifespan ran: else that error, which says what to do
    worker = getattr(connection.app.state, STATE_WORKER, None)
    if not isinstance(worker, EmbeddedWorker):
        raise RuntimeError(
            "this application runs no taskmill worker: pass worker=True (or worker options) "
            "to taskmill_lifespan"
        )
    return worker


# --- live events to a browser -----------------------------------------------------------------


def event_json(event: Event) -> dict[str, Any]:
    """An event as the JSON object ``forward_events`` sends: its fields (``job_id``, ``task``,
    ``queue``, ``state``, ``attempt``, ``at``, ``seq``, ``progress``, ``message``) and
    ``workflow_id``. No arguments, no results: what a browser may see of any job."""
    return {**msgspec.structs.asdict(event), "workflow_id": event.workflow_id}


async def forward_events(websocket: WebSocket, events: AsyncIterator[Event]) -> int:
    """Send each of ``events`` to an accepted ``websocket``, one JSON text message each
    (``event_json``), until they end (``handle.awatch()`` ends when its job finishes) or the
    client goes away (then the subscription is closed at once, not at the next event). Returns
    how many were sent; the websocket is left open for you to close. Messages the client
    sends meanwhile are read and dropped.

    >>> async def progress(websocket: WebSocket, job_id: str) -> None:  # a WebSocket route
    ...     await websocket.accept()
    ...     await forward_events(websocket, tasks.job(job_id).awatch())
    ...     await websocket.close()
    """
    gone = asyncio.ensure_future(_until_disconnected(websocket))
    sent = 0
    try:
        while True:
            upcoming = asyncio.ensure_future(anext(events))
            await asyncio.wait({upcoming, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not upcoming.done():  # the client left while no event came
                upcoming.cancel()
                await asyncio.wait({upcoming})
                return sent
            try:
                event = upcoming.result()
            except StopAsyncIteration:
                return sent
            try:
                await websocket.send_json(event_json(event))
            except (WebSocketDisconnect, OSError, RuntimeError):
                return sent  # gone between two events (the server says so in one of these)
            sent += 1
    finally:
        gone.cancel()
        with contextlib.suppress(BaseException):
            await gone
        close = getattr(events, "aclose", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()


async def _until_disconnected(websocket: WebSocket) -> None:
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass


# --- the dashboard and the HTTP API ----------------------------------------------------------


def dashboard_mount(
    app: App,
    path: str = "/taskmill",
    config: WebConfig | None = None,
    *,
    name: str = "taskmill",
) -> Mount:
    """A ``Mount`` route serving taskmill's dashboard, HTTP API (``{path}/api/v1``), health and
    metrics for ``app`` under ``path``, for ``Starlette(routes=[...])``. ``config`` (auth,
    redaction) defaults to ``WebConfig.from_env()`` (the ``TASKMILL_DASHBOARD_*`` settings
    that ``taskmill dashboard`` reads); with no auth configured only loopback clients get in.
    """
    return Mount(check_prefix(path), app=_dashboard(app, config), name=name)


def mount_dashboard(
    site: Starlette,
    app: App,
    path: str = "/taskmill",
    config: WebConfig | None = None,
    *,
    name: str = "taskmill",
) -> Starlette:
    """Mount taskmill's dashboard, HTTP API, health and metrics under ``path`` of ``site`` (a
    FastAPI or Starlette application); returns the mounted application. ``config`` as for
    ``dashboard_mount``. The pages link within the prefix; ``request.url_for(name + ":…")``
    reaches its routes.

    >>> from starlette.applications import Starlette
    >>> site = Starlette()
    >>> tasks = App("memory://")
    >>> _ = mount_dashboard(site, tasks, "/tasks", WebConfig(users={"ops": "a long secret"}))
    >>> [route.path for route in site.routes]
    ['/tasks']
    >>> mount_dashboard(site, tasks, "tasks/")
    Traceback (most recent call last):
    taskmill.errors.ConfigurationError: the dashboard's prefix starts with '/' ...; not 'tasks/'
    """
    dashboard = _dashboard(app, config)
    site.mount(check_prefix(path), dashboard, name=name)
    return dashboard


def check_prefix(path: str) -> str:
    """``path`` if it is a mount prefix Starlette routes as meant (``/tasks``)."""
    if not path.startswith("/") or path.endswith("/") or "//" in path:
        raise ConfigurationError(
            "the dashboard's prefix starts with '/' and does not end with one, as '/tasks'; "
            f"not {path!r}"
        )
    return path


def _dashboard(app: App, config: WebConfig | None) -> Starlette:
    return create_app(app, config if config is not None else WebConfig.from_env())


__all__ = [
    "STATE_APP",
    "STATE_WORKER",
    "WORKER_OPTIONS",
    "Lifespan",
    "TaskmillLifespan",
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
