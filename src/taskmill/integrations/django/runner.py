"""Django tasks as taskmill tasks: each is registered in the backend's ``App`` under its
module path (``shop.tasks.send_receipt``), as a small function that runs it the way Django's
own backends do.

The registered function has the Django function's signature without ``context`` and without
annotations, so ``send`` checks that a call binds (a missing argument fails at enqueue, naming
the task) and the worker passes the JSON values as stored, which is what Django promises a task
(``TaskResult.args``). Around the call it does what Django's backends do: builds the
``TaskContext`` of a task that ``takes_context``, sends the ``task_started`` and
``task_finished`` signals, normalises the return value to JSON (a value that cannot be is the
task's failure, as in Django), and, for a sync function, closes the database connections
Django considers stale before and after, as Django does around a request.
"""

from __future__ import annotations

import inspect
import os
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from inspect import iscoroutinefunction
from typing import TYPE_CHECKING, Any, cast

from django.db import close_old_connections  # type: ignore[import-untyped]

from taskmill.context import current_job
from taskmill.integrations.django._compat import (
    Task,
    TaskContext,
    TaskError,
    TaskResult,
    TaskResultStatus,
    task_finished,
    task_started,
)
from taskmill.integrations.django.arguments import to_json
from taskmill.integrations.django.results import as_django_time, class_path
from taskmill.retry import error_info

if TYPE_CHECKING:
    from taskmill import App
    from taskmill import Task as TaskmillTask

__all__ = ["DjangoTasks"]


class DjangoTasks:
    """The Django tasks of one backend (``alias``) as tasks of its taskmill ``app``."""

    def __init__(
        self,
        app: App,
        alias: str,
        sender: type,
        *,
        retries: int,
        backoff_s: float | None,
        timeout_s: float | None,
    ) -> None:
        self.app = app
        self.alias = alias
        self.sender = sender
        """What Django's signals are sent as coming from: the backend's class."""
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self._latest: dict[str, Task[Any, Any]] = {}
        self._lock = threading.Lock()  # two threads' first sight must not register two

    def register(self, task: Task[Any, Any]) -> TaskmillTask[Any, Any]:
        """The taskmill task of a Django task (made on first sight). A module imported again
        makes new function objects: the runner calls the latest."""
        name = task.module_path
        with self._lock:
            self._latest[name] = task
            known = self.app.tasks.get(name)
            return known if known is not None else self._register(name, task)

    def _register(self, name: str, task: Task[Any, Any]) -> TaskmillTask[Any, Any]:
        register = self.app.task(
            name=name,
            queue=task.queue_name,
            retries=self.retries,
            backoff=self.backoff_s,
            timeout=self.timeout_s,
        )
        return register(self._runner(name, task))

    def django_task(self, name: str) -> Task[Any, Any] | None:
        """The Django task registered under ``name`` in this process, if any."""
        return self._latest.get(name)

    def _runner(self, name: str, task: Task[Any, Any]) -> Callable[..., Any]:
        run: Callable[..., Any]
        if iscoroutinefunction(task.func):

            async def run(*args: Any, **kwargs: Any) -> Any:
                django_task = self._latest[name]
                result = self._started(django_task, args, kwargs)
                try:
                    value = await django_task.acall(*_with_context(result), *args, **kwargs)
                    return self._succeeded(result, value)
                except Exception as exc:  # not a cancel: a shutdown hands the job back
                    self._failed(result, exc)
                    raise

        else:

            def run(*args: Any, **kwargs: Any) -> Any:
                django_task = self._latest[name]
                close_old_connections()
                try:
                    result = self._started(django_task, args, kwargs)
                    try:
                        value = django_task.call(*_with_context(result), *args, **kwargs)
                        return self._succeeded(result, value)
                    except Exception as exc:
                        self._failed(result, exc)
                        raise
                finally:
                    close_old_connections()

        cast(Any, run).__signature__ = _signature(task)
        run.__name__ = task.func.__name__
        run.__qualname__ = task.func.__qualname__
        run.__module__ = task.func.__module__
        run.__doc__ = task.func.__doc__
        return run

    # --- the TaskResult the running task and the signals see --------------------------------

    def _started(
        self, task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> TaskResult[Any]:
        job = current_job()
        now = as_django_time(datetime.now(UTC).timestamp())
        result: TaskResult[Any] = TaskResult(
            task=task,
            id=job.id,
            status=TaskResultStatus("RUNNING"),
            enqueued_at=None,
            started_at=now,
            finished_at=None,
            last_attempted_at=now,
            args=list(args),
            kwargs=kwargs,
            backend=self.alias,
            errors=[],
            worker_ids=[_this_worker()] * job.attempt,
        )
        task_started.send(sender=self.sender, task_result=result)
        return result

    def _succeeded(self, result: TaskResult[Any], value: Any) -> Any:
        value = to_json(value, "its return value", result.task.module_path)
        _set(result, _return_value=value, status=TaskResultStatus("SUCCESSFUL"))
        self._finished(result)
        return value

    def _failed(self, result: TaskResult[Any], exc: BaseException) -> None:
        info = error_info(exc)
        error = TaskError(exception_class_path=class_path(info.type), traceback=info.traceback)
        result.errors.append(error)
        _set(result, status=TaskResultStatus("FAILED"))
        self._finished(result)

    def _finished(self, result: TaskResult[Any]) -> None:
        _set(result, finished_at=as_django_time(datetime.now(UTC).timestamp()))
        task_finished.send(sender=self.sender, task_result=result)


def _with_context(result: TaskResult[Any]) -> tuple[Any, ...]:
    return (TaskContext(task_result=result),) if result.task.takes_context else ()


def _set(result: TaskResult[Any], **values: Any) -> None:
    for name, value in values.items():
        object.__setattr__(result, name, value)  # TaskResult is frozen, as Django's backends do


def _signature(task: Task[Any, Any]) -> inspect.Signature:
    """The Django function's parameters as a job binds them: without ``context`` (the worker
    passes it) and without annotations (the worker passes JSON values, as Django does)."""
    params = list(inspect.signature(task.func).parameters.values())
    if task.takes_context:
        params = params[1:]
    return inspect.Signature([p.replace(annotation=inspect.Parameter.empty) for p in params])


def _this_worker() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"
