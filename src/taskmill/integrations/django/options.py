"""The ``OPTIONS`` of a ``TaskmillBackend`` in Django's ``TASKS`` setting, checked once.

- ``url``: the broker (default: ``TASKMILL_URL``, else ``sqlite:///taskmill.db`` in the
  working directory, as for ``App``);
- ``enqueue_on_commit``: ``enqueue`` inside a transaction sends when it commits, and nothing
  if it rolls back (default ``False``); ``enqueue_in_transaction``: ``enqueue`` inside a
  transaction writes the job in it, on Django's own connection (default ``False``; the broker
  must be Django's database: its SQLite file, or its PostgreSQL database with psycopg 3);
  ``database``: the Django database whose transactions count (default ``"default"``);
- ``retries``: extra attempts of a task that raised (default ``0``: a Django task runs once,
  as Django's own backends run it); ``backoff``: seconds between attempts (default:
  taskmill's exponential backoff from 1 s, jittered, capped at 1 h); ``timeout``: seconds an
  attempt may run (default: no limit);
- ``modules``: modules a worker imports for their tasks, besides each installed app's
  ``tasks`` module;
- anything else is a taskmill ``App`` setting (``lease_s``, ``events``, ``result_ttl_s``...).

>>> options = BackendOptions.parse("default", {"url": "memory://", "retries": 2, "lease_s": 10})
>>> options.retries, options.enqueue_on_commit, options.app_settings
(2, False, {'lease_s': 10})
>>> BackendOptions.parse("default", {"retries": -1})
Traceback (most recent call last):
django.core.exceptions.ImproperlyConfigured: TASKS['default']['OPTIONS']['retries'] must be ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]

from taskmill.errors import ConfigurationError
from taskmill.settings import Settings

__all__ = ["BackendOptions"]


@dataclass(frozen=True)
class BackendOptions:
    url: str | None = None
    enqueue_on_commit: bool = False
    enqueue_in_transaction: bool = False
    database: str = "default"
    retries: int = 0
    backoff_s: float | None = None
    timeout_s: float | None = None
    modules: tuple[str, ...] = ()
    app_settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, alias: str, options: Mapping[str, Any]) -> BackendOptions:
        """The options of backend ``alias``; ``ImproperlyConfigured`` naming the bad one."""
        where = f"TASKS[{alias!r}]['OPTIONS']"
        rest = dict(options)

        def take(name: str, ok: Any, expected: str, default: Any) -> Any:
            value = rest.pop(name, default)
            if value is not default and not ok(value):
                raise ImproperlyConfigured(f"{where}[{name!r}] must be {expected}, not {value!r}")
            return value

        parsed = cls(
            url=take("url", _is_text, "a broker URL (a string)", None),
            enqueue_on_commit=take("enqueue_on_commit", _is_bool, "True or False", False),
            enqueue_in_transaction=take("enqueue_in_transaction", _is_bool, "True or False", False),
            database=take("database", _is_text, "a database alias (a string)", "default"),
            retries=take("retries", _is_count, "a whole number >= 0", 0),
            backoff_s=take("backoff", _is_seconds, "a number of seconds above 0", None),
            timeout_s=take("timeout", _is_seconds, "a number of seconds above 0", None),
            modules=tuple(take("modules", _is_names, "a list of module names", ())),
            app_settings=rest,
        )
        if parsed.enqueue_on_commit and parsed.enqueue_in_transaction:
            raise ImproperlyConfigured(
                f"{where}: enqueue_on_commit and enqueue_in_transaction are two ways to tie a "
                "send to a transaction: choose one"
            )
        try:
            Settings.build(rest)
        except ConfigurationError as exc:
            known = (
                "url, enqueue_on_commit, enqueue_in_transaction, database, retries, backoff, "
                "timeout, modules"
            )
            raise ImproperlyConfigured(
                f"{where}: {exc} (and this backend's own: {known})"
            ) from None
        return parsed


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_seconds(value: Any) -> bool:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and math.isfinite(value) and value > 0


def _is_names(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(_is_text(v) for v in value)
