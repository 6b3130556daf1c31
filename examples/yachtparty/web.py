"""The processor's HTTP service: the seed's three endpoints, and what creates tasks.

- ``POST /tasks``: send an agent task (``task_type``, ``user_id``, ``context``, ``priority``,
  ``scheduled_for`` or ``delay_s``);
- ``GET /tasks/{id}``: a task's state, attempts, result or error, and its action-log rows;
- ``POST /process-task`` ``{"task_id"}``: run it now (scheduled), or again (failed);
- ``POST /trigger-poll``: every task scheduled for later runs now (retries keep their wait);
- ``GET /health``: statistics: the action log's, taskmill's queue counts, live workers;
- ``POST /users``, ``GET /users/{id}``: the users the agents work for, with their messages;
- ``POST /messages``: an inbound message and its re-engagement check, in one transaction;
- ``/taskmill/``: taskmill's dashboard and HTTP API (loopback clients only: no auth is set).

Blocking work (psycopg, a send on the caller's connection) runs in Starlette's thread pool.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from examples.yachtparty.config import Config
from examples.yachtparty.db import UnknownUserError
from examples.yachtparty.handlers import QUIET_MINUTES
from examples.yachtparty.tasks import (
    PRIORITIES,
    QUEUE,
    Processor,
    UnknownTaskTypeError,
    build,
    task_type_of,
)
from taskmill import Job, JobNotFoundError, JobState
from taskmill.web import create_app

PRIORITY_NAMES = {100: "urgent", 50: "high", 0: "medium", -50: "low"}


class BadRequestError(ValueError):
    """The request's body is not what the route takes; the message says what is wrong."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"success": False, "error": message}, status_code=status)


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise BadRequestError("the body is not valid JSON", 400) from None
    if not isinstance(body, dict):
        raise BadRequestError("the body must be a JSON object")
    return body


def _field(body: dict[str, Any], name: str, kind: type, *, required: bool = True) -> Any:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadRequestError(f"{name!r} must be a {kind.__name__}, not {value!r}")
    return value


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _when(body: dict[str, Any]) -> dict[str, Any]:
    """``scheduled_for`` (ISO 8601 with a time zone) or ``delay_s``: taskmill's run_at/delay."""
    if body.get("scheduled_for") is not None:
        raw = _field(body, "scheduled_for", str)
        try:
            at = datetime.fromisoformat(raw)
        except ValueError:
            raise BadRequestError(f"'scheduled_for' is not an ISO 8601 time: {raw!r}") from None
        if at.tzinfo is None:
            raise BadRequestError(f"'scheduled_for' needs a time zone (+00:00 or Z): {raw!r}")
        return {"run_at": at}
    delay = body.get("delay_s")
    if delay is None:
        return {}
    if not isinstance(delay, int | float) or isinstance(delay, bool) or delay < 0:
        raise BadRequestError(f"'delay_s' must be a number of seconds >= 0, not {delay!r}")
    return {"delay": float(delay)}


