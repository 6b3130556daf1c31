"""The dashboard's pages: overview, jobs, job, workers, schedules, workflows, enqueue.

Server-rendered (``web/templates``), with htmx (vendored in ``web/static``) refreshing the
live parts: each page's ``partials/...`` route renders the part that changes, polled every few
seconds, and fetched at once when an event arrives over the SSE stream (when the app has
``events=True`` and the stream is served). Actions are POST forms (``pages_actions``).
Everything comes from the admin API of ``App`` (docs/admin.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from taskmill.errors import JobNotFoundError
from taskmill.job import JobState
from taskmill.web import pages_actions
from taskmill.web.context import web_of
from taskmill.web.pages_data import (
    chart,
    running_workflows,
    schedules,
    shown_job,
    throughput,
    timeline,
    workflow,
    workflow_of_job,
)
from taskmill.web.pages_view import app_base, render, url_for

if TYPE_CHECKING:
    from taskmill.job import Job

PAGE_SIZE = 50
EVENTS_PATH = "/api/v1/events"
"""The SSE stream the pages listen to, if the application serves it (web/sse.py)."""


def events_url(request: Request, **filters: str) -> str | None:
    """The URL of the SSE stream for ``filters`` (``job_id=``, ``queue=``), or None when the
    app has events off or the stream is not served: the pages then only poll."""
    if not web_of(request).app.settings.events:
        return None
    if not any(getattr(route, "path", None) == EVENTS_PATH for route in request.app.routes):
        return None
    base = app_base(request)
    url = base.replace(path=base.path.rstrip("/") + EVENTS_PATH)
    return str(url.include_query_params(**filters) if filters else url)


# --- overview -----------------------------------------------------------------------------------


async def _overview_context(request: Request) -> dict[str, Any]:
    app = web_of(request).app
    workers = await app.aworkers()
    return {
        "stats": await app.astats(),
        "states": list(JobState),
        "alive": sum(1 for w in workers if not w.lost),
        "lost": sum(1 for w in workers if w.lost),
        "running": sum(len(w.running) for w in workers if not w.lost),
    }


async def overview(request: Request) -> Response:
    context = await _overview_context(request)
    return render(request, "overview.html", {**context, "events_url": events_url(request)})


async def overview_live(request: Request) -> Response:
    return render(request, "_overview_live.html", await _overview_context(request))


async def throughput_live(request: Request) -> Response:
    app = web_of(request).app
    data = await throughput(app, await app.anow())
    return render(request, "_throughput.html", {"chart": chart(data), "data": data})


# --- jobs ---------------------------------------------------------------------------------------


def job_filters(request: Request) -> dict[str, str]:
    """The jobs page's filters that are set: ``state``, ``queue``, ``task``."""
    params = request.query_params
    return {k: params[k].strip() for k in ("state", "queue", "task") if params.get(k, "").strip()}


async def jobs(request: Request) -> Response:
    app = web_of(request).app
    search = request.query_params.get("q", "").strip()
    if search:
        return await _search(request, search)
    filters = job_filters(request)
    cursor = request.query_params.get("cursor") or None
    context: dict[str, Any] = {
        "filters": filters,
        "queues": [s.queue for s in await app.astats()],
        "tasks": [t.name for t in app.registered_tasks()],
        "states": list(JobState),
        "search": "",
        "error": None,
        "page": None,
        "cursor": cursor,
    }
    try:
        context["page"] = await app.alist_jobs(
            state=filters.get("state"),
            queue=filters.get("queue"),
            task=filters.get("task"),
            limit=PAGE_SIZE,
            cursor=cursor,
            count=cursor is None,  # a count may read every matching job: the first page only
        )
    except ValueError as exc:  # an unknown state name, a cursor from elsewhere
        context["error"] = str(exc)
        return render(request, "jobs.html", context, status_code=400)
    return render(request, "jobs.html", context)


