"""Live job events as Server-Sent Events (``text/event-stream``), for the API's ``GET
/api/v1/events`` and the pages' live updates.

Each event is one message ``event: job`` whose ``data`` is the JSON of a
``taskmill.events.Event`` (job_id, task, queue, state, attempt, at, seq, progress, message):
no arguments, no results. A comment line goes out every ``KEEPALIVE_S`` so proxies keep an
idle stream open. Needs ``events=True`` in the apps that send and run the jobs
(``docs/events.md``); ``events_enabled`` says whether this app has it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import msgspec
from starlette.responses import StreamingResponse

from taskmill.events import Event, subscribe

if TYPE_CHECKING:
    from taskmill.app import App

KEEPALIVE_S = 15.0
"""Seconds between keep-alive comments on an idle stream."""

_encoder = msgspec.json.Encoder()


def events_enabled(app: App) -> bool:
    """Whether the app publishes job events (``App(..., events=True)``)."""
    return bool(app.settings.events)


def sse_message(event: Event) -> bytes:
    """One event as an SSE message."""
    return b"event: job\ndata: " + _encoder.encode(event) + b"\n\n"


async def event_messages(
    app: App,
    *,
    job_ids: Sequence[str] | None = None,
    queue: str | None = None,
    keepalive_s: float = KEEPALIVE_S,
) -> AsyncIterator[bytes]:
    """SSE messages for the app's job events (of ``job_ids`` and/or ``queue`` if given),
    starting with a comment once the subscription listens (a client can then act, knowing
    it will see what follows), until the client goes away."""
    ready = asyncio.Event()
    stream = subscribe(app.client, job_id=list(job_ids) if job_ids else None, queue=queue,
                       ready=ready)  # fmt: skip
    pending = asyncio.ensure_future(anext(stream))
    try:
        listening = asyncio.ensure_future(ready.wait())
        await asyncio.wait({pending, listening}, return_when=asyncio.FIRST_COMPLETED)
        listening.cancel()
        if pending.done():
            pending.result()  # a subscription that failed to start raises here
        yield b": listening\n\n"
        while True:
            done, _ = await asyncio.wait({pending}, timeout=keepalive_s)
            if not done:
                yield b": keep-alive\n\n"
                continue
            event = pending.result()
            pending = asyncio.ensure_future(anext(stream))
            yield sse_message(event)
    finally:
        pending.cancel()
        with contextlib.suppress(BaseException):
            await pending
        await stream.aclose()


def sse_response(
    app: App, *, job_ids: Sequence[str] | None = None, queue: str | None = None
) -> StreamingResponse:
    """A streaming response of the app's job events (see ``event_messages``)."""
    return StreamingResponse(
        event_messages(app, job_ids=job_ids, queue=queue),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


__all__ = ["KEEPALIVE_S", "event_messages", "events_enabled", "sse_message", "sse_response"]
