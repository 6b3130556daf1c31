"""``taskmill.testing.wait_until`` and ``await_until``: the one poll-until-deadline helper of
taskmill's tests, shipped to users. What it returns, and what it says when it gives up."""

from __future__ import annotations

import itertools
import time

import pytest

from taskmill.testing import await_until, wait_until


def test_returns_the_first_truthy_value() -> None:
    values = iter([None, False, 0, [], {"job": 1}])
    assert wait_until(lambda: next(values), interval=0) == {"job": 1}


def test_a_timeout_names_what_it_waited_for_and_the_last_value() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        wait_until(lambda: [], timeout=0.1, what="jobs")
    assert time.monotonic() - started >= 0.1
    assert str(info.value) == "timed out after 0.1 s waiting for jobs (last: [])"


def test_a_callable_what_describes_the_state_at_the_failure() -> None:
    state = {"seen": 0}

    def check() -> bool:
        state["seen"] += 1
        return False

    with pytest.raises(TimeoutError, match=r"waiting for the job \(\d+ looks\) \(last: False\)$"):
        wait_until(check, timeout=0.05, what=lambda: f"the job ({state['seen']} looks)")
    assert state["seen"] > 1


class Page:
    """A falsy value with a long repr, as a page of jobs that are not there yet might be."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "Page(" + "x" * 2000 + ")"


def test_a_long_last_value_is_cut() -> None:
    with pytest.raises(TimeoutError) as info:
        wait_until(Page, timeout=0, what="a page")
    message = str(info.value)
    assert message.startswith("timed out after 0 s waiting for a page (last: Page(xxx")
    assert message.endswith("x... (2006 characters))")
    assert len(message) < 600


def test_an_error_in_the_check_ends_the_wait_at_once() -> None:
    def check() -> bool:
        raise AssertionError("the worker exited early")

    started = time.monotonic()
    with pytest.raises(AssertionError, match="the worker exited early"):
        wait_until(check, timeout=30)
    assert time.monotonic() - started < 5


async def test_await_until_takes_coroutine_functions_and_plain_ones() -> None:
    calls = itertools.count()

    async def check() -> int | None:
        n = next(calls)
        return n if n >= 3 else None

    assert await await_until(check, interval=0) == 3
    plain = itertools.count()
    assert await await_until(lambda: next(plain) >= 2, interval=0) is True
    with pytest.raises(TimeoutError, match=r"waiting for never \(last: 0\)$"):
        await await_until(lambda: 0, timeout=0.05, what="never")
