"""``current_job()``: what a running task knows about its own job."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(eq=False)
class JobContext:
    """The running job, as seen from inside the task.

    ``args`` and ``kwargs`` are the job's arguments as the function received them: decoded to
    the types its annotations declare, JSON values where it declares none
    (``taskmill.conversion``).

    >>> from taskmill import current_job
    >>> def resize(path: str) -> None:
    ...     job = current_job()
    ...     job.progress(0.5, "halfway")
    ...     if job.cancelled:
    ...         return
    """

    id: str
    task: str
    queue: str
    attempt: int
    max_attempts: int
    _report: Callable[[str, float | None, str | None], None] = field(repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _last_progress: float = field(default=0.0, repr=False)
    _soft_limit_hit: bool = field(default=False, repr=False)
    _arguments: tuple[list[Any], dict[str, Any]] | None = field(default=None, repr=False)
    """The decoded arguments the function is called with: the run decodes them once, keeps
    them here, and every later step of the run reads them (see ``worker.execution``)."""
    _mark_idle: Callable[[bool], None] | None = field(default=None, repr=False)
    """Under a supervisor: tells the worker's table of held jobs whether anything of this job
    runs or ran unfinished (``False``) or it only waits (``True``; ``worker.holdings``)."""

    @property
    def args(self) -> tuple[Any, ...]:
        """The positional arguments (empty until the worker has decoded them)."""
        return () if self._arguments is None else tuple(self._arguments[0])

    @property
    def kwargs(self) -> Mapping[str, Any]:
        """The keyword arguments, read-only (empty until the worker has decoded them)."""
        return MappingProxyType({} if self._arguments is None else self._arguments[1])

    @property
    def cancelled(self) -> bool:
        """True once someone asked to cancel this job, or it passed its ``soft_timeout``: a
        sync task should return soon."""
        return self._cancelled.is_set()

    @property
    def soft_limit_exceeded(self) -> bool:
        """True once the job ran past its ``soft_timeout`` (``cancelled`` is then set too).

        The flag is how a sync task in the thread pool learns of its soft limit, since no
        exception can be raised into its thread; elsewhere ``SoftTimeLimitExceeded`` is
        raised as well."""
        return self._soft_limit_hit

    def _pass_soft_limit(self) -> None:
        self._soft_limit_hit = True
        self._cancelled.set()

    def progress(self, fraction: float | None = None, message: str | None = None) -> None:
        """Record progress (0.0-1.0) and an optional message; stored within ~100 ms."""
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ValueError(f"progress fraction must be between 0 and 1, not {fraction}")
        self._last_progress = time.monotonic()
        self._report(self.id, fraction, message)


_current: contextvars.ContextVar[JobContext] = contextvars.ContextVar("taskmill_current_job")


def current_job() -> JobContext:
    """The job the calling task is running as. Raises ``RuntimeError`` outside a job."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("current_job() was called outside a running taskmill job") from None


def set_current(ctx: JobContext) -> contextvars.Token[JobContext]:
    return _current.set(ctx)


def reset_current(token: contextvars.Token[JobContext]) -> None:
    _current.reset(token)
