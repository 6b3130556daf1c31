"""The HTTP side: the Telegram webhook, the messages with their steps' states, a
``wait_result``-style endpoint, retry, progress over WebSockets, and taskmill's dashboard at
``/taskmill``. Serve it with ``python -m examples.task_tracker web`` (or ``uvicorn
examples.task_tracker.web:api``); the jobs run on ``taskmill worker`` processes."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, WebSocket
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.websockets import WebSocketState

from examples.task_tracker.tasks import STEPS, app, message_key, save_message, step_job_id, store
from taskmill import JobFailedError, JobNotFoundError, JobState
from taskmill.events import Event
from taskmill.integrations.fastapi import (
    TaskmillApp,
    forward_events,
    mount_dashboard,
    taskmill_lifespan,
)
from taskmill.web import WebConfig

KEY = r"^-?\d+-\d+$"
MessageKey = Annotated[str, PathParam(pattern=KEY, description="chat id - message id")]
PAGE = (Path(__file__).parent / "page.html").read_text("utf-8")


class TelegramMessage(BaseModel):
    """What the webhook takes of a Telegram update's message."""

    chat_id: int
    message_id: int = Field(ge=1)
    author: str = Field(min_length=1, max_length=64)
    text: str = Field(min_length=1, max_length=4096)  # Telegram's own limit


api = FastAPI(title="Task Tracker on taskmill", lifespan=taskmill_lifespan(app))
mount_dashboard(api, app, "/taskmill", WebConfig.from_env())


@api.get("/", response_class=HTMLResponse)
async def page() -> str:
    return PAGE


@api.post("/webhook/telegram", status_code=202)
async def telegram_webhook(message: TelegramMessage) -> dict[str, Any]:
    """Store the message and start its pipeline. Telegram delivers an update again when it did
    not see our answer: the save job's id is the message's, so a second delivery stores
    nothing and returns the first one's job."""
    key = message_key(message.chat_id, message.message_id)
    bound = save_message.options(job_id=step_job_id("save", key))
    handle = await bound.asend(message.chat_id, message.message_id, message.author, message.text)
    return {"message": key, "job": handle.id, "duplicate": handle.existing}


@api.get("/messages")
async def messages(limit: Annotated[int, Query(ge=1, le=200)] = 50) -> list[dict[str, Any]]:
    return await asyncio.to_thread(store().latest, limit)


@api.get("/messages/{key}")
async def message(key: MessageKey, tasks: TaskmillApp) -> dict[str, Any]:
    """The message, and the state of each step of its pipeline, as taskmill has them."""
    row = await asyncio.to_thread(store().get, key)
    steps = await step_states(tasks, key)
    if row is None and steps["save"]["state"] is None:
        raise HTTPException(404, f"no message {key}")
    return {"message": row, "steps": steps}


async def step_states(tasks: Any, key: str) -> dict[str, dict[str, Any]]:
    """Each step's job: state, attempt, error; state None when it was not sent (yet, or at
    all: extract runs only for signal)."""
    states: dict[str, dict[str, Any]] = {}
    for step in STEPS:
        job_id = step_job_id(step, key)
        try:
            job = await tasks.aget_job(job_id)
        except JobNotFoundError:
            states[step] = {"job": job_id, "state": None}
            continue
        error = None if job.error is None else f"{job.error.type}: {job.error.message}"
        states[step] = {"job": job_id, "state": job.state.value, "attempt": job.attempt,
                        "error": error}  # fmt: skip
    return states


@api.get("/messages/{key}/result")
async def message_result(
    key: MessageKey,
    tasks: TaskmillApp,
    timeout: Annotated[float, Query(ge=0, le=60)] = 10,
) -> JSONResponse:
    """Wait up to ``timeout`` s for the message's pipeline, as the seed's ``wait_result()``:
    200 with each step's result when done; 202 with the steps' states if it is still running;
    409 with the error if a step failed for good (``POST .../retry`` runs it again)."""
    deadline = time.monotonic() + timeout
    results: dict[str, Any] = {}
    for step in STEPS:
        if step == "extract" and not results["score"]["extract"]:
            break  # not signal: no extraction was sent
        handle = tasks.job(step_job_id(step, key))
        try:
            results[step] = await handle.aresult(timeout=max(0.0, deadline - time.monotonic()))
        except JobNotFoundError:
            if step == "save":
                raise HTTPException(404, f"no message {key}") from None
            return await pending(tasks, key)  # its predecessor has not sent it yet
        except TimeoutError:
            return await pending(tasks, key)
        except JobFailedError as exc:
            body = {"failed": step, "error": str(exc), "steps": await step_states(tasks, key)}
            return JSONResponse(body, 409)
    return JSONResponse({"message": key, "results": results})


async def pending(tasks: Any, key: str) -> JSONResponse:
    return JSONResponse({"message": key, "steps": await step_states(tasks, key)}, 202)


@api.post("/messages/{key}/retry")
async def retry_message(key: MessageKey, tasks: TaskmillApp) -> dict[str, Any]:
    """Run the message's failed step again (with fresh attempts); the steps after it follow
    as usual. The dashboard's Retry button does the same."""
    steps = await step_states(tasks, key)
    failed = [s["job"] for s in steps.values() if s["state"] in ("failed", "cancelled")]
    if not failed:
        raise HTTPException(409, f"no failed step to retry in message {key}")
    return {"message": key, "retried": await tasks.aretry_jobs(failed)}


@api.websocket("/messages/{key}/events")
async def message_events(websocket: WebSocket, key: str, tasks: TaskmillApp) -> None:
    """The message's pipeline, live: each step's events from its current state until it
    finishes, then the next step's, until the last one ends."""
    await websocket.accept()
    if re.match(KEY, key) is None:
        await websocket.close(code=1008, reason="not a message key")
        return
    await forward_events(websocket, pipeline_events(tasks, key))
    await close(websocket)


async def pipeline_events(tasks: Any, key: str) -> AsyncIterator[Event]:
    """No event is missed between steps: each step is sent by the one before it, before that
    one finishes, and a job's watch begins with its current state."""
    for step in STEPS:
        last: Event | None = None
        try:
            async for event in tasks.job(step_job_id(step, key)).awatch():
                last = event
                yield event
        except JobNotFoundError:
            return  # extract for a message that is not signal (or a message never sent)
        if last is None or last.state != JobState.SUCCEEDED.value:
            return  # failed or cancelled: a retry starts it again (connect again to follow)


@api.websocket("/ws")
async def all_events(websocket: WebSocket, tasks: TaskmillApp) -> None:
    """Every job's events as they happen, as the seed broadcast to every client."""
    await websocket.accept()
    await forward_events(websocket, tasks.events())
    await close(websocket)


async def close(websocket: WebSocket) -> None:
    """Close, unless the client did first."""
    if websocket.client_state is WebSocketState.CONNECTED:
        await websocket.close()
