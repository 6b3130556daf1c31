"""Django's tasks framework on taskmill: ``TaskmillBackend`` for the ``TASKS`` setting, and the
app a worker runs (``taskmill worker taskmill.integrations.django:app``). See docs/django.md.

Works with ``django.tasks`` (Django >= 6) or its backport ``django-tasks`` (Python 3.11).
"""

from __future__ import annotations

from typing import Any

from taskmill.integrations.django.backend import DjangoTasksApp, TaskmillBackend
from taskmill.integrations.django.worker import worker_app

__all__ = ["DjangoTasksApp", "TaskmillBackend", "worker_app"]


def __getattr__(name: str) -> Any:
    """``app``: the worker's app for the ``"default"`` backend, made when a worker asks for
    it (``taskmill worker taskmill.integrations.django:app``), since it sets Django up."""
    if name == "app":
        return worker_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
