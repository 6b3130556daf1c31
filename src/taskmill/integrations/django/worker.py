"""The taskmill app a worker runs for Django: ``taskmill worker
taskmill.integrations.django:app``, with ``DJANGO_SETTINGS_MODULE`` set."""

from __future__ import annotations

import importlib
import os

from taskmill.errors import ConfigurationError
from taskmill.integrations.django._compat import task_backends
from taskmill.integrations.django.backend import DjangoTasksApp, TaskmillBackend

__all__ = ["worker_app"]


def worker_app(alias: str = "default") -> DjangoTasksApp:
    """Set Django up, import every module of tasks, and return the app of backend ``alias``.

    The modules are each installed app's ``tasks`` module (as Django's admin finds each app's
    ``admin``) and those the backend's ``OPTIONS['modules']`` lists: importing a module of
    tasks registers them (``TaskmillBackend.validate_task``). A job of a task in none of them
    fails as an unknown task, naming the tasks the worker has.

    For a backend other than ``"default"``, point the worker at a module of yours holding
    ``app = worker_app("emails")``.
    """
    import django  # type: ignore[import-untyped]
    from django.conf import settings  # type: ignore[import-untyped]
    from django.utils.module_loading import autodiscover_modules  # type: ignore[import-untyped]

    if not settings.configured and not os.environ.get("DJANGO_SETTINGS_MODULE"):
        raise ConfigurationError(
            "a taskmill worker for Django needs the project's settings: set "
            "DJANGO_SETTINGS_MODULE (e.g. DJANGO_SETTINGS_MODULE=mysite.settings)"
        )
    django.setup()
    backend = task_backends[alias]
    if not isinstance(backend, TaskmillBackend):
        raise ConfigurationError(
            f"TASKS[{alias!r}] uses {type(backend).__module__}.{type(backend).__qualname__}, "
            "not taskmill.integrations.django.TaskmillBackend"
        )
    autodiscover_modules("tasks")
    for module in backend.config.modules:
        importlib.import_module(module)
    return backend.app
