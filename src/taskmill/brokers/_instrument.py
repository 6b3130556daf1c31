"""Timings and failures of broker calls, logged once at the seam, for every broker.

``Broker.__init_subclass__`` wraps each method of the contract, and of the feature stores, that
a broker class defines, so no broker logs its own calls and a new one is covered without a
line of its own. Each call logs to the ``taskmill.broker`` logger:

- at DEBUG, every call and how long it took (no record is made unless DEBUG is on for that
  logger: the wrapper then costs two clock reads and a level check);
- at WARNING, a call slower than ``SLOW_CALL_S`` (``wait`` excepted: it waits for work);
- at DEBUG, a call that raised, with the error: the caller gets the exception and reports it
  its own way (a worker's error line, the command line's one line), so a failure is not said
  twice at the levels people run at.

Logging never changes a call's outcome: a record that cannot be made is dropped.

A record's fields: ``broker`` (``sqlite``, ``redis``, ...), ``method``, ``duration_s``; where a
call is about one job, ``job_id`` and what the call knows of ``task``, ``queue`` and
``attempt``; ``jobs`` (how many a batch carried) and ``claimed`` (how many came back);
``error`` on failure.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from taskmill.job import Claim, Finish, Job, NewJob, Progress

log = logging.getLogger("taskmill.broker")

SLOW_CALL_S = 1.0
"""A broker call slower than this logs a warning."""

_UNTIMED = frozenset({"wait"})
"""Calls that last long by design: never reported as slow."""
_BATCHES = ("jobs", "finishes", "items", "claims", "job_ids")
"""Parameters that carry a batch of jobs (``jobs`` in a record: how many)."""
_ONE_JOB = ("job_id", "holder")
"""Parameters that name one job by id."""
_CLAIMS = frozenset({"claim", "finish_and_claim", "wait"})
"""Calls whose result is the jobs they claimed (``claimed`` in a record: how many)."""


def instrument(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (named ``name`` in the contract), timed and logged as the module says."""
    observer = _Observer(name, inspect.signature(method))
    wrap = _timed_async if inspect.iscoroutinefunction(method) else _timed_sync
    wrapper = wrap(method, observer)
    wrapper.__taskmill_instrumented__ = True  # type: ignore[attr-defined]
    return wrapper


class _Observer:
    """What one contract method's calls log: how long they took and what they were about."""

    def __init__(self, name: str, signature: inspect.Signature) -> None:
        self.name = name
        self.may_be_slow = name not in _UNTIMED
        self.signature = signature

    def returned(
        self,
        broker: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        result: Any,
        elapsed: float,
    ) -> None:
        if self.may_be_slow and elapsed >= SLOW_CALL_S:
            level, how = logging.WARNING, f"took {elapsed:.3f} s (slow)"
        elif log.isEnabledFor(logging.DEBUG):
            level, how = logging.DEBUG, f"took {elapsed * 1000:.3f} ms"
        else:
            return
        fields = _fields(broker, self.name, self.signature, args, kwargs, result, elapsed)
        log.log(level, "%s.%s %s", fields["broker"], self.name, how, extra=fields)

    def raised(
        self,
        broker: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        exc: Exception,
        elapsed: float,
    ) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        fields = _fields(broker, self.name, self.signature, args, kwargs, None, elapsed)
        fields["error"] = f"{type(exc).__name__}: {exc}"
        log.debug(
            "%s.%s failed after %.3f s: %s",
            fields["broker"],
            self.name,
            elapsed,
            fields["error"],
            extra=fields,
        )


def _timed_async(method: Callable[..., Any], observer: _Observer) -> Callable[..., Any]:
    clock = time.perf_counter

    @functools.wraps(method)
    async def timed(self: Any, /, *args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            result = await method(self, *args, **kwargs)
        except Exception as exc:
            _never_raising(observer.raised, self, args, kwargs, exc, clock() - start)
            raise
        elapsed = clock() - start
        if elapsed >= SLOW_CALL_S or log.isEnabledFor(logging.DEBUG):
            _never_raising(observer.returned, self, args, kwargs, result, elapsed)
        return result

    return timed


def _timed_sync(method: Callable[..., Any], observer: _Observer) -> Callable[..., Any]:
    clock = time.perf_counter

    @functools.wraps(method)
    def timed(self: Any, /, *args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            result = method(self, *args, **kwargs)
        except Exception as exc:
            _never_raising(observer.raised, self, args, kwargs, exc, clock() - start)
            raise
        elapsed = clock() - start
        if elapsed >= SLOW_CALL_S or log.isEnabledFor(logging.DEBUG):
            _never_raising(observer.returned, self, args, kwargs, result, elapsed)
        return result

    return timed


def _never_raising(log_call: Callable[..., None], *args: Any) -> None:
    try:
        log_call(*args)
    except Exception:  # a bug in making the record: the call's own outcome must stand
        log.debug("could not log a broker call", exc_info=True)


def is_instrumented(method: object) -> bool:
    return getattr(method, "__taskmill_instrumented__", False) is True


_NOT_CALLS = frozenset({"configure", "events_subscription"})
"""Public methods that do not call the storage: not instrumented."""


def contract_methods(classes: Iterable[type]) -> frozenset[str]:
    """The names of the public methods of ``classes`` (the job store and the feature
    protocols) that call the storage."""
    names = {
        name
        for cls in classes
        for name, value in vars(cls).items()
        if not name.startswith("_") and inspect.isfunction(value)
    }
    return frozenset(names - _NOT_CALLS)


def _fields(
    broker: Any,
    name: str,
    signature: inspect.Signature,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    result: Any,
    elapsed: float,
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "broker": broker.name or type(broker).__name__,
        "method": name,
        "duration_s": elapsed,
    }
    try:
        given = signature.bind(broker, *args, **kwargs).arguments
    except TypeError:  # the call itself was wrong: what it was about is unknown
        given = {}
    fields.update(_arguments_about(given))
    if isinstance(result, Job):
        fields.update(_about(result))
    elif name in _CLAIMS and result is not None:  # None: the call failed
        claimed = result[1] if name == "finish_and_claim" else result
        if isinstance(claimed, list):
            fields["claimed"] = len(claimed)
            if len(claimed) == 1 and "job_id" not in fields:
                fields.update(_about(claimed[0]))
    return fields


def _arguments_about(given: dict[str, Any]) -> dict[str, Any]:
    """What a call's arguments say of its job or its batch of jobs."""
    fields: dict[str, Any] = {}
    for key in _ONE_JOB:
        if isinstance(given.get(key), str):
            fields["job_id"] = given[key]
    for key in _BATCHES:
        batch = given.get(key)
        if isinstance(batch, Sequence) and not isinstance(batch, str | bytes):
            fields["jobs"] = len(batch)
            if len(batch) == 1:
                fields.update(_about(batch[0]))
            break
    return fields


def _about(item: object) -> dict[str, Any]:
    """What a call's argument or result says of its job."""
    if isinstance(item, Job):
        return {"job_id": item.id, "task": item.task, "queue": item.queue, "attempt": item.attempt}
    if isinstance(item, NewJob):
        return {"job_id": item.id, "task": item.task, "queue": item.queue}
    if isinstance(item, Finish | Progress):
        return {"job_id": item.claim.job_id}
    if isinstance(item, Claim):
        return {"job_id": item.job_id}
    if isinstance(item, str):
        return {"job_id": item}
    return {}
