"""Flask: ``Taskmill``, an extension in the ``init_app`` style (``pip install 'taskmill[flask]'``).

- ``Taskmill(flask_app)`` or ``ext = Taskmill()`` then ``ext.init_app(flask_app)`` (the app
  factory pattern) makes one taskmill ``App`` per Flask app, from its config:
  ``TASKMILL_URL`` and one ``TASKMILL_<SETTING>`` key per ``taskmill.Settings`` field
  (``TASKMILL_LEASE_S``, ``TASKMILL_EVENTS``, …). An unknown ``TASKMILL_*`` key or a value of
  the wrong type is a ``ConfigurationError`` naming the key.
- ``flask_app.extensions["taskmill"]`` is that App, and so are ``ext.get_app()`` and the
  ``current_taskmill`` proxy inside an app context.
- ``@ext.task(...)`` declares a task before any Flask app exists; ``init_app`` registers it
  on each App it makes, wrapped so that it runs inside that Flask app's app context in the
  worker (``current_app.config``, extensions such as Flask-SQLAlchemy). ``.send()`` from a
  view sends it through the current Flask app's taskmill App.
- ``flask taskmill worker|jobs|queues|…``: taskmill's CLI as a command group, bound to the
  Flask app's taskmill App.
- ``ext.start_worker(**options)``: a worker on a thread of the web process
  (``App.worker_thread``, docs/embedding.md), stopped at exit; the App is closed at exit.

See docs/flask.md.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import inspect
import os
import weakref
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, cast, overload

import click
from flask import Flask, current_app, has_app_context
from flask.cli import ScriptInfo
from werkzeug.local import LocalProxy

from taskmill.app import App
from taskmill.cli import cli as taskmill_cli
from taskmill.cli._base import CliError, Env
from taskmill.errors import ConfigurationError, TaskmillError
from taskmill.handle import JobHandle
from taskmill.hooks import Hook
from taskmill.settings import Settings
from taskmill.task import BoundTask, Task
from taskmill.worker.embed import WorkerThread
from taskmill.workflows import Signature

__all__ = ["EXTENSION_KEY", "FlaskTask", "Taskmill", "command_group", "current_taskmill"]

P = ParamSpec("P")
R = TypeVar("R")

EXTENSION_KEY = "taskmill"
"""The key of the taskmill ``App`` in ``flask_app.extensions``."""

_PREFIX = "TASKMILL_"
_SETTING_KEYS = {f"{_PREFIX}{f.name.upper()}": f for f in dataclasses.fields(Settings)}
_KNOWN_KEYS = sorted({f"{_PREFIX}URL", *_SETTING_KEYS})

_Registration = Callable[[App, Flask], object]


class FlaskTaskDecorator(Protocol):
    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> FlaskTask[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> FlaskTask[P, R]: ...


class Taskmill:
    """The Flask extension. ``cli_group`` names the command group added to each Flask app
    (``None``: none).

    >>> from flask import Flask
    >>> ext = Taskmill()
    >>> @ext.task(retries=0)
    ... def add(a: int, b: int) -> int:
    ...     return a + b
    >>> flask_app = Flask("shop")
    >>> flask_app.config["TASKMILL_URL"] = "memory://"
    >>> ext.init_app(flask_app)
    >>> with flask_app.app_context():
    ...     handle = add.send(2, 3)
    ...     _ = current_taskmill.run_until_idle()
    ...     handle.result(timeout=5)
    5
    >>> ext.get_app(flask_app).close()
    """

    def __init__(self, app: Flask | None = None, *, cli_group: str | None = "taskmill") -> None:
        self.cli_group = cli_group
        self._registrations: list[_Registration] = []
        self._apps: weakref.WeakKeyDictionary[Flask, App] = weakref.WeakKeyDictionary()
        # tasks are declared on it too, so a bad option fails at the decorator's line
        self._probe = App("memory://")
        if app is not None:
            self.init_app(app)

    def __repr__(self) -> str:
        return f"<Taskmill tasks={len(self._probe.tasks)} apps={len(self._apps)}>"

    # --- Flask apps -------------------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        """Make the taskmill App of ``app`` from its config, register the declared tasks on
        it, add the command group, and close the App at exit."""
        if EXTENSION_KEY in app.extensions:
            raise ConfigurationError(
                f"Flask app {app.name!r} has a taskmill extension already (init_app twice?)"
            )
        url, settings = _config(app)
        taskmill_app = App(url, **settings)
        for register in self._registrations:
            register(taskmill_app, app)
        app.extensions[EXTENSION_KEY] = taskmill_app
        self._apps[app] = taskmill_app
        atexit.register(taskmill_app.close)
        if self.cli_group is not None:
            app.cli.add_command(command_group(taskmill_app, self.cli_group))

    def get_app(self, app: Flask | None = None) -> App:
        """The taskmill App of ``app`` (default: the current Flask app)."""
        return _app_of(app)

    def start_worker(
        self, app: Flask | None = None, *, stop_timeout_s: float | None = 60.0, **options: Any
    ) -> WorkerThread:
        """Run a worker on a thread of this process (``App.worker_thread``: ``queues``,
        ``concurrency``, ``pool``, ``name``, ``drain_timeout_s``, …), for a deployment of one
        process. Returns once the broker is open; the worker drains and stops at exit (up to
        ``stop_timeout_s``), or when you call ``stop()``."""
        worker = _app_of(app).worker_thread(**options).start()

        def stop_at_exit() -> None:
            if worker.running:
                worker.stop(timeout=stop_timeout_s)

        atexit.register(stop_at_exit)  # runs before the App's close: last in, first out
        return worker

    # --- declarations, made on every App this extension makes --------------------------------

    @overload
    def task(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> FlaskTask[P, R]: ...
    @overload
    def task(self, fn: Callable[P, R], /) -> FlaskTask[P, R]: ...
    @overload
    def task(self, fn: None = None, /, **options: Any) -> FlaskTaskDecorator: ...

    def task(self, fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """Declare a task (``@ext.task`` or ``@ext.task(...)``, the options of ``App.task``).
        Its job runs inside the app context of the Flask app whose worker runs it."""

        def declare(f: Callable[..., Any]) -> FlaskTask[Any, Any]:
            name = self._probe.task(**options)(f).name

            def register(taskmill_app: App, flask_app: Flask) -> None:
                taskmill_app.task(**{**options, "name": name})(_in_app_context(f, flask_app))

            self._add(register)
            return FlaskTask(self, f, name)

        return declare(fn) if fn is not None else declare

    def periodic(self, **options: Any) -> Callable[[FlaskTask[P, R]], FlaskTask[P, R]]:
        """Run a declared task on a schedule (the options of ``App.periodic``); put it above
        ``@ext.task(...)``."""

        def declare(target: FlaskTask[P, R]) -> FlaskTask[P, R]:
            if not isinstance(target, FlaskTask):
                raise ConfigurationError(
                    f"ext.periodic(...) goes above @ext.task(...), not on a {type(target)!r}"
                )
            self._probe.periodic(**options)(self._probe.get_task(target.name))

            def register(taskmill_app: App, flask_app: Flask) -> None:
                taskmill_app.periodic(**options)(taskmill_app.get_task(target.name))

            self._add(register)
            return target

        return declare

    def configure_queue(self, name: str, **limits: Any) -> None:
        """A queue's limits on every App (the options of ``App.configure_queue``)."""
        self._probe.configure_queue(name, **limits)
        self._add(lambda taskmill_app, _: taskmill_app.configure_queue(name, **limits))

    def on_enqueue(self, hook: Hook) -> Hook:
        """An app-wide hook on every App (``App.on_enqueue``); the others alike."""
        self._add(lambda taskmill_app, _: taskmill_app.on_enqueue(hook))
        return hook

    def on_start(self, hook: Hook) -> Hook:
        self._add(lambda taskmill_app, _: taskmill_app.on_start(hook))
        return hook

    def on_success(self, hook: Hook) -> Hook:
        self._add(lambda taskmill_app, _: taskmill_app.on_success(hook))
        return hook

    def on_failure(self, hook: Hook) -> Hook:
        self._add(lambda taskmill_app, _: taskmill_app.on_failure(hook))
        return hook

    def on_retry(self, hook: Hook) -> Hook:
        self._add(lambda taskmill_app, _: taskmill_app.on_retry(hook))
        return hook

    def _add(self, register: _Registration) -> None:
        self._registrations.append(register)
        for flask_app, taskmill_app in list(self._apps.items()):
            register(taskmill_app, flask_app)