async def _search(request: Request, search: str) -> Response:
    """A job id, else the unique key of a pending job, goes to that job's page; anything
    else says it found nothing."""
    app = web_of(request).app
    try:
        job_id = (await app.aget_job(search)).id
    except JobNotFoundError:
        holder = await app.ajob_by_key(search)
        if holder is None:
            context = {"what": "job with the id or pending key", "id": search, "searched": True}
            return render(request, "not_found.html", context, 404)
        job_id = holder.id
    return RedirectResponse(job_url(request, job_id), status_code=303)


def job_url(request: Request, job_id: str) -> str:
    return str(url_for(request, "page_job").include_query_params(id=job_id))


# --- one job ------------------------------------------------------------------------------------


async def _job_context(request: Request, job: Job) -> dict[str, Any]:
    web = web_of(request)
    return {
        "job": job,
        "shown": shown_job(web.app, job, web.config.redact),
        "timeline": timeline(job),
        "workflow": await workflow_of_job(web.app, job),
        "now": await web.app.anow(),
    }


async def _job_or_404(request: Request) -> Job | Response:
    job_id = request.query_params.get("id", "")
    try:
        return await web_of(request).app.aget_job(job_id)
    except JobNotFoundError:
        return render(request, "not_found.html", {"what": "job", "id": job_id}, 404)


async def job(request: Request) -> Response:
    found = await _job_or_404(request)
    if isinstance(found, Response):
        return found
    context = await _job_context(request, found)
    context["events_url"] = events_url(request, job_id=found.id)
    return render(request, "job.html", context)


async def job_live(request: Request) -> Response:
    found = await _job_or_404(request)
    if isinstance(found, Response):
        return found
    return render(request, "_job_live.html", await _job_context(request, found))


# --- workers, schedules, workflows --------------------------------------------------------------


async def _workers_context(request: Request) -> dict[str, Any]:
    return {"workers": await web_of(request).app.aworkers()}


async def workers(request: Request) -> Response:
    context = await _workers_context(request)
    return render(request, "workers.html", {**context, "events_url": events_url(request)})


async def workers_live(request: Request) -> Response:
    return render(request, "_workers_live.html", await _workers_context(request))


async def schedules_page(request: Request) -> Response:
    app = web_of(request).app
    return render(request, "schedules.html", {"schedules": await schedules(app)})


async def workflows(request: Request) -> Response:
    """A workflow by id (``?id=``): its state and steps; and the running workflows, when the
    admin API can list them."""
    app = web_of(request).app
    workflow_id = request.query_params.get("id", "").strip()
    found = await workflow(app, workflow_id) if workflow_id else None
    status = 404 if workflow_id and found is None else 200
    running = await running_workflows(app)
    context = {"workflow_id": workflow_id, "workflow": found, "running": running}
    return render(request, "workflows.html", context, status_code=status)


# --- enqueue ------------------------------------------------------------------------------------


async def enqueue_form(request: Request) -> Response:
    return render(request, "enqueue.html", pages_actions.enqueue_context(request, {}, None))


async def purge_confirm(request: Request) -> Response:
    """The confirmation step before a queue's waiting jobs are deleted."""
    queue = request.query_params.get("queue", "")
    stats = {s.queue: s for s in await web_of(request).app.astats()}
    if queue not in stats:
        return render(request, "not_found.html", {"what": "queue", "id": queue}, 404)
    return render(request, "purge.html", {"queue": stats[queue]})


def routes() -> list[BaseRoute]:
    static = StaticFiles(packages=[("taskmill.web", "static")])
    return [
        Route("/", overview, name="page_overview"),
        Route("/partials/overview", overview_live, name="page_overview_live"),
        Route("/partials/throughput", throughput_live, name="page_throughput"),
        Route("/jobs", jobs, name="page_jobs"),
        Route("/job", job, name="page_job"),
        Route("/partials/job", job_live, name="page_job_live"),
        Route("/workers", workers, name="page_workers"),
        Route("/partials/workers", workers_live, name="page_workers_live"),
        Route("/schedules", schedules_page, name="page_schedules"),
        Route("/workflows", workflows, name="page_workflows"),
        Route("/enqueue", enqueue_form, name="page_enqueue"),
        Route("/queues/purge", purge_confirm, name="page_purge_confirm"),
        *pages_actions.routes(),
        Mount("/static", app=static, name="static"),
    ]
