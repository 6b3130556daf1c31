"""The HTTP API: JSON under ``/api/v1``, on the public admin API of ``App`` (docs/api.md).

Every route is an entry of ``ENDPOINTS``, which also gives the OpenAPI 3.1 schema served at
``GET /api/v1/openapi.json`` (``openapi_schema``), so the two cannot drift. Errors are JSON
``{"error": "..."}`` with the status that says what went wrong: 400 a body that is not JSON,
401/403 auth (``taskmill.web.security``), 404 no such job, task, schedule, 409 a state that
does not allow the action, 413 arguments too large, 415 a body that is not
``application/json``, 422 a value that is not valid (the message names it), 503 a full queue.
Every action is logged on ``taskmill.web`` with who did it (never with arguments).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from taskmill.admin import MAX_PAGE
from taskmill.errors import (
    BrokerError,
    ConfigurationError,
    JobNotFoundError,
    PayloadTooLargeError,
    QueueFullError,
    SerializationError,
    UnknownScheduleError,
    UnknownTaskError,
)
from taskmill.job import JobState, MetaValue
from taskmill.meta import parse_pair
from taskmill.scheduler import schedule_statuses
from taskmill.web.context import Web, require_write, web_of, who
from taskmill.web.redact import job_view
from taskmill.web.sse import events_enabled, sse_response

if TYPE_CHECKING:
    from taskmill.app import App
    from taskmill.handle import JobHandle
    from taskmill.job import NewJob
    from taskmill.registry import TaskDefinition

log = logging.getLogger("taskmill.web")

PREFIX = "/api/v1"
_encoder = msgspec.json.Encoder()


class ApiError(Exception):
    """An answer other than success: the status and the message of ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_response(data: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(data), status, media_type="application/json")


def error_response(status: int, message: str) -> Response:
    return json_response({"error": message}, status)


# --- request bodies -------------------------------------------------------------------------


class SendBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /jobs``: the task's name, its arguments, and send options."""

    task: str
    args: list[Any] = msgspec.field(default_factory=list)
    kwargs: dict[str, Any] = msgspec.field(default_factory=dict)
    queue: str | None = None
    priority: int | str | None = None
    delay: float | None = None
    run_at: float | datetime | None = None
    key: str | None = None
    job_id: str | None = None
    meta: dict[str, Any] | None = None


class RetryBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /jobs/retry``: job ids, or a queue and/or task filter, or ``all``."""

    ids: list[str] | None = None
    queue: str | None = None
    task: str | None = None
    all: bool = False


_decoders: dict[type, msgspec.json.Decoder[Any]] = {
    SendBody: msgspec.json.Decoder(SendBody),
    RetryBody: msgspec.json.Decoder(RetryBody),
}


async def read_body(request: Request, kind: type[Any]) -> Any:
    """The JSON body as ``kind``: 415 if it is not JSON, 400 if it does not parse, 422 if a
    field is missing, unknown or of the wrong type (msgspec's message says which)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, "send the body as JSON, with Content-Type: application/json")
    data = await request.body()
    try:
        return _decoders[kind].decode(data)
    except msgspec.ValidationError as exc:
        raise ApiError(422, f"invalid request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None


# --- query strings --------------------------------------------------------------------------


def _query(request: Request, known: set[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        if name not in known:
            raise ApiError(
                422, f"unknown query parameter {name!r} (known: {', '.join(sorted(known))})"
            )
        found.setdefault(name, []).append(value)
    return found


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(422, f"query parameter {name!r} is given {len(values)} times; give it once")
    return values[0]


def _int(query: dict[str, list[str]], name: str, default: int, low: int, high: int) -> int:
    text = _one(query, name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ApiError(422, f"{name} must be a whole number from {low} to {high}, not {text!r}")
    return value


def _bool(query: dict[str, list[str]], name: str, default: bool) -> bool:
    text = _one(query, name)
    if text is None:
        return default
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise ApiError(422, f"{name} must be true or false, not {text!r}")


def _list(query: dict[str, list[str]], name: str) -> list[str]:
    """A repeatable parameter, each value possibly a comma-separated list."""
    return [item for value in query.get(name, []) for item in value.split(",") if item]


# --- routes: jobs ---------------------------------------------------------------------------


def _initial_state(body: SendBody) -> JobState:
    """A new job's state, without a read: scheduled if it is not due yet."""
    if body.delay:
        return JobState.SCHEDULED
    if body.run_at is not None:
        run_at = body.run_at.timestamp() if isinstance(body.run_at, datetime) else body.run_at
        return JobState.SCHEDULED if run_at > time.time() else JobState.QUEUED
    return JobState.QUEUED


def _send_options(body: SendBody) -> dict[str, Any]:
    if isinstance(body.run_at, datetime) and body.run_at.tzinfo is None:
        raise ApiError(422, "run_at needs a time zone (e.g. 2026-01-01T09:00:00Z)")
    if body.queue is not None and not body.queue.strip():
        raise ApiError(422, "queue must be a non-empty name")
    options = {
        "queue": body.queue,
        "priority": body.priority,
        "delay": body.delay,
        "run_at": body.run_at,
        "key": body.key,
        "job_id": body.job_id,
        "meta": body.meta,
    }
    return {name: value for name, value in options.items() if value is not None}


async def send_job(request: Request) -> Response:
    require_write(request)
    body: SendBody = await read_body(request, SendBody)
    app = web_of(request).app
    task = app.get_task(body.task)  # UnknownTaskError (404) lists the names the app has
    options = _send_options(body)
    try:
        bound = task.options(**options)
        if body.job_id is None and body.key is None and app.client.eager is None:
            job = task.build(bound.opts, tuple(body.args), body.kwargs, check_types=True)
            job_id, existing = await _batch_of(request).send(job, task)
        else:  # an id or key of its own: written alone (a batch must not hold it twice)
            handle: JobHandle[Any] = await bound.asend(*body.args, **body.kwargs)
            job_id, existing = handle.id, handle.existing
    except (TypeError, ConfigurationError) as exc:  # do not bind, wrong type, bad option
        raise ApiError(422, str(exc)) from None
    state = (await app.aget_job(job_id)).state if existing else _initial_state(body)
    _logged(request, "sent", f"job {job_id} ({task.name})" + (" (existing)" * existing),
            job_id=job_id, task=task.name)  # fmt: skip
    data = {"id": job_id, "state": state.value, "existing": existing}
    return json_response(data, 200 if existing else 201)


MAX_BATCH = 500
"""The most jobs of concurrent ``POST /jobs`` requests stored in one broker call."""


class SendBatch:
    """The jobs of concurrent ``POST /jobs`` requests, stored together (group commit).

    A lone request's job is written at once. While a write is in flight, the jobs of the
    requests that arrive meanwhile wait, and go together in the next write: one transaction
    (or one Redis script call) for many requests, so a client with several connections, or
    several clients, are not held to one broker round trip per job. Each job still goes
    through the app's enqueue pipeline (depth check, events, ``on_enqueue`` hooks). A write
    that fails fails every request of its batch (a full queue refuses them together)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._waiting: list[tuple[NewJob, TaskDefinition, asyncio.Future[tuple[str, bool]]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def send(self, job: NewJob, task: TaskDefinition) -> tuple[str, bool]:
        """Store ``job``: its id, and whether it existed already."""
        future: asyncio.Future[tuple[str, bool]] = asyncio.get_running_loop().create_future()
        self._waiting.append((job, task, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(), name="taskmill-web-sends")
        return await future

    async def _write(self) -> None:
        batch: list[tuple[NewJob, TaskDefinition, asyncio.Future[tuple[str, bool]]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
                try:
                    result = await self.app.client.enqueue(
                        [job for job, _, _ in batch], [task for _, task, _ in batch]
                    )
                except Exception as exc:
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for i, (_, _, future) in enumerate(batch):
                    if not future.done():  # its request was not given up meanwhile
                        future.set_result((result.ids[i], i in result.existing))
                batch = []
        finally:  # cancelled (the server stops): the requests still waiting end with it
            for _, _, future in [*batch, *self._waiting]:
                future.cancel()
            self._waiting = []
            self._writer = None


def _batch_of(request: Request) -> SendBatch:
    """This application's batch of sends on the running event loop (its futures and task
    belong to one loop)."""
    state = request.app.state
    batches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SendBatch] | None = getattr(
        state, "send_batches", None
    )
    if batches is None:
        batches = state.send_batches = weakref.WeakKeyDictionary()
    loop = asyncio.get_running_loop()
    batch = batches.get(loop)
    if batch is None:
        batch = batches[loop] = SendBatch(web_of(request).app)
    return batch


async def get_job(request: Request) -> Response:
    web = web_of(request)
    job = await web.app.aget_job(request.path_params["job_id"])
    return json_response(job_view(job, web.app.tasks.get(job.task), web.config.redact))


_LIST_PARAMS = {"state", "queue", "task", "meta", "order", "limit", "cursor", "count", "key"}
_WITH_KEY = {"key", "limit", "count"}


async def list_jobs(request: Request) -> Response:
    web = web_of(request)
    query = _query(request, _LIST_PARAMS)
    if "key" in query:
        return await _list_by_key(web, query)
    order = _one(query, "order") or "enqueued"
    if order not in ("enqueued", "finished"):
        raise ApiError(422, f"order must be 'enqueued' or 'finished', not {order!r}")
    meta: dict[str, MetaValue] = {}
    for pair in query.get("meta", []):
        try:
            key, value = parse_pair(pair)
        except ConfigurationError as exc:
            raise ApiError(422, f"meta: {exc}") from None
        meta[key] = value
    try:
        page = await web.app.alist_jobs(
            state=_list(query, "state") or None,
            queue=_one(query, "queue"),
            task=_one(query, "task"),
            meta=meta or None,
            order=_order(order),
            limit=_int(query, "limit", 50, 1, MAX_PAGE),
            cursor=_one(query, "cursor"),
            count=_bool(query, "count", True),
        )
    except ValueError as exc:  # an unknown state, a pending state by finish time, a bad cursor
        raise ApiError(422, str(exc)) from None
    names = web.config.redact
    jobs = [job_view(j, web.app.tasks.get(j.task), names) for j in page.jobs]
    return json_response({"jobs": jobs, "next_cursor": page.next_cursor, "total": page.total})


async def _list_by_key(web: Web, query: dict[str, list[str]]) -> Response:
    """The pending job holding the key, as a page of one job (or none)."""
    others = sorted(set(query) - _WITH_KEY)
    if others:
        raise ApiError(422, f"key finds one job: it takes no {', '.join(others)}")
    key = _one(query, "key")
    if not key:
        raise ApiError(422, "key must not be empty")
    _int(query, "limit", 50, 1, MAX_PAGE)  # checked as on any listing; one job fits any page
    job = await web.app.ajob_by_key(key)
    jobs = [] if job is None else [job_view(job, web.app.tasks.get(job.task), web.config.redact)]
    total = len(jobs) if _bool(query, "count", True) else None
    return json_response({"jobs": jobs, "next_cursor": None, "total": total})


def _order(text: str) -> Literal["enqueued", "finished"]:
    return "finished" if text == "finished" else "enqueued"


def _logged(request: Request, action: str, what: str, **fields: Any) -> None:
    actor = who(request)
    log.info("%s %s %s", actor, action, what, extra={"actor": actor, "action": action, **fields})


async def cancel_job(request: Request) -> Response:
    require_write(request)
    job_id = request.path_params["job_id"]
    state = await web_of(request).app.acancel_job(job_id)
    if state in (JobState.SUCCEEDED, JobState.FAILED):
        raise ApiError(409, f"job {job_id} is {state.value} already: there is nothing to cancel")
    _logged(request, "cancelled", f"job {job_id}", job_id=job_id)
    status = 202 if state is JobState.RUNNING else 200  # a running job is asked to stop
    return json_response({"id": job_id, "state": state.value}, status)


async def retry_job(request: Request) -> Response:
    require_write(request)
    job_id = request.path_params["job_id"]
    app = web_of(request).app
    job = await app.aget_job(job_id)
    if job.state not in (JobState.FAILED, JobState.CANCELLED):
        raise ApiError(409, f"job {job_id} is {job.state.value}: only failed or cancelled "
                            "jobs can be retried")  # fmt: skip
    if job_id not in await app.aretry_jobs([job_id]):
        raise ApiError(409, f"job {job_id} was not retried: it changed state meanwhile, or "
                            "another pending job holds its unique key")  # fmt: skip
    _logged(request, "retried", f"job {job_id}", job_id=job_id)
    return json_response({"id": job_id, "state": JobState.QUEUED.value})


async def run_job_now(request: Request) -> Response:
    require_write(request)
    job_id = request.path_params["job_id"]
    before = await web_of(request).app.arun_job_now(job_id)
    if before is not JobState.SCHEDULED and before is not JobState.QUEUED:
        raise ApiError(409, f"job {job_id} is {before.value}: only a scheduled job can run now")
    _logged(request, "ran now", f"job {job_id}", job_id=job_id)
    return json_response({"id": job_id, "state": JobState.QUEUED.value, "was": before.value})


async def retry_jobs(request: Request) -> Response:
    require_write(request)
    body: RetryBody = await read_body(request, RetryBody)
    app = web_of(request).app
    filters = body.queue is not None or body.task is not None
    if sum((body.ids is not None, filters, body.all)) != 1:
        raise ApiError(422, "give one of: ids, a queue and/or task filter, or all: true")
    try:
        if body.ids is not None:
            retried = await app.aretry_jobs(body.ids)
        else:
            retried = await app.aretry_jobs(queue=body.queue, task=body.task)
    except ValueError as exc:
        raise ApiError(422, str(exc)) from None
    scope = "ids" if body.ids is not None else f"queue={body.queue} task={body.task}"
    _logged(request, "retried", f"{len(retried)} jobs ({scope})", count=len(retried))
    return json_response({"retried": retried, "count": len(retried)})


# --- routes: queues, workers, tasks, schedules, events --------------------------------------


async def list_queues(request: Request) -> Response:
    stats = await web_of(request).app.astats()
    return json_response([msgspec.structs.asdict(s) for s in stats])


def _queue_action(
    action: Callable[[App, str], Awaitable[Any]], verb: str, key: str
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        require_write(request)
        queue = request.path_params["queue"]
        value = await action(web_of(request).app, queue)
        _logged(request, verb, f"queue {queue}", queue=queue)
        return json_response({"queue": queue, key: value})

    endpoint.__name__ = f"{action.__name__.strip('_')}_queue"
    return endpoint


async def _pause(app: App, queue: str) -> bool:
    await app.apause(queue)
    return True


async def _resume(app: App, queue: str) -> bool:
    await app.aresume(queue)
    return False


async def _purge(app: App, queue: str) -> int:
    return await app.apurge(queue)


async def list_workers(request: Request) -> Response:
    workers = await web_of(request).app.aworkers()
    return json_response([msgspec.structs.asdict(w) for w in workers])


async def list_tasks(request: Request) -> Response:
    tasks = web_of(request).app.registered_tasks()
    return json_response([msgspec.structs.asdict(t) for t in tasks])


async def list_schedules(request: Request) -> Response:
    statuses = await schedule_statuses(web_of(request).app)
    return json_response(
        [
            {
                "name": st.schedule.name,
                "task": st.schedule.task,
                "cron": st.schedule.cron,
                "every_s": None if st.schedule.every is None else st.schedule.every.total_seconds(),
                "tz": st.schedule.tz,
                "misfire": st.schedule.misfire,
                "overlap": st.schedule.overlap,
                "next": [t.isoformat() for t in st.next_ticks],
                "last_tick": None if st.last_tick is None else st.last_tick.isoformat(),
                "last_state": None if st.last_state is None else st.last_state.value,
            }
            for st in statuses
        ]
    )


async def trigger_schedule(request: Request) -> Response:
    require_write(request)
    name = request.path_params["name"]
    handle = await web_of(request).app.atrigger_schedule(name)
    _logged(request, "triggered", f"schedule {name}: job {handle.id}", job_id=handle.id)
    state = JobState.QUEUED.value
    if handle.existing:
        state = (await handle.ainfo()).state.value
    data = {"id": handle.id, "state": state, "existing": handle.existing}
    return json_response(data, 200 if handle.existing else 201)


async def events(request: Request) -> Response:
    app = web_of(request).app
    query = _query(request, {"job_id", "queue"})
    if not events_enabled(app):
        raise ApiError(409, "events are off: start the app with App(..., events=True), in "
                            "the processes that send and run jobs too")  # fmt: skip
    return sse_response(app, job_ids=_list(query, "job_id") or None, queue=_one(query, "queue"))


async def openapi(request: Request) -> Response:
    return json_response(openapi_schema(request.scope.get("root_path", "")))


# --- errors ---------------------------------------------------------------------------------

_NOT_FOUND = (JobNotFoundError, UnknownTaskError, UnknownScheduleError)


def _answers_errors(
    endpoint: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """``endpoint`` with its expected errors answered as JSON ``{"error": ...}``."""

    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ApiError as exc:
            return error_response(exc.status, exc.message)
        except HTTPException as exc:
            return error_response(exc.status_code, exc.detail)
        except _NOT_FOUND as exc:
            return error_response(404, str(exc))
        except PayloadTooLargeError as exc:
            return error_response(413, str(exc))
        except QueueFullError as exc:
            return error_response(503, str(exc))
        except SerializationError as exc:
            return error_response(422, str(exc))
        except BrokerError as exc:
            # the broker's own words may name hosts: they go to the log, not to the client
            log.error("%s %s: the broker failed: %s", request.method, request.url.path, exc)
            return error_response(503, f"the broker failed ({type(exc).__name__}); see the log")

    wrapped.__name__ = endpoint.__name__
    wrapped.__doc__ = endpoint.__doc__
    return wrapped


# --- the route table and its OpenAPI schema -------------------------------------------------


@dataclass(frozen=True)
class Param:
    name: str
    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})
    many: bool = False


@dataclass(frozen=True)
class Endpoint:
    """One route: what it does, for the router and for the OpenAPI schema."""

    method: Literal["GET", "POST"]
    path: str
    endpoint: Callable[[Request], Awaitable[Response]]
    summary: str
    query: tuple[Param, ...] = ()
    body: str | None = None
    responses: dict[int, str] = field(default_factory=lambda: {200: "OK"})
    media_type: str = "application/json"

    @property
    def writes(self) -> bool:
        return self.method == "POST"


_JOB_ID = "job_id"
_ERRORS_READ = {401: "Not logged in", 403: "Refused"}
_ERRORS_WRITE = {**_ERRORS_READ, 403: "Read-only user, or a cross-site request"}

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("POST", "/jobs", send_job, "Send a job of a registered task", body="SendBody",
             responses={201: "Stored", 200: "A job with this job_id or key exists already",
                        404: "No such task", 413: "Arguments too large",
                        422: "Arguments that do not bind, or an invalid option",
                        503: "The queue is full"}),
    Endpoint("GET", "/jobs", list_jobs, "List jobs: filters, order, keyset pages", query=(
        Param("state", "Job state(s): repeat, or comma-separate", many=True),
        Param("queue", "A queue's name"),
        Param("task", "A prefix of the task's name"),
        Param("meta", "key=value the job's metadata holds (repeat for several)", many=True),
        Param("order", "enqueued (newest first) or finished (latest finished first)",
              {"type": "string", "enum": ["enqueued", "finished"]}),
        Param("limit", f"Jobs per page, 1 to {MAX_PAGE} (default 50)", {"type": "integer"}),
        Param("cursor", "next_cursor of the previous page"),
        Param("count", "Count the jobs the filters match (total); default true",
              {"type": "boolean"}),
        Param("key", "The pending job holding this unique key (alone, or with limit and "
              "count): a page of that job, or of none"),
    ), responses={200: "A page of jobs", 422: "An invalid filter or cursor"}),
    Endpoint("POST", "/jobs/retry", retry_jobs, "Retry failed jobs: by ids, by queue/task, or all",
             body="RetryBody", responses={200: "The ids retried", 422: "An invalid selection"}),
    Endpoint("GET", "/jobs/{job_id}", get_job, "One job, arguments redacted",
             responses={200: "The job", 404: "No such job"}),
    Endpoint("POST", "/jobs/{job_id}/cancel", cancel_job, "Cancel a job, or stop a running one",
             responses={200: "Cancelled", 202: "Running: asked to stop", 404: "No such job",
                        409: "Finished already"}),
    Endpoint("POST", "/jobs/{job_id}/retry", retry_job, "Retry a failed or cancelled job",
             responses={200: "Queued again", 404: "No such job", 409: "Not failed or cancelled"}),
    Endpoint("POST", "/jobs/{job_id}/run", run_job_now, "Run a scheduled job now",
             responses={200: "Due now", 404: "No such job", 409: "Running or finished"}),
    Endpoint("GET", "/queues", list_queues, "Queues: jobs by state, oldest waiting age, paused"),
    Endpoint("POST", "/queues/{queue}/pause", _queue_action(_pause, "paused", "paused"),
             "Pause a queue (workers stop claiming from it)"),
    Endpoint("POST", "/queues/{queue}/resume", _queue_action(_resume, "resumed", "paused"),
             "Resume a paused queue"),
    Endpoint("POST", "/queues/{queue}/purge", _queue_action(_purge, "purged", "purged"),
             "Delete a queue's waiting (scheduled and queued) jobs"),
    Endpoint("GET", "/workers", list_workers, "Registered workers, alive or lost"),
    Endpoint("GET", "/tasks", list_tasks, "The app's tasks and their defaults"),
    Endpoint("GET", "/schedules", list_schedules, "Periodic schedules: next runs, last tick"),
    Endpoint("POST", "/schedules/{name}/trigger", trigger_schedule, "Send a schedule's job now",
             responses={201: "Sent", 200: "Its previous run is still pending (overlap=skip)",
                        404: "No such schedule"}),
    Endpoint("GET", "/events", events, "Live job events (Server-Sent Events)", query=(
        Param("job_id", "Only this job's events (repeat for several)", many=True),
        Param("queue", "Only this queue's events"),
    ), responses={200: "An event stream", 409: "Events are off"},
       media_type="text/event-stream"),
    Endpoint("GET", "/openapi.json", openapi, "This schema"),
)  # fmt: skip


async def _http_error(request: Request, exc: Exception) -> Response:
    """404 and 405 of the router: JSON under ``/api/``, Starlette's plain text elsewhere."""
    assert isinstance(exc, HTTPException)
    if not request.url.path.startswith(request.scope.get("root_path", "") + "/api/"):
        return PlainTextResponse(exc.detail, exc.status_code, headers=exc.headers)
    return json_response({"error": exc.detail}, exc.status_code) if exc.headers is None else (
        Response(_encoder.encode({"error": exc.detail}), exc.status_code, exc.headers,
                 "application/json"))  # fmt: skip


async def _server_error(request: Request, exc: Exception) -> Response:
    """An unexpected error: JSON under ``/api/`` (the traceback goes to the server's log)."""
    if not request.url.path.startswith(request.scope.get("root_path", "") + "/api/"):
        return PlainTextResponse("Internal Server Error", 500)
    return error_response(500, "internal error (logged on the server)")


def exception_handlers() -> dict[Any, Callable[[Request, Exception], Awaitable[Response]]]:
    """The API's answers for routes not found, methods not allowed and unexpected errors."""
    return {404: _http_error, 405: _http_error, 500: _server_error}


def routes() -> list[BaseRoute]:
    """One route per path (so a 405's ``Allow`` lists every method the path takes)."""
    by_path: dict[str, dict[str, Callable[[Request], Awaitable[Response]]]] = {}
    for e in ENDPOINTS:
        by_path.setdefault(e.path, {})[e.method] = _answers_errors(e.endpoint)
    return [
        Route(PREFIX + path, _by_method(endpoints), methods=list(endpoints))
        for path, endpoints in by_path.items()
    ]


def _by_method(
    endpoints: dict[str, Callable[[Request], Awaitable[Response]]],
) -> Callable[[Request], Awaitable[Response]]:
    if len(endpoints) == 1:
        return next(iter(endpoints.values()))

    async def dispatch(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await endpoints[method](request)

    dispatch.__name__ = "_or_".join(e.__name__ for e in endpoints.values())
    return dispatch


def _operation(e: Endpoint) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _path_params(e.path)
    ]
    for p in e.query:
        schema = {"type": "array", "items": p.schema} if p.many else p.schema
        params.append({"name": p.name, "in": "query", "required": False,
                       "description": p.description, "schema": schema})  # fmt: skip
    errors = _ERRORS_WRITE if e.writes else _ERRORS_READ
    responses: dict[str, Any] = {}
    for status, text in {**e.responses, **errors}.items():
        media = e.media_type if status < 300 else "application/json"
        schema = {"$ref": "#/components/schemas/Error"} if status >= 300 else {}
        responses[str(status)] = {"description": text, "content": {media: {"schema": schema}}}
    operation: dict[str, Any] = {
        "operationId": e.endpoint.__name__,
        "summary": e.summary,
        "parameters": params,
        "responses": responses,
    }
    if e.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{e.body}"}}},
        }
    return operation


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


_PROBES = {
    "/health": "Liveness: the broker answered the statistics in time (no login)",
    "/ready": "Readiness: the broker is reachable (no login)",
}


def openapi_schema(root_path: str = "") -> dict[str, Any]:
    """The OpenAPI 3.1 description of every route of ``ENDPOINTS`` and the probes."""
    paths: dict[str, dict[str, Any]] = {}
    for e in ENDPOINTS:
        paths.setdefault(PREFIX + e.path, {})[e.method.lower()] = _operation(e)
    for path, summary in _PROBES.items():
        paths[path] = {"get": {
            "operationId": path.strip("/"), "summary": summary, "security": [],
            "responses": {"200": {"description": "OK"},
                          "503": {"description": "The broker did not answer"}},
        }}  # fmt: skip
    _, schemas = msgspec.json.schema_components(
        [SendBody, RetryBody], ref_template="#/components/schemas/{name}"
    )
    schemas["Error"] = {
        "type": "object",
        "properties": {"error": {"type": "string"}},
        "required": ["error"],
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "taskmill", "version": "1"},
        "servers": [{"url": root_path or "/"}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
        "security": [{"basic": []}, {"bearer": []}],
    }


__all__ = [
    "ENDPOINTS",
    "PREFIX",
    "ApiError",
    "Endpoint",
    "exception_handlers",
    "openapi_schema",
    "routes",
]