class FlaskTask(Generic[P, R]):
    """A task declared with ``@ext.task``: calling it calls the function; ``send``, ``asend``,
    ``send_many``, ``options`` and ``s`` go to the ``Task`` of the current Flask app's
    taskmill App (``.task``), so they need an app context: a request, a CLI command,
    ``with flask_app.app_context():``, or a job the worker runs."""

    def __init__(self, ext: Taskmill, fn: Callable[P, Any], name: str) -> None:
        self.ext = ext
        self.fn = fn
        self.name = name
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<FlaskTask {self.name}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        return self.fn(*args, **kwargs)

    def task_of(self, app: Flask | None = None) -> Task[P, R]:
        """This task as registered on the taskmill App of ``app`` (default: the current one)."""
        return cast(Task[P, R], _app_of(app, what=f"{self.name}").get_task(self.name))

    @property
    def task(self) -> Task[P, R]:
        return self.task_of()

    def send(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]:
        return self.task.send(*args, **kwargs)

    async def asend(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]:
        return await self.task.asend(*args, **kwargs)

    def send_many(
        self, calls: Iterable[Sequence[Any] | Mapping[str, Any]], *, connection: Any = None
    ) -> list[JobHandle[R]]:
        return self.task.send_many(calls, connection=connection)

    def options(self, **options: Any) -> BoundTask[P, R]:
        return self.task.options(**options)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        return self.task.s(*args, **kwargs)


def _current_taskmill() -> App:
    return _app_of(None)


