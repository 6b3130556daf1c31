"""Fixtures every fault test shares."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], None]]]:
    """Calls to make when the test ends, last added first: processes to stop, apps to close."""
    calls: list[Callable[[], None]] = []
    yield calls
    for call in reversed(calls):
        call()
