"""The dashboard's actions: POST forms, each checked with ``require_write`` and logged on
``taskmill.web`` with who did it; then a redirect (303) back to the page the form was on,
with a fixed notice (``?done=retried&n=3``).

retry (jobs by id, or every failed job of a queue or task, or every job matching the jobs
page's filter), cancel and delete finished jobs (the same), run a scheduled job now, pause /
resume / purge a queue (purge only with its confirmation field), trigger a periodic schedule
now, enqueue a job by task name with JSON arguments.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from starlette.datastructures import URL, FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from taskmill.admin import MAX_PAGE
from taskmill.errors import (
    ConfigurationError,
    DuplicateJobError,
    JobNotFoundError,
    UnknownTaskError,
)
from taskmill.job import FINISHED_STATES, JobState
from taskmill.web.context import require_write, web_of, who
from taskmill.web.pages_view import app_base, render, url_for

if TYPE_CHECKING:
    from taskmill.app import App

log = logging.getLogger("taskmill.web")

_RETRYABLE = frozenset({JobState.FAILED, JobState.CANCELLED})
_CANCELLABLE = frozenset({JobState.SCHEDULED, JobState.QUEUED, JobState.RUNNING})
_MAX_IDS_LOGGED = 20


async def _writer_form(request: Request) -> FormData:
    """The form of a request its user may make (403 for a read-only user)."""
    require_write(request)
    return await request.form()


def _back(request: Request, form: FormData, done: str, n: int | None = None) -> Response:
    """Back to the page the form came from (its ``next`` field, if it is a URL of this
    application), saying what was done."""
    target = form.get("next")
    base = str(app_base(request))
    if not isinstance(target, str) or not target.startswith(base):
        target = str(url_for(request, "page_overview"))
    params = {"done": done} if n is None else {"done": done, "n": str(n)}
    url = URL(target).remove_query_params(["done", "n"]).include_query_params(**params)
    return RedirectResponse(str(url), status_code=303)


def _ids(form: FormData) -> list[str]:
    return [i for i in form.getlist("id") if isinstance(i, str) and i]


def _logged(ids: list[str]) -> str:
    shown = ", ".join(ids[:_MAX_IDS_LOGGED])
    return shown + (f" and {len(ids) - _MAX_IDS_LOGGED} more" if len(ids) > _MAX_IDS_LOGGED else "")


# --- jobs ---------------------------------------------------------------------------------------


async def retry(request: Request) -> Response:
    """The failed or cancelled jobs ``id`` (any number), or, with no id, every failed job of
    ``queue`` and of tasks starting with ``task`` (both optional: every failed job)."""
    form = await _writer_form(request)
    app = web_of(request).app
    ids = _ids(form)
    if ids:
        retried = await app.aretry_jobs(ids)
    else:
        queue, task = _text(form, "queue"), _text(form, "task")
        retried = await app.aretry_jobs(queue=queue, task=task)
    log.info("%s retried %d job(s): %s", who(request), len(retried), _logged(retried))
    return _back(request, form, "retried" if retried else "unchanged", len(retried))


async def cancel(request: Request) -> Response:
    """Cancel the jobs ``id``: waiting ones never run, running ones are asked to stop."""
    form = await _writer_form(request)
    done = await _cancel_all(web_of(request).app, _ids(form))
    log.info("%s cancelled %d job(s): %s", who(request), len(done), _logged(done))
    return _back(request, form, "cancelled" if done else "unchanged", len(done))


async def _cancel_all(app: App, ids: list[str]) -> list[str]:
    done = []
    for job_id in ids:
        try:
            state = await app.acancel_job(job_id)
        except JobNotFoundError:
            continue
        if state in (JobState.CANCELLED, JobState.RUNNING):
            done.append(job_id)
    return done


async def run_now(request: Request) -> Response:
    """Make the scheduled jobs ``id`` due now."""
    form = await _writer_form(request)
    app = web_of(request).app
    moved = []
    for job_id in _ids(form):
        try:
            if await app.arun_job_now(job_id) is JobState.SCHEDULED:
                moved.append(job_id)
        except JobNotFoundError:
            continue
    log.info("%s ran %d scheduled job(s) now: %s", who(request), len(moved), _logged(moved))
    return _back(request, form, "ran" if moved else "unchanged", len(moved))


def _selected(form: FormData, states: frozenset[JobState]) -> frozenset[JobState]:
    """Those of ``states`` the filter's ``state`` field asks for (all of them without one)."""
    wanted = _text(form, "state")
    try:
        return states & {JobState.parse(wanted)} if wanted else states
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None


