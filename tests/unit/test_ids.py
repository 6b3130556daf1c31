"""Job ids: UUIDv7 strings that sort in creation order within a process."""

from __future__ import annotations

import itertools
import re
import threading
import time
import types
import uuid

import pytest

from taskmill import _ids
from taskmill._ids import uuid7

UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_format_version_and_variant() -> None:
    for _ in range(1000):
        value = uuid7()
        assert UUID7.match(value), value
        parsed = uuid.UUID(value)
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == value


def test_the_first_48_bits_are_the_unix_time_in_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    value = uuid7()
    after = time.time_ns() // 1_000_000
    ms = int(value.replace("-", "")[:12], 16)
    assert before <= ms <= after + 1  # +1: a busy millisecond may borrow the next one


def test_strictly_increasing_over_10k_calls() -> None:
    ids = [uuid7() for _ in range(10_000)]
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert len(set(ids)) == len(ids)


def test_increasing_within_one_millisecond_past_the_counter_and_when_the_clock_steps_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [time.time_ns()]
    monkeypatch.setattr(_ids, "time", types.SimpleNamespace(time_ns=lambda: clock[0]))
    ids = [uuid7() for _ in range(5000)]  # more than the 4096 values of the 12-bit counter
    clock[0] -= 10_000_000_000  # the wall clock jumps 10 s back
    ids += [uuid7() for _ in range(100)]
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert all(UUID7.match(i) for i in ids)


def test_unique_across_threads() -> None:
    results: list[list[str]] = [[] for _ in range(4)]

    def make(out: list[str]) -> None:
        out.extend(uuid7() for _ in range(2000))

    threads = [threading.Thread(target=make, args=(out,)) for out in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for out in results for i in out]
    assert len(set(every)) == len(every)
    for out in results:  # each thread still sees its own ids increase
        assert out == sorted(out)
