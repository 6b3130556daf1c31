"""Hide secrets wherever the dashboard and the API show a job: values whose key or parameter
name contains a configured name (``WebConfig.redact``: password, token, secret...).

Names match case-insensitively, as substrings (``"token"`` hides ``api_token`` and
``TokenId``), at any depth of mappings and lists. Positional arguments are matched to the
task's parameter names through its signature, when the task is registered in the app.

>>> redact({"user": "ann", "Password": "pw", "more": [{"api_token": "x"}]}, ["password", "token"])
{'user': 'ann', 'Password': '[redacted]', 'more': [{'api_token': '[redacted]'}]}

A hidden value that a task put in its error message or traceback is hidden there too.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from taskmill.job import Job, describe
from taskmill.serialization import decode_payload, try_decode

if TYPE_CHECKING:
    from taskmill.registry import TaskDefinition

REDACTED = "[redacted]"
"""What a hidden value is shown as."""


def hides(name: str, names: Sequence[str]) -> bool:
    """Whether the value named ``name`` is hidden (a configured name is part of it)."""
    lowered = name.lower()
    return any(n.lower() in lowered for n in names if n)


def redact(value: Any, names: Sequence[str]) -> Any:
    """``value`` with the values of mapping keys that match ``names`` replaced by
    ``REDACTED``, at any depth; a copy (``value`` is not changed)."""
    if not names:
        return value
    if isinstance(value, Mapping):
        return {
            k: REDACTED if isinstance(k, str) and hides(k, names) else redact(v, names)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v, names) for v in value]
    return value


def redact_call(
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    task: TaskDefinition | None,
    names: Sequence[str],
) -> tuple[list[Any], dict[str, Any]]:
    """A call's arguments with the secret ones hidden: keyword arguments by their name,
    positional ones by the name of the parameter they bind to (if ``task`` is known)."""
    shown_args = [redact(a, names) for a in args]
    if task is not None:
        for i, name in enumerate(_positional_names(task.signature, len(args))):
            if name is not None and hides(name, names):
                shown_args[i] = REDACTED
    return shown_args, redact(dict(kwargs), names)


def _positional_names(signature: inspect.Signature, n: int) -> list[str | None]:
    """The parameter each of ``n`` positional arguments binds to (``*args``' name for the
    extra ones; None past what the signature takes)."""
    names: list[str | None] = []
    for param in signature.parameters.values():
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            names.append(param.name)
        elif param.kind is param.VAR_POSITIONAL:
            names += [param.name] * max(0, n - len(names))
    return (names + [None] * n)[:n]


def job_view(job: Job, task: TaskDefinition | None, names: Sequence[str]) -> dict[str, Any]:
    """A job as the API returns it and the pages show it (``taskmill.job.describe``), its
    arguments split into ``args`` and ``kwargs``, and arguments, result and metadata
    redacted. A payload that cannot be read is shown as ``payload`` text instead."""
    view = describe(job)
    del view["payload"]
    try:
        args, kwargs = decode_payload(job.payload)
    except Exception:  # shown as stored: the job is what the page is about
        args, kwargs = [], {}
        view["args"], view["kwargs"] = None, None
        view["payload"] = REDACTED if names else try_decode(job.payload)
    else:
        view["args"], view["kwargs"] = redact_call(args, kwargs, task, names)
    hidden = _hidden_texts([args, kwargs], [view["args"], view["kwargs"]])
    view["result"] = redact(view["result"], names)
    view["meta"] = redact(view["meta"], names)
    if hidden and view["error"] is not None:
        view["error"] = {k: _scrub(v, hidden) for k, v in view["error"].items()}
    if hidden and view["progress_message"]:
        view["progress_message"] = _scrub(view["progress_message"], hidden)
    return view


def _hidden_texts(call: list[Any], shown: list[Any]) -> list[str]:
    """The text values the redaction hid (at least 4 characters: shorter ones would blank
    ordinary words), longest first."""
    found: set[str] = set()
    _collect(call, shown, found)
    return sorted((t for t in found if len(t) >= 4), key=len, reverse=True)


def _collect(original: Any, shown: Any, found: set[str]) -> None:
    if shown == REDACTED and original != REDACTED:
        found.update(_texts(original))
    elif isinstance(original, Mapping) and isinstance(shown, Mapping):
        for key, value in original.items():
            if key in shown:
                _collect(value, shown[key], found)
    elif isinstance(original, list | tuple) and isinstance(shown, list | tuple):
        for value, shown_value in zip(original, shown, strict=False):
            _collect(value, shown_value, found)


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [str(value)]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _texts(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _texts(v)]
    return []


def _scrub(text: Any, hidden: list[str]) -> Any:
    if not isinstance(text, str):
        return text
    for secret in hidden:
        text = text.replace(secret, REDACTED)
    return text


__all__ = ["REDACTED", "hides", "job_view", "redact", "redact_call"]
