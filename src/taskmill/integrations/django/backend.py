"""``TaskmillBackend``: Django's tasks framework sending to taskmill (see docs/django.md).

One taskmill ``App`` serves each backend alias in a process. Django makes a backend object per
thread (its handler keeps them in a thread-local, as it does database connections), so the app
is shared at module level: one broker connection and one registry of tasks, however many
threads enqueue.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime
from functools import partial
from typing import Any, ParamSpec, TypeVar

from django import conf  # type: ignore[import-untyped]
from django.core import checks  # type: ignore[import-untyped]
from django.db import transaction  # type: ignore[import-untyped]
from django.utils import timezone  # type: ignore[import-untyped]
from django.utils.module_loading import import_string  # type: ignore[import-untyped]

from taskmill._ids import uuid7
from taskmill.app import App
from taskmill.errors import JobNotFoundError
from taskmill.integrations.django._compat import (
    BaseTaskBackend,
    Task,
    TaskResult,
    TaskResultDoesNotExist,
    TaskResultStatus,
    task_enqueued,
)
from taskmill.integrations.django.arguments import normalise
from taskmill.integrations.django.options import BackendOptions
from taskmill.integrations.django.results import task_result
from taskmill.integrations.django.runner import DjangoTasks
from taskmill.job import Job
from taskmill.task import BoundTask

__all__ = ["DjangoTasksApp", "TaskmillBackend"]

P = ParamSpec("P")
T = TypeVar("T")


class DjangoTasksApp(App):
    """The taskmill app of a ``TaskmillBackend``: a worker started on it takes every queue
    the backend's ``QUEUES`` allows, not only those its tasks name by default (a send may
    pick another with ``task.using(queue_name=...)``)."""

    django_queues: frozenset[str] = frozenset()

    def queues(self) -> list[str]:
        return sorted(set(super().queues()) | self.django_queues)


class TaskmillBackend(BaseTaskBackend):
    """A backend of Django's tasks framework whose tasks run on taskmill workers.

    Configured in ``TASKS`` (``OPTIONS``: see ``taskmill.integrations.django.options``)::

        TASKS = {
            "default": {
                "BACKEND": "taskmill.integrations.django.TaskmillBackend",
                "QUEUES": ["default", "mail"],
                "OPTIONS": {"url": "redis://localhost:6379/0", "enqueue_on_commit": True},
            }
        }
    """

    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self.config = BackendOptions.parse(alias, self.options)
        self.tasks = _shared_tasks(alias, self.config, frozenset(self.queues), type(self))

    @property
    def app(self) -> DjangoTasksApp:
        """The taskmill app this backend sends to (``taskmill worker`` runs it: see
        ``taskmill.integrations.django.worker_app``)."""
        app = self.tasks.app
        assert isinstance(app, DjangoTasksApp)
        return app

    def validate_task(self, task: Task[Any, Any]) -> None:
        """Django's checks, then the task is registered in the app under its module path:
        Django calls this for every task made for this backend, so importing a module of
        tasks is what registers them, in a web process and in a worker alike."""
        super().validate_task(task)
        self.tasks.register(task)

    # --- enqueue ----------------------------------------------------------------------------

    def enqueue(
        self,
        task: Task[P, T],
        args: P.args,  # type: ignore[valid-type]
        kwargs: P.kwargs,  # type: ignore[valid-type]
    ) -> TaskResult[T]:
        """Send ``task(*args, **kwargs)``: now; or, inside ``atomic``, when the transaction
        commits (``enqueue_on_commit``) or in it (``enqueue_in_transaction``). Bad arguments
        raise here in every case, naming the task and the argument."""
        bound, json_args, json_kwargs = self._prepare(task, args, kwargs)
        result = self._ready(task, bound, json_args, json_kwargs)
        connection = self._open_transaction()
        if connection is not None:
            bound = BoundTask(bound.task, replace(bound.opts, connection=connection))
        send = partial(self._send, bound, json_args, json_kwargs, result)
        if self.config.enqueue_on_commit:
            transaction.on_commit(send, using=self.config.database)  # outside atomic: at once
        else:
            send()
        return result

    def _open_transaction(self) -> Any:
        """With ``enqueue_in_transaction``, the DB-API connection of the open ``atomic`` block
        (SQLite's ``sqlite3.Connection``, PostgreSQL's psycopg one) for taskmill to write the
        job in; ``None`` outside one (Django's autocommit: a send is its own transaction)."""
        if not self.config.enqueue_in_transaction:
            return None
        django_connection = transaction.get_connection(self.config.database)
        if not django_connection.in_atomic_block:
            return None
        django_connection.ensure_connection()
        return django_connection.connection

    async def aenqueue(
        self,
        task: Task[P, T],
        args: P.args,  # type: ignore[valid-type]
        kwargs: P.kwargs,  # type: ignore[valid-type]
    ) -> TaskResult[T]:
        """``enqueue`` for async code: sends at once (Django's transactions are synchronous,
        so async code has no open one to wait for or to write in)."""
        bound, json_args, json_kwargs = self._prepare(task, args, kwargs)
        result = self._ready(task, bound, json_args, json_kwargs)
        await bound.asend(*json_args, **json_kwargs)
        task_enqueued.send(type(self), task_result=result)
        return result

    def _prepare(
        self, task: Task[Any, Any], args: Any, kwargs: Any
    ) -> tuple[BoundTask[Any, Any], list[Any], dict[str, Any]]:
        """The job's options and its arguments as JSON, every check made (Django's, the JSON
        form, the call binding to the function, the size): nothing is sent yet."""
        self.validate_task(task)
        json_args, json_kwargs = normalise(task.module_path, args, kwargs)
        bound = self.tasks.register(task).options(
            queue=task.queue_name,
            priority=task.priority,
            run_at=_aware(task.run_after),
            job_id=uuid7(),
        )
        bound.task.build(bound.opts, tuple(json_args), json_kwargs, check_types=True)
        return bound, json_args, json_kwargs

    def _ready(
        self, task: Task[Any, Any], bound: BoundTask[Any, Any], args: Any, kwargs: Any
    ) -> TaskResult[Any]:
        assert bound.opts.job_id is not None
        return TaskResult(
            task=task,
            id=bound.opts.job_id,
            status=TaskResultStatus("READY"),
            enqueued_at=timezone.now(),
            started_at=None,
            finished_at=None,
            last_attempted_at=None,
            args=args,
            kwargs=kwargs,
            backend=self.alias,
            errors=[],
            worker_ids=[],
        )

    def _send(
        self,
        bound: BoundTask[Any, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        result: TaskResult[Any],
    ) -> None:
        bound.send(*args, **kwargs)
        task_enqueued.send(type(self), task_result=result)

    # --- results ----------------------------------------------------------------------------

    def get_result(self, result_id: str) -> TaskResult[Any]:
        """The task's state now: a taskmill job read back as a ``TaskResult``
        (``taskmill.integrations.django.results``); ``TaskResultDoesNotExist`` if there is no
        such job (never sent, rolled back, or pruned after ``result_ttl_s``)."""
        try:
            job = self.app.get_job(result_id)
        except JobNotFoundError:
            raise TaskResultDoesNotExist(result_id) from None
        return task_result(job, self._django_task(job), self.alias)

    async def aget_result(self, result_id: str) -> TaskResult[Any]:
        try:
            job = await self.app.aget_job(result_id)
        except JobNotFoundError:
            raise TaskResultDoesNotExist(result_id) from None
        return task_result(job, self._django_task(job), self.alias)

    def _django_task(self, job: Job) -> Task[Any, Any]:
        """The Django task a job runs: registered here, or imported by its module path."""
        task = self.tasks.django_task(job.task)
        if task is not None:
            return task
        try:
            found = import_string(job.task)
        except ImportError:
            found = None
        if not isinstance(found, Task):
            raise TaskResultDoesNotExist(
                f"{job.id}: a job of {job.task!r}, which is not a Django task this process "
                "can import"
            )
        return found

    def check(self, **kwargs: Any) -> Iterable[checks.CheckMessage]:
        config = self.config
        tied = config.enqueue_on_commit or config.enqueue_in_transaction
        if tied and config.database not in conf.settings.DATABASES:
            yield checks.Error(
                f"TASKS[{self.alias!r}]: sends are tied to the transactions of database "
                f"{config.database!r}, which DATABASES does not have",
                hint="Set OPTIONS['database'] to one of DATABASES.",
                id="taskmill.E001",
            )


def _aware(moment: datetime | None) -> datetime | None:
    """Django's ``run_after``: aware, or naive in the current time zone when ``USE_TZ`` is
    off (a naive datetime's ``timestamp()`` would read it in the system's zone instead)."""
    if moment is None or timezone.is_aware(moment):
        return moment
    return timezone.make_aware(moment)  # type: ignore[no-any-return]


_lock = threading.Lock()
_shared: dict[str, tuple[object, DjangoTasks]] = {}


def _shared_tasks(
    alias: str, config: BackendOptions, queues: frozenset[str], sender: type
) -> DjangoTasks:
    """The one app (and its tasks) of ``alias`` in this process; a new one when the alias's
    configuration changed (``override_settings(TASKS=...)`` in tests)."""
    key = (repr(config), queues, sender)
    with _lock:
        known = _shared.get(alias)
        if known is not None and known[0] == key:
            return known[1]
        app = DjangoTasksApp(config.url, **config.app_settings)
        app.django_queues = queues
        if config.enqueue_in_transaction:
            # Opened now, not at the first send: a SQLite broker's first open writes to the
            # file, which the transaction a send is made in holds locked until it ends.
            app.open()
        tasks = DjangoTasks(
            app,
            alias,
            sender,
            retries=config.retries,
            backoff_s=config.backoff_s,
            timeout_s=config.timeout_s,
        )
        _shared[alias] = (key, tasks)
        return tasks
