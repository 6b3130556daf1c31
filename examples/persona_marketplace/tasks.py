"""The ingestion tasks, their status hooks, and the orchestrating chord.

``build(config)`` makes the taskmill ``App`` and registers, under stable names:

- ``persona.ingest_profile``, ``persona.ingest_works``, ``persona.ingest_quotes``: read one
  source of a persona page by page and embed it; each returns the number of vectors stored.
  Sync functions, run by ``taskmill worker --pool process``: the soft limit raises
  ``SoftTimeLimitExceeded`` inside them, the hard limit kills the child running them.
- ``persona.finish_ingestion``: the chord's callback, which sums the three up once they have
  all ended, failed ones included (``accepts_failures``).

The status rows the app shows are written by the hooks the three ingestion tasks share (the
seed's ``CallbackTask``), never by the task bodies: ``on_enqueue`` (pending), ``on_start``
(processing), ``on_retry`` (retrying, with the error), ``on_success`` (completed, with the
vectors), ``on_failure`` (failed, with the error).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from examples.persona_marketplace.config import Config
from examples.persona_marketplace.sources import (
    IngestionCutShortError,
    SourceRejectedError,
    embed,
    fetch_page,
)
from examples.persona_marketplace.status import StatusTable
from taskmill import App, Backoff, JobView, SoftTimeLimitExceeded, Task, TaskTimeoutError, chord
from taskmill.job import ErrorInfo, NewJob
from taskmill.workflows import Chain

SOURCES = ("profile", "works", "quotes")
"""In the seed's order: the profile first, the fastest."""
RETRIES = 3
NOT_RETRIED = (SourceRejectedError, IngestionCutShortError, SoftTimeLimitExceeded, TaskTimeoutError)
"""What another attempt cannot fix: a refused request, and running out of time (the same
corpus would run out of time again)."""


@dataclass(frozen=True)
class PersonaTasks:
    """The app and its tasks, as ``build`` registered them."""

    app: App
    status: StatusTable
    ingest: dict[str, Task[[str], int]]
    finish: Task[[list[Any], str], dict[str, Any]]

    def ingestion(self, persona_id: str) -> Chain:
        """The orchestrator: the three sources in parallel, then the summary."""
        members = [self.ingest[source].s(persona_id) for source in SOURCES]
        return chord(members, self.finish.s(persona_id))


def build(config: Config) -> PersonaTasks:
    """The app on ``config.broker_url`` with every task registered (nothing is opened)."""
    app = App(config.broker_url, lease_s=config.lease_s)
    status = StatusTable(config.status_db)
    hooks = StatusHooks(status)
    ingest: dict[str, Task[[str], int]] = {}
    for source in SOURCES:
        ingest[source] = app.task(
            name=f"persona.ingest_{source}",
            retries=RETRIES,
            backoff=Backoff(base=config.retry_base_s, cap=30.0),
            dont_retry_on=NOT_RETRIED,
            soft_timeout=config.soft_limit_s,
            timeout=config.hard_limit_s,
            on_enqueue=hooks.on_enqueue,
            on_start=hooks.on_start,
            on_retry=hooks.on_retry,
            on_success=hooks.on_success,
            on_failure=hooks.on_failure,
        )(_ingestion_of(config, source))
    finish = app.task(name="persona.finish_ingestion", retries=0, accepts_failures=True)(
        finish_ingestion
    )
    return PersonaTasks(app, status, ingest, finish)


def _ingestion_of(config: Config, source: str) -> Callable[[str], int]:
    def ingest(persona_id: str) -> int:
        return ingest_source(config, persona_id, source)

    return ingest


def ingest_source(config: Config, persona_id: str, source: str) -> int:
    """Read every page of the source, then embed it all; the vectors stored.

    At the soft limit it stops reading and embeds what it has, so the work done is kept, then
    fails with ``IngestionCutShortError`` (the seed caught ``SoftTimeLimitExceeded`` and
    re-raised it). If that last embedding hangs, the hard limit ends the run."""
    documents: list[str] = []
    page: int | None = 0
    try:
        while page is not None:
            body = fetch_page(config.services_url, persona_id, source, page, config.http_timeout_s)
            documents += body["documents"]
            page = body["next_page"]
    except SoftTimeLimitExceeded:
        kept = embed(config.services_url, persona_id, source, documents, config.embed_timeout_s)
        raise IngestionCutShortError(
            f"soft time limit ({config.soft_limit_s:g} s) reached while reading {source}: "
            f"{len(documents)} documents read and embedded ({kept} vectors), the rest not read"
        ) from None
    return embed(config.services_url, persona_id, source, documents, config.embed_timeout_s)


def finish_ingestion(results: list[Any], persona_id: str) -> dict[str, Any]:
    """The chord's callback: vectors stored, and the sources that failed with their errors."""
    vectors = sum(r for r in results if isinstance(r, int))
    failed = {
        source: f"{r['error']['type'].rsplit('.', 1)[-1]}: {r['error']['message']}"
        for source, r in zip(SOURCES, results, strict=True)
        if isinstance(r, dict) and "error" in r
    }
    return {"persona": persona_id, "vectors": vectors, "failed": failed}


# --- the hooks that keep the status rows -------------------------------------------------------


class StatusHooks:
    """The five hooks the ingestion tasks share (the seed's ``CallbackTask``)."""

    def __init__(self, table: StatusTable) -> None:
        self.table = table

    def on_enqueue(self, job: NewJob) -> None:
        # a NewJob carries its arguments as the JSON stored: [args, kwargs]
        args = json.loads(job.payload)[0]
        self.table.record(job.id, str(args[0]), source_of(job.task), "pending")

    def on_start(self, job: JobView) -> None:
        self._record(job, "processing")

    def on_retry(self, job: JobView, error: ErrorInfo, delay: float) -> None:
        self._record(job, "retrying", retried=True, error=describe(error))

    def on_success(self, job: JobView, result: int) -> None:
        self._record(job, "completed", vectors=result)

    def on_failure(self, job: JobView, error: ErrorInfo) -> None:
        self._record(job, "failed", error=describe(error))

    def _record(self, job: JobView, status: str, **fields: Any) -> None:
        persona = persona_of(job)
        self.table.record(
            job.id, persona, source_of(job.task), status, attempt=job.attempt, **fields
        )


def source_of(task_name: str) -> str:
    """``works`` for ``persona.ingest_works``."""
    return task_name.removeprefix("persona.ingest_")


def persona_of(job: JobView) -> str:
    # a job whose arguments could not be decoded has none: its failure is still recorded
    return str(job.args[0]) if job.args else "(unknown)"


def describe(error: ErrorInfo) -> str:
    """``UpstreamError: 500 Internal Server Error from GET http://...``"""
    return f"{error.type.rsplit('.', 1)[-1]}: {error.message}"
