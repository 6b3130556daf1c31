"""The Flask app: an HTML page to request avatars and follow them, and a JSON API.

``create_app()`` reads its config from ``FLASK_*`` environment variables
(``FLASK_TASKMILL_URL``, ``FLASK_AVATAR_API_URL``, ``FLASK_TASKMILL_LEASE_S``, …) and then from
its keyword arguments. Workers run with the same factory::

    flask --app examples.avatar_generator.web:create_app taskmill worker -c 8
"""

from __future__ import annotations

from typing import Any

from flask import Flask, abort, jsonify, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from examples.avatar_generator.status import Request, describe, recent_request_ids
from examples.avatar_generator.tasks import start_request, tasks
from taskmill.errors import JobNotFoundError
from taskmill.integrations.flask import current_taskmill

MAX_QUANTITY = 1000
DEFAULTS: dict[str, Any] = {"AVATAR_API_URL": "http://127.0.0.1:8089", "AVATAR_API_TIMEOUT_S": 30}
ACTIVE = {"pending", "generating", "collecting", "retrying"}


def create_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(DEFAULTS)
    app.config.from_prefixed_env()
    app.config.update(config)
    tasks.init_app(app)
    app.register_error_handler(HTTPException, _error)
    app.add_url_rule("/", view_func=index)
    app.add_url_rule("/requests", view_func=create_request, methods=["POST"])
    app.add_url_rule("/requests/<request_id>", view_func=show_request)
    app.add_url_rule("/requests/<request_id>/retry", view_func=retry_request, methods=["POST"])
    app.add_url_rule("/api/requests", view_func=api_list)
    app.add_url_rule("/api/requests", view_func=api_create, methods=["POST"])
    app.add_url_rule("/api/requests/<request_id>", view_func=api_show)
    app.add_url_rule("/api/requests/<request_id>/retry", view_func=api_retry, methods=["POST"])
    return app


# --- HTML -----------------------------------------------------------------------------------------


def index() -> str:
    found = [describe(current_taskmill, i) for i in recent_request_ids(current_taskmill)]
    refresh = any(r.status in ACTIVE for r in found)
    return render_template("index.html", requests=found, refresh=refresh)


def create_request() -> Response:
    prompt, quantity = _checked(request.form)
    handle = start_request(prompt, quantity)
    return redirect(url_for("show_request", request_id=handle.id), code=303)


def show_request(request_id: str) -> str:
    found = _find(request_id)
    return render_template("request.html", r=found, refresh=found.status in ACTIVE)


def retry_request(request_id: str) -> Response:
    _retry_failed(_find(request_id))
    return redirect(url_for("show_request", request_id=request_id), code=303)


# --- JSON -----------------------------------------------------------------------------------------


def api_list() -> Response:
    found = [describe(current_taskmill, i) for i in recent_request_ids(current_taskmill)]
    return jsonify(requests=[r.as_json() for r in found])


def api_create() -> tuple[Response, int]:
    prompt, quantity = _checked(request.get_json(silent=True) or {})
    handle = start_request(prompt, quantity)
    return jsonify(id=handle.id, url=url_for("api_show", request_id=handle.id)), 202


def api_show(request_id: str) -> Response:
    return jsonify(_find(request_id).as_json())


def api_retry(request_id: str) -> tuple[Response, int]:
    retried = _retry_failed(_find(request_id))
    return jsonify(retried=retried), 202 if retried else 409


# --- shared ---------------------------------------------------------------------------------------


def _checked(data: Any) -> tuple[str, int]:
    """The prompt and quantity of a new request, or a 400 saying what is wrong."""
    prompt = str(data.get("prompt", "")).strip()
    try:
        quantity = int(data.get("quantity", ""))
    except (TypeError, ValueError):
        abort(400, description=f"quantity must be a whole number, not {data.get('quantity')!r}")
    if not 1 <= quantity <= MAX_QUANTITY:
        abort(400, description=f"quantity must be from 1 to {MAX_QUANTITY}, not {quantity}")
    if not prompt or len(prompt) > 200:
        abort(400, description="prompt must be 1 to 200 characters")
    return prompt, quantity


def _error(exc: HTTPException) -> Any:
    """The JSON API answers its errors in JSON, ``{"error": "..."}``; the pages in HTML."""
    if request.path.startswith("/api/"):
        return jsonify(error=exc.description), exc.code
    return exc


def _find(request_id: str) -> Request:
    try:
        return describe(current_taskmill, request_id)
    except JobNotFoundError:
        abort(404, description=f"no request {request_id}")


def _retry_failed(found: Request) -> list[str]:
    """Put the request's failed batches back in their queue, with fresh attempts: taskmill's
    own retry (as the dashboard's button and ``taskmill jobs retry`` do)."""
    ids = [b.job_id for b in found.batches if b.number in found.failed_batches]
    return current_taskmill.retry_jobs(ids) if ids else []