current_taskmill: App = cast(App, LocalProxy(_current_taskmill))
"""The taskmill App of the current Flask app (inside an app context)."""


def _app_of(app: Flask | None, what: str = "the taskmill App") -> App:
    if app is None:
        if not has_app_context():
            raise RuntimeError(
                f"{what} is looked up through the current Flask app, and there is none: "
                "send from a request or a CLI command, or inside "
                "'with flask_app.app_context():'"
            )
        app = cast(Flask, current_app._get_current_object())  # type: ignore[attr-defined]
    try:
        return cast(App, app.extensions[EXTENSION_KEY])
    except KeyError:
        raise RuntimeError(
            f"Flask app {app.name!r} has no taskmill App: call Taskmill.init_app(app) first"
        ) from None


# --- configuration ------------------------------------------------------------------------------


def _config(app: Flask) -> tuple[str | None, dict[str, Any]]:
    """``TASKMILL_URL`` and the settings from ``app.config``, each value checked by key."""
    given = {k: v for k, v in app.config.items() if k.startswith(_PREFIX)}
    unknown = sorted(set(given) - set(_KNOWN_KEYS))
    if unknown:
        raise ConfigurationError(
            f"unknown taskmill config key(s) {unknown} in Flask app {app.name!r}; known keys: "
            f"{', '.join(_KNOWN_KEYS)}"
        )
    url = given.pop(f"{_PREFIX}URL", None)
    if url is not None and not (isinstance(url, str) and url):
        raise ConfigurationError(f"TASKMILL_URL must be a broker URL string, not {url!r}")
    for key, value in given.items():
        _check_value(key, _SETTING_KEYS[key], value)
    settings = {_SETTING_KEYS[k].name: v for k, v in given.items()}
    try:
        Settings.build(settings)  # the rules between settings (heartbeat_s < lease_s, …)
    except ConfigurationError as exc:
        raise ConfigurationError(f"taskmill config of Flask app {app.name!r}: {exc}") from None
    return url, settings


def _check_value(key: str, field: dataclasses.Field[Any], value: Any) -> None:
    if field.type == "str":
        ok, kind = isinstance(value, str), "a string"
    elif field.type == "bool":
        ok, kind = isinstance(value, bool), "True or False"
    else:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        optional = field.default is None
        ok = number or (optional and value is None)
        kind = "a number" + (" or None" if optional else "")
    if not ok:
        raise ConfigurationError(f"{key} must be {kind}, not {value!r}")


# --- running a job inside its Flask app's context ------------------------------------------------


def _in_app_context(fn: Callable[..., Any], flask_app: Flask) -> Callable[..., Any]:
    """``fn`` run inside ``flask_app.app_context()``. ``functools.wraps`` keeps its name,
    signature and annotations, which taskmill binds arguments and decodes payloads by."""
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            with flask_app.app_context():
                return await fn(*args, **kwargs)

        return run_async

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with flask_app.app_context():
            return fn(*args, **kwargs)

    return run


# --- the CLI as a Flask command group ------------------------------------------------------------


class _BoundGroup(click.Group):
    """taskmill's commands bound to one App; its errors as one line, as ``taskmill`` prints."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TaskmillError as exc:
            raise CliError(" ".join(str(exc).split())) from None


_CHILD_ENV = "TASKMILL_FLASK_APP"
_CHILD_PATH = f"{__name__}:cli_app"


def command_group(taskmill_app: App, name: str = "taskmill") -> click.Group:
    """taskmill's CLI commands (the same command objects) as a group bound to
    ``taskmill_app``: ``flask taskmill worker -c 8``, ``flask taskmill jobs list``.

    Under the ``flask`` command, the child processes of ``worker -p N``, ``--pool-spec`` and
    ``--pool process`` load the Flask app as the parent did (``--app``, or the files Flask
    looks for) and take its taskmill App; ``--app module:attr`` names another App for them."""

    @click.pass_context
    def bind(ctx: click.Context) -> None:
        env = Env(_app=taskmill_app, _loaded=True)
        info = ctx.find_object(ScriptInfo)
        if info is not None and info.create_app is None:
            # children are processes of their own: they find the Flask app from these
            os.environ[_CHILD_ENV] = info.app_import_path or ""
            env.app_path = _CHILD_PATH
        ctx.obj = env

    return _BoundGroup(
        name=name,
        commands=taskmill_cli.commands,
        callback=bind,
        help="taskmill's commands, on this Flask app's taskmill App.",
    )


def __getattr__(name: str) -> Any:
    """``cli_app``: the taskmill App of the Flask app that ``flask ... taskmill worker``
    loaded, loaded again the same way in a worker's child process (see ``command_group``)."""
    if name != "cli_app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _CHILD_ENV not in os.environ:
        raise ConfigurationError(
            f"{_CHILD_PATH} is for the child processes of 'flask taskmill worker'; "
            f"{_CHILD_ENV} is not set"
        )
    info = ScriptInfo(app_import_path=os.environ[_CHILD_ENV] or None)
    return _app_of(info.load_app())