async def matching_ids(app: App, form: FormData, states: frozenset[JobState]) -> list[str]:
    """The ids of every job the jobs page's filter (``state``, ``queue``, ``task`` fields)
    matches, among ``states``. Collected before anything changes: acting while paging would
    move jobs under the cursor."""
    selected = _selected(form, states)
    if not selected:
        return []
    found: list[str] = []
    cursor = None
    while True:
        page = await app.alist_jobs(
            state=selected,
            queue=_text(form, "queue"),
            task=_text(form, "task"),
            limit=MAX_PAGE,
            cursor=cursor,
            count=False,
        )
        found += [j.id for j in page.jobs]
        cursor = page.next_cursor
        if cursor is None:
            return found


async def retry_matching(request: Request) -> Response:
    """Retry every failed or cancelled job the filter matches."""
    form = await _writer_form(request)
    app = web_of(request).app
    retried = await app.aretry_jobs(await matching_ids(app, form, _RETRYABLE))
    log.info("%s retried %d job(s) matching %s", who(request), len(retried), _filter_text(form))
    return _back(request, form, "retried" if retried else "unchanged", len(retried))


async def cancel_matching(request: Request) -> Response:
    """Cancel every scheduled, queued or running job the filter matches."""
    form = await _writer_form(request)
    app = web_of(request).app
    done = await _cancel_all(app, await matching_ids(app, form, _CANCELLABLE))
    log.info("%s cancelled %d job(s) matching %s", who(request), len(done), _filter_text(form))
    return _back(request, form, "cancelled" if done else "unchanged", len(done))


async def delete(request: Request) -> Response:
    """Delete the finished jobs ``id`` (others are left as they are)."""
    form = await _writer_form(request)
    deleted = await web_of(request).app.adelete_jobs(_ids(form))
    log.info("%s deleted %d job(s): %s", who(request), len(deleted), _logged(deleted))
    return _back(request, form, "deleted" if deleted else "unchanged", len(deleted))


async def delete_matching(request: Request) -> Response:
    """Delete every finished job the filter matches."""
    form = await _writer_form(request)
    selected = _selected(form, FINISHED_STATES)
    queue, task = _text(form, "queue"), _text(form, "task")
    app = web_of(request).app
    deleted = await app.adelete_jobs(state=selected, queue=queue, task=task) if selected else []
    log.info("%s deleted %d job(s) matching %s", who(request), len(deleted), _filter_text(form))
    return _back(request, form, "deleted" if deleted else "unchanged", len(deleted))


def _text(form: FormData, name: str) -> str | None:
    value = form.get(name)
    return value.strip() or None if isinstance(value, str) else None


def _filter_text(form: FormData) -> str:
    given = {k: _text(form, k) for k in ("state", "queue", "task")}
    return " ".join(f"{k}={v}" for k, v in given.items() if v) or "(no filter)"


# --- queues and schedules -----------------------------------------------------------------------


async def _queue(request: Request) -> tuple[FormData, str]:
    form = await _writer_form(request)
    queue = _text(form, "queue")
    if queue is None:
        raise HTTPException(400, "the form has no queue")
    return form, queue


async def pause(request: Request) -> Response:
    form, queue = await _queue(request)
    await web_of(request).app.apause(queue)
    log.info("%s paused queue %s", who(request), queue)
    return _back(request, form, "paused")


async def resume(request: Request) -> Response:
    form, queue = await _queue(request)
    await web_of(request).app.aresume(queue)
    log.info("%s resumed queue %s", who(request), queue)
    return _back(request, form, "resumed")


async def purge(request: Request) -> Response:
    """Delete the queue's waiting jobs, once the confirmation page's field says which queue:
    without it, the confirmation page."""
    form, queue = await _queue(request)
    if _text(form, "confirm") != queue:
        url = url_for(request, "page_purge_confirm").include_query_params(queue=queue)
        return RedirectResponse(str(url), status_code=303)
    n = await web_of(request).app.apurge(queue)
    log.info("%s purged queue %s: %d waiting job(s) deleted", who(request), queue, n)
    return _back(request, form, "purged", n)


