"""Django's tasks framework, wherever it is installed: ``django.tasks`` (Django >= 6, Python
>= 3.12) or the ``django-tasks`` backport (module ``django_tasks``, the same API), which is
what Python 3.11 can have. Only the names both share are imported here; the two differ in
module layout and in one exception's name (``InvalidTask`` in Django, ``InvalidTaskError`` in
the backport).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # mypy checks against the backport: Django ships no type hints
    from django_tasks import task_backends
    from django_tasks.backends.base import BaseTaskBackend
    from django_tasks.base import (
        TASK_MAX_PRIORITY,
        TASK_MIN_PRIORITY,
        Task,
        TaskContext,
        TaskError,
        TaskResult,
        TaskResultStatus,
    )
    from django_tasks.exceptions import InvalidTaskError, TaskResultDoesNotExist
    from django_tasks.signals import task_enqueued, task_finished, task_started
else:
    import importlib
    import importlib.util

    # one list of names for both homes: the backport mirrors Django's module layout
    _ROOT = "django.tasks" if importlib.util.find_spec("django.tasks") else "django_tasks"

    def _module(name: str) -> Any:
        return importlib.import_module(f"{_ROOT}{name}")

    task_backends = _module("").task_backends
    BaseTaskBackend = _module(".backends.base").BaseTaskBackend
    _base = _module(".base")
    TASK_MAX_PRIORITY, TASK_MIN_PRIORITY = _base.TASK_MAX_PRIORITY, _base.TASK_MIN_PRIORITY
    Task, TaskContext, TaskError = _base.Task, _base.TaskContext, _base.TaskError
    TaskResult, TaskResultStatus = _base.TaskResult, _base.TaskResultStatus
    _exceptions = _module(".exceptions")
    TaskResultDoesNotExist = _exceptions.TaskResultDoesNotExist
    # Django calls it InvalidTask; the backport (and Django 6 in development) InvalidTaskError
    InvalidTaskError = getattr(_exceptions, "InvalidTask", None) or _exceptions.InvalidTaskError
    _signals = _module(".signals")
    task_enqueued, task_started = _signals.task_enqueued, _signals.task_started
    task_finished = _signals.task_finished

__all__ = [
    "TASK_MAX_PRIORITY",
    "TASK_MIN_PRIORITY",
    "BaseTaskBackend",
    "InvalidTaskError",
    "Task",
    "TaskContext",
    "TaskError",
    "TaskResult",
    "TaskResultDoesNotExist",
    "TaskResultStatus",
    "task_backends",
    "task_enqueued",
    "task_finished",
    "task_started",
]
