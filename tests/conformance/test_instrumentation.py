"""Instrumentation on every broker: the metadata an instrumentation's ``sending`` adds (a trace
context, say) is stored with the job, beside the send's own, and its ``running`` reads it back
in the worker, on every attempt (``taskmill.hooks.Instrumentation``)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import msgspec
import pytest

from taskmill import App, current_job
from taskmill.job import Job, NewJob
from taskmill.testing import running_worker

carried: contextvars.ContextVar[str] = contextvars.ContextVar("carried", default="")


class Carry:
    """Stores ``{"carried": "from <job id>"}`` with each job; makes it current while it runs."""

    def __init__(self) -> None:
        self.runs: list[tuple[int, str]] = []  # (attempt, the function's error type or "")

    @contextlib.contextmanager
    def sending(self, jobs: Sequence[NewJob]) -> Iterator[Sequence[NewJob]]:
        yield [msgspec.structs.replace(j, meta={**j.meta, "carried": f"from {j.id}"}) for j in jobs]

    @contextlib.contextmanager
    def running(self, job: Job) -> Iterator[None]:
        token = carried.set(str(job.meta["carried"]))
        try:
            yield
            self.runs.append((job.attempt, ""))
        except Exception as exc:
            self.runs.append((job.attempt, type(exc).__name__))
            raise
        finally:
            carried.reset(token)


@pytest.mark.timeout(60)
def test_metadata_an_instrumentation_adds_is_stored_and_read_back_on_every_attempt(
    app: App,
) -> None:
    carry = Carry()
    app.add_instrumentation(carry)

    @app.task(retries=1, backoff=0)
    def flaky() -> str:
        if current_job().attempt == 1:
            raise ConnectionError("try again")
        return carried.get()

    @app.task()
    async def seen() -> str:
        return carried.get()

    with running_worker(app):
        f = flaky.options(meta={"user": 7}).send()
        s = seen.send()
        assert f.result(timeout=30) == f"from {f.id}"
        assert s.result(timeout=30) == f"from {s.id}"
    assert app.get_job(f.id).meta == {"user": 7, "carried": f"from {f.id}"}
    assert app.get_job(s.id).meta == {"carried": f"from {s.id}"}
    assert sorted(carry.runs) == [(1, ""), (1, "ConnectionError"), (2, "")]