async def trigger(request: Request) -> Response:
    """Send a periodic schedule's job now, with the schedule's arguments and metadata, beside
    its ticks (which are not moved)."""
    form = await _writer_form(request)
    app = web_of(request).app
    name = _text(form, "schedule") or ""
    schedule = app.schedules.get(name)
    if schedule is None:
        return render(request, "not_found.html", {"what": "schedule", "id": name}, 404)
    handle = await app.atrigger_schedule(name)
    log.info("%s triggered schedule %s: job %s", who(request), name, handle.id)
    return _back(request, form, "triggered", 1)


# --- enqueue ------------------------------------------------------------------------------------


class FormError(Exception):
    """A field of the enqueue form that cannot be used, with the status to answer."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def enqueue_context(request: Request, values: dict[str, str], error: str | None) -> dict[str, Any]:
    app = web_of(request).app
    return {"tasks": app.registered_tasks(), "values": values, "error": error}


def _json_field(values: dict[str, str], name: str, kind: type, empty: str) -> Any:
    text = values.get(name, "").strip() or empty
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormError(f"{name}: not JSON ({exc})", 400) from None
    if not isinstance(value, kind):
        what = "a JSON list, such as [1, 2]" if kind is list else 'a JSON object, such as {"a": 1}'
        raise FormError(f"{name}: must be {what}, not {text}")
    return value


def _send_options(values: dict[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name in ("queue", "key"):
        if values.get(name, "").strip():
            options[name] = values[name].strip()
    priority = values.get("priority", "").strip()
    if priority:
        options["priority"] = int(priority) if priority.lstrip("-").isdigit() else priority
    delay = values.get("delay", "").strip()
    if delay:
        try:
            options["delay"] = float(delay)
        except ValueError:
            raise FormError(f"delay: a number of seconds, not {delay!r}", 400) from None
    return options


async def enqueue(request: Request) -> Response:
    """Send a job by task name; the form again, with the reason, if it cannot be sent."""
    form = await _writer_form(request)
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    task = values.get("task", "").strip()
    try:
        if not task:
            raise FormError("task: choose a task", 400)
        args = _json_field(values, "args", list, "[]")
        kwargs = _json_field(values, "kwargs", dict, "{}")
        handle = await web_of(request).app.asend_task(task, args, kwargs, **_send_options(values))
    except UnknownTaskError as exc:
        return _form_again(request, values, str(exc), 404)
    except FormError as exc:
        return _form_again(request, values, str(exc), exc.status)
    except DuplicateJobError as exc:  # its key is held by a pending job
        return _form_again(request, values, str(exc), 409)
    except (TypeError, ValueError, ConfigurationError) as exc:  # arguments or options refused
        return _form_again(request, values, str(exc), 422)
    log.info("%s enqueued %s as job %s", who(request), task, handle.id)
    url = url_for(request, "page_job").include_query_params(id=handle.id)
    return RedirectResponse(str(url), status_code=303)


def _form_again(request: Request, values: dict[str, str], error: str, status: int) -> Response:
    return render(request, "enqueue.html", enqueue_context(request, values, error), status)


def routes() -> list[BaseRoute]:
    post = ["POST"]
    return [
        Route("/actions/retry", retry, methods=post, name="page_retry"),
        Route("/actions/cancel", cancel, methods=post, name="page_cancel"),
        Route("/actions/run-now", run_now, methods=post, name="page_run_now"),
        Route("/actions/retry-matching", retry_matching, methods=post, name="page_retry_matching"),
        Route(
            "/actions/cancel-matching", cancel_matching, methods=post, name="page_cancel_matching"
        ),
        Route("/actions/delete", delete, methods=post, name="page_delete"),
        Route(
            "/actions/delete-matching", delete_matching, methods=post, name="page_delete_matching"
        ),
        Route("/actions/pause", pause, methods=post, name="page_pause"),
        Route("/actions/resume", resume, methods=post, name="page_resume"),
        Route("/actions/purge", purge, methods=post, name="page_purge"),
        Route("/actions/trigger", trigger, methods=post, name="page_trigger"),
        Route("/enqueue", enqueue, methods=post, name="page_enqueue_send"),
    ]
