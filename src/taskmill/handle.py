"""``JobHandle``: what ``send`` returns — the id, plus ways to look at and wait for the job."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from taskmill.errors import JobCancelledError, JobFailedError, JobNotFoundError
from taskmill.job import Job, JobState
from taskmill.serialization import decode

if TYPE_CHECKING:
    from taskmill.app import App
    from taskmill.events import Event

R = TypeVar("R")

_POLL_START_S = 0.002
_POLL_MAX_S = 0.1


async def no_worker_hint(app: App, job: Job) -> str:
    """``"; no worker is consuming queue 'x'"`` when the job waits and no registered worker
    takes its queue (the likely reason a wait timed out); else ``""``."""
    if job.state not in (JobState.QUEUED, JobState.SCHEDULED):
        return ""
    try:
        workers = await (await app.abroker()).list_workers()
    except Exception:  # only a hint: the timeout is the error to report
        return ""
    if any(job.queue in w.queues for w in workers):
        return ""
    return f"; no worker is consuming queue {job.queue!r}"


class JobHandle(Generic[R]):
    """A reference to a stored job.

    ``existing`` is True when ``send`` found a pending job with the same unique ``key`` and
    returned it instead of storing a new one.

    ``result()`` decodes the stored JSON result to the task's return annotation when the
    task is registered in this app (by the job's task name, however the handle was made) and
    msgspec can decode that type; otherwise it returns the JSON values as stored:

    >>> from datetime import datetime, timezone
    >>> from taskmill import App
    >>> app = App("memory://")
    >>> @app.task()
    ... def due() -> datetime:
    ...     return datetime(2024, 5, 1, tzinfo=timezone.utc)
    >>> handle = due.send()
    >>> app.run_until_idle()
    1
    >>> handle.result(timeout=5)
    datetime.datetime(2024, 5, 1, 0, 0, tzinfo=datetime.timezone.utc)
    >>> app.job(handle.id).result(timeout=5) == handle.result(timeout=5)
    True
    """

    __slots__ = ("_app", "existing", "id")

    def __init__(self, app: App, job_id: str, *, existing: bool = False) -> None:
        self._app = app
        self.id = job_id
        self.existing = existing

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JobHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    # --- async ------------------------------------------------------------------------------

    async def ainfo(self) -> Job:
        job = await (await self._app.abroker()).get(self.id)
        if job is None:
            raise JobNotFoundError(f"job {self.id} does not exist (or was pruned)")
        return job

    async def astatus(self) -> JobState:
        return (await self.ainfo()).state

    async def acancel(self) -> JobState:
        broker = await self._app.abroker()
        state = await broker.cancel(self.id)
        if state is None:
            raise JobNotFoundError(f"job {self.id} does not exist (or was pruned)")
        return state

    async def arun_now(self) -> JobState:
        """Make a scheduled job due now (see ``run_now``)."""
        state = await (await self._app.abroker()).run_now(self.id)
        if state is None:
            raise JobNotFoundError(f"job {self.id} does not exist (or was pruned)")
        return state

    async def aresult(self, timeout: float | None = None) -> R:
        """Wait until the job finishes; its result, or ``JobFailedError`` /
        ``JobCancelledError``; ``TimeoutError`` if it has not finished after ``timeout`` s.

        The result is decoded to the task's return annotation (see the class docstring); a
        stored result that no longer converts to it (the annotation changed since the job
        ran) raises ``SerializationError``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _POLL_START_S
        while True:
            job = await self.ainfo()
            if job.state.finished:
                return self._outcome(job)
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"job {self.id} ({job.task}) is still {job.state.value} after "
                        f"{timeout} s{await no_worker_hint(self._app, job)}"
                    )
                delay = min(delay, remaining)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX_S)

    def _outcome(self, job: Job) -> R:
        if job.state is JobState.SUCCEEDED:
            if job.result is None:
                return None  # type: ignore[return-value]
            task = self._app.tasks.get(job.task)
            result: Any = decode(job.result) if task is None else task.types.result(job.result)
            return result  # type: ignore[no-any-return]
        if job.state is JobState.CANCELLED:
            raise JobCancelledError(f"job {self.id} ({job.task}) was cancelled")
        err = job.error
        if err is None:
            raise JobFailedError(self.id, "unknown", "failed without a recorded error")
        raise JobFailedError(self.id, err.type, err.message, err.traceback)

    def awatch(self) -> AsyncGenerator[Event, None]:
        """This job's live events until it finishes: first its current state, then every
        transition and progress report (``App(events=True)`` where it is sent and run)."""
        from taskmill.events import watch

        return watch(self._app, self.id)

    # --- sync -------------------------------------------------------------------------------

    def watch(self) -> Iterator[Event]:
        """Blocking ``awatch``: each event as it arrives."""
        stream = self.awatch()

        async def step() -> Event:
            return await anext(stream)

        try:
            while True:
                try:
                    yield self._app.run_sync(step())
                except StopAsyncIteration:
                    return
        finally:
            self._app.run_sync(stream.aclose())

    def info(self) -> Job:
        """The stored job record (a snapshot)."""
        return self._app.run_sync(self.ainfo())

    def status(self) -> JobState:
        return self._app.run_sync(self.astatus())

    def cancel(self) -> JobState:
        """Cancel: a waiting job never runs; a running one is asked to stop. The state after."""
        return self._app.run_sync(self.acancel())

    def run_now(self) -> JobState:
        """Run a scheduled job now: a delayed send, or a job waiting for its next retry,
        becomes queued and due at once (its attempt count unchanged), and an idle worker
        is woken. Returns the state the job was in *before*: ``SCHEDULED`` (it is queued
        now), ``QUEUED`` (it was due already: nothing to do), or ``RUNNING`` or a finished
        state (nothing changed: it cannot run now; ``app.retry_jobs`` requeues a failed
        one). ``JobNotFoundError`` if there is no such job.

        >>> from taskmill import App
        >>> app = App("memory://")
        >>> @app.task()
        ... def report() -> str:
        ...     return "done"
        >>> handle = report.options(delay=3600).send()
        >>> handle.run_now()
        <JobState.SCHEDULED: 'scheduled'>
        >>> handle.status(), handle.run_now()
        (<JobState.QUEUED: 'queued'>, <JobState.QUEUED: 'queued'>)
        >>> app.close()
        """
        return self._app.run_sync(self.arun_now())

    def result(self, timeout: float | None = None) -> R:
        """Block until the job finishes (see ``aresult``)."""
        return self._app.run_sync(self.aresult(timeout))