def task_view(job: Job, actions: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``GET /tasks/{id}`` answers, in the seed's ``agent_tasks`` vocabulary."""
    return {
        "task_id": job.id,
        "task_type": task_type_of(job.task),
        "status": job.state.value,
        "priority": PRIORITY_NAMES.get(job.priority, job.priority),
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "scheduled_for": _iso(job.run_at),
        "started_at": _iso(job.started_at),
        "completed_at": _iso(job.finished_at),
        "result": None if job.result is None else json.loads(job.result),
        "error": None if job.error is None else f"{job.error.type}: {job.error.message}",
        "lost_leases": job.lost_leases,
        "meta": job.meta,
        "actions": actions,
    }


class Routes:
    """The endpoints, around one ``Processor``."""

    def __init__(self, processor: Processor) -> None:
        self.processor = processor
        self.app = processor.app
        self.db = processor.db

    # --- tasks ------------------------------------------------------------------------------

    async def create_task(self, request: Request) -> JSONResponse:
        body = await _body(request)
        task_type = _field(body, "task_type", str)
        user_id = _field(body, "user_id", str)
        context = body.get("context") or {}
        if not isinstance(context, dict):
            raise BadRequestError(f"'context' must be a JSON object, not {context!r}")
        if "user_id" in context:
            raise BadRequestError("'user_id' is a field of its own, not part of 'context'")
        priority = body.get("priority") or "medium"
        if priority not in PRIORITIES:
            raise BadRequestError(f"'priority' must be one of {', '.join(PRIORITIES)}")
        created_by = _field(body, "created_by", str, required=False) or "api"
        options = {"priority": PRIORITIES[priority], "meta": {"created_by": created_by}}
        kwargs = {"user_id": user_id, **context}
        try:
            handle = await run_in_threadpool(
                self.processor.send, task_type, kwargs, **options, **_when(body)
            )
        except TypeError as exc:  # the context does not fit the handler's parameters
            raise BadRequestError(str(exc)) from None
        job = await self.app.aget_job(handle.id)
        return JSONResponse(
            {"success": True, "task_id": job.id, "status": job.state.value,
             "scheduled_for": _iso(job.run_at)},
            status_code=201,
        )  # fmt: skip

    async def get_task(self, request: Request) -> JSONResponse:
        job = await self.app.aget_job(request.path_params["task_id"])
        actions = await run_in_threadpool(self.db.actions, job.id)
        return JSONResponse(task_view(job, actions))

    async def process_task(self, request: Request) -> JSONResponse:
        """The seed's webhook: process this task now. A scheduled task (delayed, or waiting
        for its next retry) becomes due; a failed one is retried with a fresh budget."""
        task_id = _field(await _body(request), "task_id", str)
        job = await self.app.aget_job(task_id)
        if job.state in (JobState.FAILED, JobState.CANCELLED):
            retried = await self.app.aretry_jobs([task_id])
            action = "retried" if retried else "unchanged"
        elif job.state is JobState.SUCCEEDED:
            return _error(409, f"task {task_id} completed already")
        else:
            before = await self.app.arun_job_now(task_id)
            action = "run_now" if before is JobState.SCHEDULED else f"already {before.value}"
        return JSONResponse({"success": True, "taskId": task_id, "action": action})

    async def trigger_poll(self, request: Request) -> JSONResponse:
        """No poll to trigger: due tasks run at once. What is left is what the seed used it
        for in tests: every task scheduled for later runs now. A task waiting for its next
        retry keeps its back-off, as the seed's poll left it (``/process-task`` runs one
        such task now)."""
        ids: list[str] = []
        cursor: str | None = None
        while True:
            page = await self.app.alist_jobs(
                state="scheduled", queue=QUEUE, limit=1000, cursor=cursor, count=False
            )
            for job in page.jobs:
                if job.attempt > 0:  # it ran, and waits for its retry
                    continue
                if await self.app.arun_job_now(job.id) is JobState.SCHEDULED:
                    ids.append(job.id)
            cursor = page.next_cursor
            if cursor is None:
                break
        message = f"{len(ids)} scheduled task(s) made due now"
        return JSONResponse({"success": True, "message": message, "task_ids": ids})

    # --- health -------------------------------------------------------------------------------

    async def health(self, request: Request) -> JSONResponse:
        stats = [s for s in await self.app.astats() if s.queue == QUEUE]
        workers = await self.app.aworkers()
        rows = await run_in_threadpool(self.db.action_stats)
        alive = sum(not w.lost for w in workers)
        return JSONResponse({
            "status": "healthy" if alive else "no_workers",
            "service": "task-processor",
            "timestamp": datetime.now(UTC).isoformat(),
            "stats": action_totals(rows),
            "byType": by_type(rows),
            "queue": {
                "name": QUEUE,
                "counts": stats[0].counts if stats else {},
                "oldestWaitingS": stats[0].oldest_waiting_s if stats else None,
                "paused": bool(stats and stats[0].paused),
            },
            "workers": {"alive": alive, "lost": len(workers) - alive},
        })  # fmt: skip

    # --- users and messages -------------------------------------------------------------------

    async def add_user(self, request: Request) -> JSONResponse:
        body = await _body(request)
        user_id, name = _field(body, "id", str), _field(body, "name", str)
        created = await run_in_threadpool(self.db.add_user, user_id, name)
        return JSONResponse({"success": True, "id": user_id}, status_code=201 if created else 200)

    async def get_user(self, request: Request) -> JSONResponse:
        user = await run_in_threadpool(self.db.user, request.path_params["user_id"])
        return JSONResponse(user)

    async def inbound_message(self, request: Request) -> JSONResponse:
        body = await _body(request)
        user_id, text = _field(body, "user_id", str), _field(body, "body", str)
        message_id, task_id = await run_in_threadpool(self.record_inbound, user_id, text)
        return JSONResponse(
            {"success": True, "message_id": message_id, "task_id": task_id}, status_code=201
        )

    def record_inbound(self, user_id: str, text: str) -> tuple[int, str]:
        """The message and its re-engagement check, in one transaction: both, or neither.
        One pending check per user (a unique key): a chatty user does not pile them up."""
        quiet_s = QUIET_MINUTES * self.processor.config.minute_s
        try:
            with self.db.connection() as conn, conn.transaction():
                row = conn.execute(
                    "INSERT INTO messages (user_id, direction, body) "
                    "VALUES (%s, 'inbound', %s) RETURNING id",
                    (user_id, text),
                ).fetchone()
                assert row is not None
                check = self.processor.send(
                    "re_engagement_check", {"user_id": user_id}, connection=conn,
                    delay=quiet_s, key=f"re-engage:{user_id}",
                    meta={"created_by": "inbound_message"},
                )  # fmt: skip
        except psycopg.errors.ForeignKeyViolation:  # raised by the COMMIT: the key is deferred
            raise UnknownUserError(f"no user {user_id!r}") from None
        return int(row[0]), check.id


def action_totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The seed's statistics, from the action log (every instance's, and kept over restarts)."""
    count = {
        o: sum(r["n"] for r in rows if r["outcome"] == o)
        for o in ("succeeded", "retrying", "failed")
    }
    finished = count["succeeded"] + count["failed"]
    last = max((r["last_at"] for r in rows), default=None)
    return {
        "tasksProcessed": sum(count.values()),
        "tasksSucceeded": count["succeeded"],
        "tasksRetried": count["retrying"],
        "tasksFailed": count["failed"],
        "successRate": f"{100 * count['succeeded'] / finished:.1f}%" if finished else None,
        "lastProcessedAt": last.isoformat() if last else None,
    }


def by_type(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task type: attempts by outcome, and the successful runs' latency."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = out.setdefault(row["action_type"].removeprefix("process_"), {})
        entry[row["outcome"]] = row["n"]
        if row["outcome"] == "succeeded":
            entry["latencyMs"] = {k: round(row[k + "_ms"], 1) for k in ("p50", "p95", "max")}
            entry["waitMsP50"] = round(row["wait_p50_ms"], 1)
    return out


Handler = Callable[[Request], Awaitable[JSONResponse]]


def _guarded(handler: Handler) -> Handler:
    """Bad input and unknown ids are answered with a precise error, and store nothing."""

    async def call(request: Request) -> JSONResponse:
        try:
            return await handler(request)
        except BadRequestError as exc:
            return _error(exc.status, str(exc))
        except UnknownTaskTypeError as exc:
            return _error(422, str(exc))
        except (JobNotFoundError, UnknownUserError) as exc:
            return _error(404, exc.args[0] if exc.args else str(exc))

    return call


def create_web(processor: Processor, *, worker: bool = False, concurrency: int = 8) -> Starlette:
    """The HTTP service on ``processor``: it creates the app's tables at start, and closes
    ``processor`` when it stops. ``worker`` also runs a taskmill worker in the service's own
    loop, as the seed's one Cloud Run service both served and polled (docs/embedding.md);
    ``taskmill worker`` processes may run the tasks instead, or as well."""
    routes = Routes(processor)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await run_in_threadpool(processor.db.create_tables)
        await processor.app.aopen()
        async with AsyncExitStack() as stack:
            stack.push_async_callback(run_in_threadpool, processor.close)
            if worker:
                await stack.enter_async_context(
                    processor.app.worker(queues=[QUEUE], concurrency=concurrency, name="web")
                )
            yield

    table: list[tuple[str, Handler, str]] = [
        ("/tasks", routes.create_task, "POST"),
        ("/tasks/{task_id}", routes.get_task, "GET"),
        ("/process-task", routes.process_task, "POST"),
        ("/trigger-poll", routes.trigger_poll, "POST"),
        ("/health", routes.health, "GET"),
        ("/users", routes.add_user, "POST"),
        ("/users/{user_id}", routes.get_user, "GET"),
        ("/messages", routes.inbound_message, "POST"),
    ]
    return Starlette(
        routes=[
            *(Route(path, _guarded(fn), methods=[method]) for path, fn, method in table),
            Mount("/taskmill", app=create_app(processor.app)),
        ],
        lifespan=lifespan,
    )


def from_env() -> Starlette:
    """The service as deployed: settings from the environment (``config.Config.from_env``),
    a worker inside. ``uvicorn --factory examples.yachtparty.web:from_env --port 8080``."""
    return create_web(build(Config.from_env()), worker=True)
