"""The retry policy and ``decide``: the one function mapping how a run ended to an outcome."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from taskmill.errors import TaskTimeoutError
from taskmill.job import Cancelled, ErrorInfo, Failed, Released, RetryAt, Succeeded
from taskmill.retry import (
    Backoff,
    Cancel,
    Interrupt,
    RemoteError,
    Retry,
    RetryPolicy,
    as_backoff,
    decide,
    exception_types,
)

NOW = 1_000_000.0


class PaymentDeclinedError(Exception):
    pass


def raised(exc: BaseException) -> BaseException:
    """The exception with a traceback, as a task would have raised it."""
    try:
        raise exc
    except BaseException as caught:
        return caught


def policy(
    backoff: Backoff | None = None,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    dont_retry_on: tuple[type[BaseException], ...] = (),
) -> RetryPolicy:
    return RetryPolicy(
        backoff=backoff or Backoff.constant(10), retry_on=retry_on, dont_retry_on=dont_retry_on
    )


# --- Backoff -------------------------------------------------------------------------------------


def test_backoff_grows_by_factor_per_attempt() -> None:
    b = Backoff(base=2, factor=3, cap=10_000, jitter=False)
    assert [b.delay(n) for n in range(1, 7)] == [2, 6, 18, 54, 162, 486]


def test_backoff_first_attempt_waits_base_even_for_attempt_zero() -> None:
    b = Backoff(base=5, factor=2, cap=100, jitter=False)
    assert b.delay(0) == b.delay(1) == 5.0


def test_backoff_is_capped() -> None:
    b = Backoff(base=1, factor=2, cap=10, jitter=False)
    assert [b.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_backoff_cap_holds_for_attempt_counts_whose_power_overflows_a_float() -> None:
    # 2.0 ** 1024 overflows; a task with many retries must still get the cap, not a crash
    assert Backoff(jitter=False).delay(5000) == 3600.0
    assert Backoff(base=0, jitter=False).delay(5000) == 0.0


def test_backoff_jitter_stays_between_half_and_all_of_the_delay() -> None:
    b = Backoff(base=8, factor=2, cap=100, jitter=True)
    raw = 16.0  # attempt 2
    samples = [b.delay(2) for _ in range(2000)]
    assert all(raw / 2 <= s <= raw for s in samples)
    assert min(samples) < raw * 0.55 and max(samples) > raw * 0.95  # the whole range is used
    assert len(set(samples)) > 1000  # random, not a few fixed values


def test_backoff_jitter_applies_after_the_cap() -> None:
    b = Backoff(base=1, factor=10, cap=50, jitter=True)
    assert all(25 <= b.delay(9) <= 50 for _ in range(500))


def test_default_backoff_is_exponential_from_one_second_capped_at_an_hour_with_jitter() -> None:
    b = Backoff()
    assert (b.base, b.factor, b.cap, b.jitter) == (1.0, 2.0, 3600.0, True)


def test_constant_backoff() -> None:
    b = Backoff.constant(7.5)
    assert {b.delay(n) for n in range(1, 30)} == {7.5}
    assert as_backoff(7.5) == b
    assert as_backoff(3) == Backoff.constant(3.0)
    custom = Backoff(base=3)
    assert as_backoff(custom) is custom


@pytest.mark.parametrize(
    "kwargs", [{"base": -1}, {"factor": 0.5}, {"cap": -1}], ids=["base", "factor", "cap"]
)
def test_backoff_rejects_invalid_parameters(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"Backoff needs base >= 0, factor >= 1 and cap >= 0"):
        Backoff(**kwargs)


def test_exception_types_normalises_one_or_many() -> None:
    assert exception_types(None) == ()
    assert exception_types(KeyError) == (KeyError,)
    assert exception_types([KeyError, ValueError]) == (KeyError, ValueError)


# --- decide ------------------------------------------------------------------------------------


def test_a_result_is_success() -> None:
    outcome = decide(attempt=1, max_attempts=3, policy=policy(), now=NOW, result=b"42")
    assert outcome == Succeeded(b"42")


def test_an_error_with_attempts_left_retries_after_the_backoff() -> None:
    exc = raised(ValueError("flaky upstream"))
    outcome = decide(attempt=1, max_attempts=3, policy=policy(), now=NOW, exc=exc)
    assert isinstance(outcome, RetryAt)
    assert outcome.run_at == NOW + 10
    assert outcome.error.type == "ValueError"
    assert outcome.error.message == "flaky upstream"
    assert "raise exc" in outcome.error.traceback
    assert outcome.error.traceback.rstrip().endswith("ValueError: flaky upstream")


def _lookup(table: dict[str, dict[str, int]]) -> int:
    return table["rates"]["missing"] + 0


def _convert(table: dict[str, dict[str, int]]) -> int:
    try:
        return _lookup(table) * 2
    except KeyError as exc:
        return int(str(exc)) + 1


def test_a_stored_traceback_marks_the_line_that_raised_and_no_other() -> None:
    # Python's ^^^^ marks cost a parse of each frame's source line; they are kept where each
    # exception of the chain was raised, the part a reader looks at
    exc = raised_by(lambda: _convert({"rates": {}}))
    info = decide(attempt=1, max_attempts=1, policy=None, exc=exc).error  # type: ignore[union-attr]
    lines = info.traceback.splitlines()
    marked = [
        lines[i - 1].strip()
        for i, line in enumerate(lines)
        if line.strip() and set(line.strip()) <= {"^", "~"}
    ]
    # before: also the two calls that led to them
    assert marked == ['return table["rates"]["missing"] + 0', "return int(str(exc)) + 1"]
    assert "return _lookup(table) * 2" in info.traceback  # the frames are there, unmarked
    assert "During handling of the above exception" in info.traceback
    assert lines[-1].startswith("ValueError: invalid literal for int()")


def raised_by(call: Any) -> BaseException:
    try:
        call()
    except BaseException as caught:
        return caught
    raise AssertionError("did not raise")


def test_the_backoff_is_computed_from_the_attempt_number() -> None:
    p = policy(Backoff(base=1, factor=2, cap=1000, jitter=False))
    delays = [
        decide(attempt=n, max_attempts=10, policy=p, now=NOW, exc=ValueError()).run_at - NOW  # type: ignore[union-attr]
        for n in (1, 2, 3)
    ]
    assert delays == [1, 2, 4]


def test_an_error_on_the_last_attempt_fails() -> None:
    exc = raised(ValueError("still broken"))
    outcome = decide(attempt=3, max_attempts=3, policy=policy(), now=NOW, exc=exc)
    assert isinstance(outcome, Failed)
    assert (outcome.error.type, outcome.error.message) == ("ValueError", "still broken")


def test_errors_of_non_builtin_types_are_named_with_their_module() -> None:
    outcome = decide(
        attempt=3, max_attempts=3, policy=policy(), now=NOW, exc=PaymentDeclinedError("card")
    )
    assert isinstance(outcome, Failed)
    assert outcome.error.type == f"{__name__}.PaymentDeclinedError"
    timeout = decide(attempt=1, max_attempts=1, policy=policy(), now=NOW, exc=TaskTimeoutError())
    assert isinstance(timeout, Failed)
    assert timeout.error.type == "taskmill.errors.TaskTimeoutError"


def test_dont_retry_on_fails_at_once_including_subclasses() -> None:
    p = policy(dont_retry_on=(LookupError,))
    for exc in (LookupError("a"), KeyError("b")):
        outcome = decide(attempt=1, max_attempts=5, policy=p, now=NOW, exc=exc)
        assert isinstance(outcome, Failed), exc
    assert isinstance(decide(attempt=1, max_attempts=5, policy=p, now=NOW, exc=OSError()), RetryAt)


def test_dont_retry_on_wins_over_retry_on() -> None:
    p = policy(retry_on=(Exception,), dont_retry_on=(PaymentDeclinedError,))
    outcome = decide(attempt=1, max_attempts=5, policy=p, now=NOW, exc=PaymentDeclinedError())
    assert isinstance(outcome, Failed)


def test_retry_on_limits_which_errors_are_retried() -> None:
    p = policy(retry_on=(ConnectionError,))
    retried = decide(attempt=1, max_attempts=5, policy=p, now=NOW, exc=ConnectionResetError())
    assert isinstance(retried, RetryAt)
    failed = decide(attempt=1, max_attempts=5, policy=p, now=NOW, exc=ValueError("bad"))
    assert isinstance(failed, Failed)


def test_base_exceptions_are_not_retried_by_default() -> None:
    for exc in (KeyboardInterrupt(), SystemExit(3)):
        outcome = decide(attempt=1, max_attempts=5, policy=policy(), now=NOW, exc=exc)
        assert isinstance(outcome, Failed)
        assert outcome.error.type == type(exc).__name__


def test_retry_with_a_delay_overrides_the_backoff() -> None:
    outcome = decide(attempt=1, max_attempts=3, policy=policy(), now=NOW, exc=Retry(delay=2.5))
    assert isinstance(outcome, RetryAt)
    assert outcome.run_at == NOW + 2.5
    assert outcome.error.type == "taskmill.retry.Retry"
    assert outcome.error.message == "retry requested"


def test_retry_without_a_delay_uses_the_backoff() -> None:
    outcome = decide(attempt=1, max_attempts=3, policy=policy(), now=NOW, exc=Retry())
    assert isinstance(outcome, RetryAt)
    assert outcome.run_at == NOW + 10


def test_retry_is_honoured_even_when_retry_on_does_not_list_it() -> None:
    p = policy(retry_on=(ConnectionError,), dont_retry_on=(Exception,))
    outcome = decide(attempt=1, max_attempts=3, policy=p, now=NOW, exc=Retry(delay=1))
    assert isinstance(outcome, RetryAt)


def test_a_negative_retry_delay_means_now() -> None:
    outcome = decide(attempt=1, max_attempts=3, policy=policy(), now=NOW, exc=Retry(delay=-5))
    assert isinstance(outcome, RetryAt)
    assert outcome.run_at == NOW


def test_retry_on_the_last_attempt_fails() -> None:
    exc = Retry(delay=1, reason="rate limited")
    outcome = decide(attempt=3, max_attempts=3, policy=policy(), now=NOW, exc=exc)
    assert isinstance(outcome, Failed)
    assert outcome.error.message == "rate limited"


def test_cancel_ends_the_job_cancelled_whatever_the_attempts() -> None:
    assert decide(
        attempt=1, max_attempts=3, policy=policy(), now=NOW, exc=Cancel("user left")
    ) == Cancelled("user left")
    assert decide(attempt=3, max_attempts=3, policy=None, now=NOW, exc=Cancel()) == Cancelled(
        "cancelled by the task"
    )


def test_without_a_policy_every_error_fails() -> None:
    outcome = decide(attempt=1, max_attempts=5, policy=None, now=NOW, exc=ValueError("x"))
    assert isinstance(outcome, Failed)


def test_a_remote_error_carries_the_childs_decision_and_error() -> None:
    info = ErrorInfo("mylib.BoomError", "boom", "Traceback (most recent call last): ...")
    retry = decide(
        attempt=1,
        max_attempts=3,
        policy=policy(retry_on=(ConnectionError,)),
        now=NOW,
        exc=RemoteError(info, retryable=True, delay=4),
    )
    assert retry == RetryAt(run_at=NOW + 4, error=info, delay_s=4.0)
    no_delay = decide(
        attempt=1, max_attempts=3, policy=policy(), now=NOW, exc=RemoteError(info, retryable=True)
    )
    assert no_delay == RetryAt(run_at=NOW + 10, error=info, delay_s=10.0)
    failed = decide(
        attempt=1, max_attempts=3, policy=policy(), now=NOW, exc=RemoteError(info, retryable=False)
    )
    assert failed == Failed(info)


# --- decide: interrupted runs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc", [asyncio.CancelledError(), ValueError("gave up"), Retry(delay=1), Cancel("stop")]
)
def test_a_cancel_request_ends_the_run_cancelled_however_it_raised(exc: BaseException) -> None:
    outcome = decide(
        attempt=1, max_attempts=3, policy=policy(), now=NOW, exc=exc, interrupt=Interrupt.CANCEL
    )
    assert outcome == Cancelled("cancelled on request")


def test_a_run_that_returns_after_a_cancel_request_is_cancelled_all_the_same() -> None:
    outcome = decide(
        attempt=1, max_attempts=3, policy=policy(), result=b"1", interrupt=Interrupt.CANCEL
    )
    assert outcome == Cancelled("cancelled on request (the task returned after the request)")


@pytest.mark.parametrize("interrupt", [Interrupt.SHUTDOWN, Interrupt.LOST])
def test_a_run_stopped_by_a_shutdown_or_a_lost_lease_is_handed_back(interrupt: Interrupt) -> None:
    outcome = decide(
        attempt=3,
        max_attempts=3,
        policy=policy(),
        now=NOW,
        exc=asyncio.CancelledError(),
        interrupt=interrupt,
    )
    assert outcome == Released()


@pytest.mark.parametrize("interrupt", [Interrupt.SHUTDOWN, Interrupt.LOST])
def test_a_run_that_ended_on_its_own_during_a_shutdown_keeps_its_outcome(
    interrupt: Interrupt,
) -> None:
    """A sync function in a thread is not stopped: what it did stands."""
    p = policy()
    ok = decide(attempt=1, max_attempts=3, policy=p, result=b"2", interrupt=interrupt)
    assert ok == Succeeded(b"2")
    retried = decide(
        attempt=1, max_attempts=3, policy=p, now=NOW, exc=ValueError("x"), interrupt=interrupt
    )
    assert isinstance(retried, RetryAt) and retried.run_at == NOW + 10
    failed = decide(attempt=3, max_attempts=3, policy=p, exc=ValueError("x"), interrupt=interrupt)
    assert isinstance(failed, Failed)


def test_a_retry_counts_its_delay_from_the_clock_when_no_time_is_given() -> None:
    before = time.time()
    outcome = decide(attempt=1, max_attempts=3, policy=policy(), exc=Retry(delay=30))
    assert isinstance(outcome, RetryAt)
    assert before + 30 <= outcome.run_at <= time.time() + 30
