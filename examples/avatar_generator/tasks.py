"""The jobs: one per batch of at most 20 personas, and a chord callback that sums them up.

The seed's ``TaskProcessor`` polled ``generation_tasks`` for ``status='pending'``, split the
request in batches of 20, ran them in a ``ThreadPoolExecutor(5)`` inside the one task, and
wrote ``generating-data`` / ``data-generated`` / ``failed`` by hand. Here a request is a
workflow (``start_request``): ``chord([generate_batch] * N, collect)``. Each batch is a job of
its own, retried on its own, and at most ``API_CONCURRENCY`` of them call the API at once
across every worker: a ``Limit`` kept in the broker, not a thread pool in a task.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from flask import current_app

from taskmill import Backoff, Limit, Retry
from taskmill.integrations.flask import Taskmill
from taskmill.workflows import WorkflowHandle, chord

BATCH_SIZE = 20
API_CONCURRENCY = 5  # the seed's MULTITHREAD_FLOWISE

tasks = Taskmill()


class ApiUnavailableError(Exception):
    """The API answered 5xx or not in time: worth another attempt."""


class PromptRejectedError(Exception):
    """The API refused the batch (4xx other than 429): another attempt would be refused too."""


def batch_sizes(total: int) -> list[int]:
    """The seed's ``calculate_batches``: 50 → [20, 20, 10].

    >>> batch_sizes(50)
    [20, 20, 10]
    """
    if total < 1:
        raise ValueError(f"a request needs at least 1 avatar, not {total}")
    return [min(BATCH_SIZE, total - start) for start in range(0, total, BATCH_SIZE)]


@tasks.task(
    retries=4,
    backoff=Backoff(base=0.5, cap=5.0),
    dont_retry_on=PromptRejectedError,
    concurrency=Limit(max=API_CONCURRENCY),
    timeout=120,
)
def generate_batch(prompt: str, batch: int, count: int) -> list[dict[str, str]]:
    """Ask the persona API for ``count`` personas; they are this job's result."""
    config = current_app.config  # the worker runs the job in the Flask app context
    body = json.dumps({"prompt": prompt, "batch": batch, "count": count}).encode()
    request = urllib.request.Request(
        f"{config['AVATAR_API_URL']}/api/v1/prediction",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=config["AVATAR_API_TIMEOUT_S"]) as answer:
            text = answer.read().decode()
    except urllib.error.HTTPError as exc:
        raise _http_error(exc, batch) from None
    except (TimeoutError, urllib.error.URLError) as exc:
        raise ApiUnavailableError(f"batch {batch}: no answer from the API ({exc})") from None
    return parse_personas(text)


def _http_error(exc: urllib.error.HTTPError, batch: int) -> Exception:
    detail = exc.read().decode(errors="replace")
    if exc.code == 429:
        # the API says when: that wait, not the back-off's
        return Retry(delay=float(exc.headers.get("Retry-After") or 1), reason="HTTP 429")
    if 400 <= exc.code < 500:
        return PromptRejectedError(f"batch {batch}: HTTP {exc.code} {detail}")
    return ApiUnavailableError(f"batch {batch}: HTTP {exc.code} {detail}")


def parse_personas(text: str) -> list[dict[str, str]]:
    """One JSON object a line; the seed skipped lines it could not parse, and so do we."""
    personas = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            personas.append({str(k): str(v) for k, v in item.items()})
    return personas


@tasks.task(accepts_failures=True, retries=0)
def collect(results: list[Any]) -> dict[str, Any]:
    """Runs once every batch has ended, failed ones included (``accepts_failures``): a failed
    batch's place holds ``{"error": ...}``, so a request keeps what succeeded."""
    failed = [n for n, r in enumerate(results) if isinstance(r, dict) and "error" in r]
    personas = sum(len(r) for r in results if isinstance(r, list))
    return {"personas": personas, "failed_batches": failed}


def start_request(prompt: str, quantity: int) -> WorkflowHandle:
    """A generation request: its workflow's id is the request's id."""
    batches = [generate_batch.s(prompt, n, size) for n, size in enumerate(batch_sizes(quantity))]
    return chord(batches, collect.s()).send()
