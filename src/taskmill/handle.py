"""``JobHandle``: what ``send`` returns — the id, plus ways to look at and wait for the job."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from taskmill.errors import JobCancelledError, JobFailedError
from taskmill.events import Event, watch
from taskmill.job import Job, JobState
from taskmill.serialization import decode

if TYPE_CHECKING:
    from taskmill.client import Client

R = TypeVar("R")


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

    __slots__ = ("_client", "existing", "id")

    def __init__(self, client: Client, job_id: str, *, existing: bool = False) -> None:
        self._client = client
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
        return await self._client.aget_job(self.id)

    async def astatus(self) -> JobState:
        return (await self.ainfo()).state

    async def acancel(self) -> JobState:
        return await self._client.acancel_job(self.id)

    async def arun_now(self) -> JobState:
        """Make a scheduled job due now (see ``run_now``)."""
        return await self._client.arun_job_now(self.id)

    async def aresult(self, timeout: float | None = None) -> R:
        """Wait until the job finishes; its result, or ``JobFailedError`` /
        ``JobCancelledError``; ``TimeoutError`` if it has not finished after ``timeout`` s.

        With events on (``App(events=True)``) the wait is woken by the job's finishing event
        instead of polling the broker (see ``Client.await_finished``).

        The result is decoded to the task's return annotation (see the class docstring); a
        stored result that no longer converts to it (the annotation changed since the job
        ran) raises ``SerializationError``."""
        return self._outcome(await self._client.await_finished(self.id, timeout))

    def _outcome(self, job: Job) -> R:
        if job.state is JobState.SUCCEEDED:
            if job.result is None:
                return None  # type: ignore[return-value]
            task = self._client.registry.tasks.get(job.task)
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
        transition and progress report (``App(events=True)`` where it is sent and run). It
        also reads the job every second: if the finishing event is lost (delivery is at most
        once), the record's final state ends it, as the event it missed would have."""
        return watch(self._client, self.id)

    # --- sync -------------------------------------------------------------------------------

    def watch(self) -> Iterator[Event]:
        """Blocking ``awatch``: each event as it arrives."""
        stream = self.awatch()

        async def step() -> Event:
            return await anext(stream)

        try:
            while True:
                try:
                    yield self._client.run_sync(step())
                except StopAsyncIteration:
                    return
        finally:
            self._client.run_sync(stream.aclose())

    def info(self) -> Job:
        """The stored job record (a snapshot)."""
        return self._client.run_sync(self.ainfo())

    def status(self) -> JobState:
        return self._client.run_sync(self.astatus())

    def cancel(self) -> JobState:
        """Cancel: a waiting job never runs; a running one is asked to stop. The state after."""
        return self._client.run_sync(self.acancel())

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
        return self._client.run_sync(self.arun_now())

    def result(self, timeout: float | None = None) -> R:
        """Block until the job finishes (see ``aresult``)."""
        return self._client.run_sync(self.aresult(timeout))
