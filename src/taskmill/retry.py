"""Retry policy and the one function that decides how a run ended."""

from __future__ import annotations

import asyncio
import enum
import os
import random
import sysconfig
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from taskmill.job import Cancelled, ErrorInfo, Failed, Outcome, Released, RetryAt, Succeeded


class Retry(Exception):
    """Raise inside a task to ask for another attempt, optionally after ``delay`` seconds.

    >>> raise Retry(delay=30)  # doctest: +SKIP
    """

    def __init__(self, delay: float | None = None, reason: str = "retry requested") -> None:
        super().__init__(reason)
        self.delay = delay


class RemoteError(Exception):
    """An error raised in a child process, carried back as data (``--pool process``).

    The child applies the task's retry policy itself, since the exception object stays there.
    """

    def __init__(self, info: ErrorInfo, *, retryable: bool, delay: float | None = None) -> None:
        super().__init__(info.message)
        self.info = info
        self.retryable = retryable
        self.delay = delay


class Cancel(Exception):
    """Raise inside a task to end the job as ``cancelled`` rather than failed."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter and a cap.

    The delay before attempt ``n + 1`` is ``min(cap, base * factor ** (n - 1))``, then with
    ``jitter`` a random value between half of that and all of it (so a crowd of failures that
    happened together does not retry together).

    >>> Backoff(base=1, factor=2, cap=60, jitter=False).delay(4)
    8.0
    """

    base: float = 1.0
    factor: float = 2.0
    cap: float = 3600.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.base < 0 or self.factor < 1 or self.cap < 0:
            raise ValueError("Backoff needs base >= 0, factor >= 1 and cap >= 0")

    def delay(self, attempt: int) -> float:
        try:
            raw = min(self.cap, self.base * self.factor ** max(0, attempt - 1))
        except OverflowError:  # factor ** attempt beyond a float: far past the cap
            raw = self.cap if self.base > 0 else 0.0
        if self.jitter:
            return raw / 2 + random.random() * raw / 2
        return float(raw)

    @classmethod
    def constant(cls, seconds: float) -> Backoff:
        return cls(base=seconds, factor=1.0, cap=seconds, jitter=False)


def as_backoff(value: float | Backoff) -> Backoff:
    return value if isinstance(value, Backoff) else Backoff.constant(float(value))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    backoff: Backoff
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    dont_retry_on: tuple[type[BaseException], ...] = ()

    def retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, Retry):
            return True
        if isinstance(exc, RemoteError):
            return exc.retryable
        if self.dont_retry_on and isinstance(exc, self.dont_retry_on):
            return False
        return isinstance(exc, self.retry_on)


def error_info(exc: BaseException) -> ErrorInfo:
    """The stored form of an error. The traceback starts at the user's code: the frames of
    taskmill and of the standard library that led into the task are left out."""
    if isinstance(exc, RemoteError):
        return exc.info
    report = traceback.TracebackException(
        type(exc), exc, _from_user_code(exc.__traceback__), compact=True
    )
    _carets_where_raised(report)
    tb = "".join(report.format())
    return ErrorInfo(type=_qualified_name(type(exc)), message=str(exc), traceback=tb)


def _carets_where_raised(report: traceback.TracebackException) -> None:
    """Keep Python's ``^^^^`` marks under the line that raised, in each exception of the
    chain, and drop them elsewhere: each mark parses its line's source (``ast``), which made
    formatting the traceback most of a failed job's cost on the worker's loop: 157 us for 3
    frames, 4.3 ms for 100 (T20's deep failures); 23 us and 0.39 ms without marks."""
    pending, seen = [report], set()
    while pending:
        each = pending.pop()
        if id(each) in seen:
            continue
        seen.add(id(each))
        for frame in each.stack[:-1]:
            frame.colno = frame.end_colno = None
        pending.extend(e for e in (each.__cause__, each.__context__) if e is not None)
        pending.extend(each.exceptions or ())


_OWN_DIRS = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep,
)


def _from_user_code(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` from its first frame outside taskmill and the standard library; all of it if
    every frame is theirs (an error in taskmill itself)."""
    first = tb
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_OWN_DIRS):
        tb = tb.tb_next
    return tb or first


def _qualified_name(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


class Interrupt(enum.StrEnum):
    """Why a worker interrupted a running job (``decide`` turns it into the outcome)."""

    CANCEL = "cancel"
    """Someone asked to cancel the job: it ends ``Cancelled``, however the run ended."""
    SHUTDOWN = "shutdown"
    """The worker is stopping: a run it stopped is handed back (``Released``)."""
    LOST = "lost"
    """The lease went to another worker: a run it stopped is handed back (and the worker
    drops the outcome: it is no longer the job's to write)."""


def decide(
    *,
    attempt: int,
    max_attempts: int,
    policy: RetryPolicy | None,
    now: float | None = None,
    result: bytes | None = None,
    exc: BaseException | None = None,
    interrupt: Interrupt | None = None,
) -> Outcome:
    """The outcome of one run: the only place that maps what happened to what the job becomes.

    A run ends with a ``result`` (the encoded return value) or an ``exc``. ``policy`` is None
    for an error no retry can fix (the task is unknown to this worker, its arguments or its
    result do not convert): it fails. ``now`` (default: the clock) is when a retry's delay
    counts from. ``interrupt`` is the first reason the worker interrupted the run, if it did:
    a cancel request ends it ``Cancelled`` whether it returned or raised; a shutdown or a lost
    lease that stopped it (``exc`` is the ``CancelledError`` that did) hands it back
    (``Released``, no attempt spent); a run that ended on its own meanwhile keeps its outcome.

    >>> decide(attempt=1, max_attempts=3, policy=None, result=b"42")
    Succeeded(result=b'42')
    >>> decide(attempt=1, max_attempts=3, policy=None, result=b"42", interrupt=Interrupt.CANCEL)
    Cancelled(reason='cancelled on request (the task returned after the request)')
    >>> decide(attempt=1, max_attempts=3, policy=None, exc=asyncio.CancelledError(),
    ...        interrupt=Interrupt.SHUTDOWN)
    Released()
    """
    if interrupt is not None:
        if interrupt is Interrupt.CANCEL:
            if exc is None:
                return Cancelled("cancelled on request (the task returned after the request)")
            return Cancelled("cancelled on request")
        if isinstance(exc, asyncio.CancelledError):
            return Released()
    if exc is None:
        assert result is not None
        return Succeeded(result)
    if isinstance(exc, Cancel):
        return Cancelled(str(exc) or "cancelled by the task")
    info = error_info(exc)
    if policy is None or not policy.retryable(exc) or attempt >= max_attempts:
        return Failed(info)
    delay = exc.delay if isinstance(exc, Retry | RemoteError) else None
    if delay is None:
        delay = policy.backoff.delay(attempt)
    delay = max(0.0, float(delay))
    return RetryAt(run_at=(time.time() if now is None else now) + delay, error=info, delay_s=delay)


def exception_types(
    value: Sequence[type[BaseException]] | type[BaseException] | None,
) -> tuple[type[BaseException], ...]:
    if value is None:
        return ()
    if isinstance(value, type):
        return (value,)
    return tuple(value)
