"""Calls to the scoring model (the fake one, or a real service with the same API), and what
each kind of failure means for the job: retried, retried after the model's own delay, or
failed at once."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from taskmill import Retry


class ModelError(Exception):
    """The model failed (5xx, a timeout, a refused connection): worth another attempt."""


class ModelRejected(Exception):
    """The model refuses this input (4xx other than 429): another attempt cannot help."""


def call_model(base_url: str, path: str, text: str, timeout_s: float) -> dict[str, Any]:
    """POST ``{"text": text}`` to the model; its JSON answer. Raises ``Retry`` with the
    model's ``Retry-After`` for a 429, ``ModelRejected`` for another 4xx, ``ModelError``
    otherwise."""
    request = urllib.request.Request(
        base_url + path,
        data=json.dumps({"text": text}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        if exc.code == 429:
            delay = float(exc.headers.get("Retry-After") or 1)
            raise Retry(delay=delay, reason=f"the model is rate limiting: {delay:g} s") from None
        if 400 <= exc.code < 500:
            raise ModelRejected(f"the model refused the text: {exc.code} {_reason(exc)}") from None
        raise ModelError(f"the model failed: {exc.code} {_reason(exc)}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise ModelError(f"the model did not answer: {exc}") from None


def _reason(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("error", ""))
    except (ValueError, AttributeError):
        return ""
