"""Schedules: cron and interval ticks, time zones and DST, misfire policies, validation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from taskmill.errors import ConfigurationError
from taskmill.schedules import Schedule

pytestmark = pytest.mark.timeout(30)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def paris(expr: str) -> Schedule:
    return Schedule("s", "t", cron=expr, tz="Europe/Paris")


def test_cron_ticks_are_local_times_as_utc_instants() -> None:
    ticks = paris("0 2 * * *").next_ticks(utc(2026, 1, 10, 12), 2)
    assert ticks == [utc(2026, 1, 11, 1), utc(2026, 1, 12, 1)]  # 02:00 CET = 01:00 UTC


def test_spring_forward_a_time_in_the_gap_runs_once_right_after_it() -> None:
    # 2026-03-29: Paris goes from 02:00 CET to 03:00 CEST; 02:30 does not exist that day
    ticks = paris("30 2 * * *").next_ticks(utc(2026, 3, 28, 12), 3)
    assert ticks == [utc(2026, 3, 29, 1), utc(2026, 3, 30, 0, 30), utc(2026, 3, 31, 0, 30)]


def test_fall_back_a_time_in_the_repeated_hour_runs_once() -> None:
    # 2026-10-25: 03:00 CEST becomes 02:00 CET; 02:30 happens twice locally
    ticks = paris("30 2 * * *").next_ticks(utc(2026, 10, 24, 12), 2)
    assert ticks == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]


def test_an_hourly_schedule_runs_in_each_real_hour_across_fall_back() -> None:
    ticks = paris("0 * * * *").next_ticks(utc(2026, 10, 24, 23, 30), 4)
    assert ticks == [utc(2026, 10, 25, h) for h in (0, 1, 2, 3)]  # local 02:00 twice


def test_every_counts_from_the_unix_epoch_whoever_asks() -> None:
    s = Schedule("s", "t", every=timedelta(hours=6))
    assert s.next_ticks(utc(2026, 5, 1, 7, 15), 3) == [
        utc(2026, 5, 1, 12), utc(2026, 5, 1, 18), utc(2026, 5, 2, 0),
    ]  # fmt: skip
    assert s.next_ticks(utc(2026, 5, 1, 12), 1) == [utc(2026, 5, 1, 18)]  # strictly after


def test_due_on_time_ticks_only_once_each() -> None:
    s = Schedule("s", "t", every=timedelta(seconds=1), grace=timedelta(seconds=5))
    assert s.due(None, utc(2026, 1, 1, 0, 0, 0, 500_000)) == [utc(2026, 1, 1)]  # no burst
    last = utc(2026, 1, 1, 0, 0, 10)
    assert s.due(last, last) == []
    assert s.due(last, last + timedelta(seconds=2.5)) == [
        last + timedelta(seconds=1), last + timedelta(seconds=2),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("misfire", "expected_hours"),
    [("skip", []), ("once", [12]), ("all", [6, 12])],
)
def test_misfire_policies(misfire: str, expected_hours: list[int]) -> None:
    s = Schedule("s", "t", every=timedelta(hours=6), misfire=misfire)  # type: ignore[arg-type]
    last = utc(2026, 5, 1, 0)  # then no scheduler ran until 15:00
    assert s.due(last, utc(2026, 5, 1, 15)) == [utc(2026, 5, 1, h) for h in expected_hours]


def test_a_missed_tick_and_an_on_time_one() -> None:
    s = Schedule("s", "t", cron="*/10 * * * *", misfire="once", grace=timedelta(minutes=1))
    due = s.due(utc(2026, 5, 1, 9, 0), utc(2026, 5, 1, 9, 30, 30))
    assert due == [utc(2026, 5, 1, 9, 30)]  # on time; the missed 9:10 and 9:20 fold into it
    s_all = Schedule("s", "t", cron="*/10 * * * *", misfire="all", grace=timedelta(minutes=1))
    assert s_all.due(utc(2026, 5, 1, 9, 0), utc(2026, 5, 1, 9, 30, 30)) == [
        utc(2026, 5, 1, 9, 10), utc(2026, 5, 1, 9, 20), utc(2026, 5, 1, 9, 30),
    ]  # fmt: skip


def test_misfire_all_is_bounded_to_the_latest_ticks() -> None:
    s = Schedule("s", "t", every=timedelta(minutes=1), misfire="all", max_misfires=3)
    now = utc(2026, 5, 1, 12, 0, 10)
    due = s.due(utc(2026, 4, 1), now)  # a month down; 12:00 itself is on time
    assert due == [utc(2026, 5, 1, 11, 57), utc(2026, 5, 1, 11, 58), utc(2026, 5, 1, 11, 59),
                   utc(2026, 5, 1, 12, 0)]  # fmt: skip


def test_keys_name_the_tick_in_utc_whatever_the_zone() -> None:
    a = paris("0 2 * * *")
    tick = a.next_ticks(utc(2026, 1, 10), 1)[0]
    assert a.key(tick) == "schedule:s:2026-01-10T01:00:00+00:00"
    assert a.key(tick.astimezone(a.zone)) == a.key(tick)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of cron= and every="),
        ({"cron": "* * * * *", "every": timedelta(1)}, "exactly one of cron= and every="),
        ({"cron": "61 * * * *"}, "bad cron expression '61 * * * *'"),
        ({"cron": "* * * * *", "tz": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"every": timedelta(0)}, "every= must be at least 1 ms"),
        ({"every": timedelta(1), "misfire": "sometimes"}, "misfire must be"),
        ({"every": timedelta(1), "overlap": "queue"}, "overlap must be"),
    ],
)
def test_bad_schedules_are_refused_clearly(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match="schedule 'nightly'") as info:
        Schedule("nightly", "t", **kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="no time zone"):
        paris("* * * * *").next_ticks(datetime(2026, 1, 1), 1)
