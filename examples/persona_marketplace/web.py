"""The marketplace's HTTP side (FastAPI): start an ingestion, look its jobs up by id, retry a
failed one; taskmill's dashboard and HTTP API mounted at ``/dashboard`` behind a login.

- ``POST /api/personas/{persona_id}/ingest``: send the orchestrating chord; 202 with the
  ingestion (workflow) id and each source's job id;
- ``GET /api/personas/{persona_id}``: the persona's status (``draft``, ``ingesting``,
  ``active``, ``failed``) and its sources' latest rows;
- ``GET /api/ingestions/{ingestion_id}``: the workflow's state, its summary once done, and its
  jobs' rows;
- ``GET /api/jobs/{job_id}``: one job's status row, with taskmill's own state of it;
- ``POST /api/jobs/{job_id}/retry``: put a failed job back in its queue (409 if not failed);
- ``/dashboard/``: taskmill's dashboard (pages, and its API under ``/dashboard/api/v1``),
  behind HTTP basic auth.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Path
from starlette.concurrency import run_in_threadpool

from examples.persona_marketplace.status import persona_status
from examples.persona_marketplace.tasks import SOURCES, PersonaTasks, source_of
from taskmill import JobNotFoundError
from taskmill.integrations.fastapi import mount_dashboard, taskmill_lifespan
from taskmill.web import WebConfig

PersonaId = Annotated[
    str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="letters, digits, _ and -")
]


def create_api(tasks: PersonaTasks, dashboard: WebConfig) -> FastAPI:
    """The app; ``dashboard`` must configure auth (the dashboard can retry and purge)."""
    if not dashboard.has_auth:
        raise ValueError("the dashboard mounted in the marketplace needs users or tokens")

    @asynccontextmanager
    async def status_table(api: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(tasks.status.create)
        yield

    # the workers are `taskmill worker` processes, as the seed's were `celery worker`: the
    # web process only opens the App (for sends and lookups) and closes it at shutdown
    api = FastAPI(
        title="persona marketplace", lifespan=taskmill_lifespan(tasks.app, then=status_table)
    )
    mount_dashboard(api, tasks.app, "/dashboard", dashboard)
    _persona_routes(api, tasks)
    _job_routes(api, tasks)
    return api


def _persona_routes(api: FastAPI, tasks: PersonaTasks) -> None:
    @api.post("/api/personas/{persona_id}/ingest", status_code=202)
    async def ingest(persona_id: PersonaId) -> dict[str, Any]:
        flow = await tasks.ingestion(persona_id).asend()
        steps = (await tasks.app.aget_workflow(flow.id)).steps
        jobs = {source_of(s.task): s.job_id for s in steps}
        return {"ingestion": flow.id, "jobs": {source: jobs[source] for source in SOURCES}}

    @api.get("/api/personas/{persona_id}")
    async def persona(persona_id: PersonaId) -> dict[str, Any]:
        rows = await run_in_threadpool(tasks.status.latest_for, persona_id)
        return {"persona": persona_id, "status": persona_status(rows), "jobs": rows}

    @api.get("/api/ingestions/{ingestion_id}")
    async def ingestion(ingestion_id: str) -> dict[str, Any]:
        try:
            flow = await tasks.app.aget_workflow(ingestion_id)
        except JobNotFoundError:
            raise HTTPException(404, f"no ingestion {ingestion_id!r}") from None
        rows = [await run_in_threadpool(tasks.status.get, s.job_id) for s in flow.steps]
        summary = None
        if flow.state == "succeeded":
            summary = await tasks.app.job(flow.steps[-1].job_id).aresult(timeout=5)
        return {
            "ingestion": flow.id,
            "state": flow.state,
            "summary": summary,
            "jobs": [row for row in rows if row is not None],
        }


def _job_routes(api: FastAPI, tasks: PersonaTasks) -> None:
    @api.get("/api/jobs/{job_id}")
    async def job(job_id: str) -> dict[str, Any]:
        row = await run_in_threadpool(tasks.status.get, job_id)
        if row is None:
            raise HTTPException(404, f"no ingestion job {job_id!r}")
        try:
            record = await tasks.app.aget_job(job_id)
        except JobNotFoundError:  # pruned after result_ttl_s: the row stays
            return {**row, "taskmill_state": None}
        return {**row, "taskmill_state": record.state.value}

    @api.post("/api/jobs/{job_id}/retry", status_code=202)
    async def retry(job_id: str) -> dict[str, str]:
        if await run_in_threadpool(tasks.status.get, job_id) is None:
            raise HTTPException(404, f"no ingestion job {job_id!r}")
        if not await tasks.app.aretry_jobs([job_id]):
            raise HTTPException(
                409, f"job {job_id!r} is neither failed nor cancelled: there is nothing to retry"
            )
        return {"job_id": job_id, "taskmill_state": "queued"}
