"""The ingestion's calls to the external services, and what their failures mean for a retry.

A transient failure (a 5xx, a timeout, a refused connection) raises ``UpstreamError`` and is
retried with back-off by the task's policy; a 429 asks taskmill for a retry after the
server's ``Retry-After`` (``taskmill.Retry``); any other 4xx is ``SourceRejectedError``, which
no retry can fix.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

from taskmill import Retry


class UpstreamError(Exception):
    """A service failed in a way that may pass: worth another attempt."""


class SourceRejectedError(Exception):
    """A service refused the request itself (a 4xx other than 429): retrying cannot help."""


class IngestionCutShortError(Exception):
    """The ingestion hit its soft time limit: what it had read was embedded, the rest was not."""


def fetch_page(base_url: str, persona: str, source: str, page: int, timeout_s: float) -> Any:
    """One page of a source: ``{"documents": [...], "next_page": n or None}``."""
    url = f"{base_url}/sources/{quote(persona)}/{quote(source)}?page={page}"
    return _call(urllib.request.Request(url), timeout_s)


def embed(base_url: str, persona: str, source: str, documents: list[str], timeout_s: float) -> int:
    """Embed documents into the persona's collection; the number of vectors stored."""
    request = urllib.request.Request(
        f"{base_url}/embed/{quote(persona)}/{quote(source)}",
        data=json.dumps({"documents": documents}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    return int(_call(request, timeout_s)["vectors"])


def _call(request: urllib.request.Request, timeout_s: float) -> Any:
    what = f"{request.get_method()} {request.full_url}"
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 429:
            delay = _retry_after(exc.headers.get("Retry-After"))
            raise Retry(delay=delay, reason=f"429 Too Many Requests from {what}") from None
        if exc.code >= 500:
            raise UpstreamError(f"{exc.code} {exc.reason} from {what}") from None
        raise SourceRejectedError(f"{exc.code} {exc.reason} from {what}") from None
    except TimeoutError:
        raise UpstreamError(f"{what} did not answer within {timeout_s:g} s") from None
    except urllib.error.URLError as exc:
        raise UpstreamError(f"{what} failed: {exc.reason}") from None


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: let the task's back-off decide
