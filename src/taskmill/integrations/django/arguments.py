"""The arguments of a Django task, checked before anything is sent.

Django's tasks framework takes JSON arguments (``TaskResult.args`` are normalised to JSON
values: a tuple becomes a list, ``bytes`` UTF-8 text; anything else is refused). A value JSON
would change on the way is refused here too, so the function receives exactly what
``TaskResult.args`` shows: a float that is not finite (JSON has no NaN: it would arrive as
``None``) and a mapping key that is not a string (``{1: "a"}`` would arrive as ``{"1": "a"}``).
The error names the task and where the value is.

>>> normalise("shop.tasks.ship", (1, (2, b"x")), {"when": {"at": 3.5}})
([1, [2, 'x']], {'when': {'at': 3.5}})
>>> normalise("shop.tasks.ship", (), {"at": float("nan")})
Traceback (most recent call last):
taskmill.errors.SerializationError: task 'shop.tasks.ship': kwargs['at'] is nan: JSON has no NaN ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from taskmill.errors import SerializationError

__all__ = ["normalise", "to_json"]

_ALLOWED = (
    "Django tasks take and return str, int, float, bool, None, and lists and dicts of them "
    "(tuples are sent as lists, bytes as UTF-8 text)"
)


def normalise(
    task: str, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """``args`` and ``kwargs`` as JSON values, as Django normalises them; a
    ``SerializationError`` (a ``TypeError``) naming ``task`` and the value's place otherwise."""
    return (
        [to_json(value, f"args[{i}]", task) for i, value in enumerate(args)],
        {name: to_json(value, f"kwargs[{name!r}]", task) for name, value in kwargs.items()},
    )


def to_json(value: Any, where: str, task: str) -> Any:
    """``value`` as JSON values, by Django's rules and this module's two more; else a
    ``SerializationError`` saying ``task``: ``where`` (``args[0]``) and what is wrong."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _error(task, where, f"is {value!r}: JSON has no NaN or infinity")
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise _error(task, where, "is bytes that are not UTF-8 text") from None
    if isinstance(value, Mapping):
        return {_key(k, where, task): to_json(v, f"{where}[{k!r}]", task) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [to_json(v, f"{where}[{i}]", task) for i, v in enumerate(value)]
    raise _error(
        task, where, f"is a {type(value).__qualname__}, which JSON cannot carry: {_ALLOWED}"
    )


def _key(key: Any, where: str, task: str) -> str:
    if not isinstance(key, str):
        raise _error(
            task,
            where,
            f"has a key that is not a string, {key!r}: JSON object keys are strings, so the "
            "task would receive it as text",
        )
    return key


def _error(task: str, where: str, what: str) -> SerializationError:
    return SerializationError(f"task {task!r}: {where} {what}")
