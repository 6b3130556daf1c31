"""Schedule ticks across daylight-saving changes, against a reference of this file's own (T17's
time arithmetic, without the scheduler loop).

docs/schedules.md states the policy: cron times are local to ``tz`` and follow Debian's cron;
a time inside a spring-forward gap runs once, right after the gap; a time inside a fall-back
hour runs once, at its first occurrence; an hourly schedule runs in each real hour; ``every=``
counts real seconds from the Unix epoch. Debian's cron (and cronsim) tells the two cases apart
by the expression: a job whose minute and hour fields both start with a digit is a *time*
(the first two rules); one whose minute or hour field starts with ``*`` is a *wildcard* job
and matches the local wall clock at each real minute, so it loses the ticks of a skipped hour
and repeats those of a repeated hour. The reference below implements exactly that, with
nothing but ``zoneinfo``, by walking minutes (local wall minutes for a time, real minutes for
a wildcard job), and the test compares the whole tick sequence of a generated range crossing
a DST change: strictly increasing, none missing, none doubled.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from taskmill import App
from taskmill.scheduler import MAX_SLEEP_S, Scheduler
from taskmill.schedules import EPOCH, Schedule

from .support import scaled

# New York and Berlin (one-hour shifts, on different dates), Lord Howe Island (a half-hour
# shift), Adelaide and St. John's (half-hour offsets, one-hour shifts)
ZONES = [
    "America/New_York",
    "Europe/Berlin",
    "Australia/Lord_Howe",
    "Australia/Adelaide",
    "America/St_Johns",
]
MINUTE = timedelta(minutes=1)


@cache
def transitions(zone: str, year: int) -> list[datetime]:
    """The instants (UTC, whole minutes) at which ``zone``'s UTC offset changes in ``year``."""
    tz = ZoneInfo(zone)
    found = []
    moment = datetime(year, 1, 1, tzinfo=UTC)
    end = datetime(year + 1, 1, 1, tzinfo=UTC)
    step = timedelta(hours=6)
    while moment < end:
        after = moment + step
        if moment.astimezone(tz).utcoffset() != after.astimezone(tz).utcoffset():
            lo, hi = moment, after  # the change is in (lo, hi]: bisect to the minute
            while hi - lo > MINUTE:
                mid = lo + (hi - lo) // 2
                mid -= timedelta(seconds=mid.second, microseconds=mid.microsecond)
                if mid.astimezone(tz).utcoffset() == lo.astimezone(tz).utcoffset():
                    lo = mid
                else:
                    hi = mid
            found.append(hi)
        moment = after
    return found


# --- cron expressions, with the sets each field means --------------------------------------


@dataclass(frozen=True)
class Field:
    text: str
    values: frozenset[int]


def _field(top: int) -> st.SearchStrategy[Field]:
    def every(k: int) -> Field:
        return Field(f"*/{k}", frozenset(range(0, top, k)))

    def one(v: int) -> Field:
        return Field(str(v), frozenset([v]))

    def several(vs: list[int]) -> Field:
        return Field(",".join(map(str, sorted(vs))), frozenset(vs))

    def span(ab: tuple[int, int]) -> Field:
        a, b = sorted(ab)
        return Field(f"{a}-{b}", frozenset(range(a, b + 1)))

    value = st.integers(0, top - 1)
    return st.one_of(
        st.just(Field("*", frozenset(range(top)))),
        st.integers(1, top // 2).map(every),
        value.map(one),
        st.lists(value, min_size=2, max_size=4, unique=True).map(several),
        st.tuples(value, value).map(span),
    )


@dataclass(frozen=True)
class Cron:
    minute: Field
    hour: Field
    weekdays: frozenset[int] | None  # cron's numbering: 0 is Sunday; None: any day

    @property
    def text(self) -> str:
        dow = "*" if self.weekdays is None else ",".join(map(str, sorted(self.weekdays)))
        return f"{self.minute.text} {self.hour.text} * * {dow}"

    @property
    def wildcard(self) -> bool:
        return self.minute.text.startswith("*") or self.hour.text.startswith("*")

    def matches(self, wall: datetime) -> bool:
        return (
            wall.minute in self.minute.values
            and wall.hour in self.hour.values
            and (self.weekdays is None or (wall.weekday() + 1) % 7 in self.weekdays)
        )


crons = st.builds(
    Cron,
    _field(60),
    _field(24),
    st.none() | st.frozensets(st.integers(0, 6), min_size=1, max_size=3),
)


def _real(wall: datetime, tz: ZoneInfo) -> bool:
    """Whether naive local ``wall`` exists in ``tz`` (it is not inside a spring-forward gap)."""
    aware = wall.replace(tzinfo=tz)
    return aware.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == wall


def reference_cron(cron: Cron, zone: str, after: datetime, until: datetime) -> list[datetime]:
    """The instants (UTC) in ``(after, until]`` at which Debian's cron runs ``cron``."""
    tz = ZoneInfo(zone)
    ticks: set[datetime] = set()
    if cron.wildcard:  # the wall clock at each real minute
        moment = after.replace(second=0, microsecond=0)
        while moment <= until:
            if moment > after and cron.matches(moment.astimezone(tz)):
                ticks.add(moment)
            moment += MINUTE
    else:  # each local time once: its first occurrence, or the first real minute after a gap
        wall = (after.astimezone(tz) - timedelta(hours=3)).replace(
            tzinfo=None, second=0, microsecond=0
        )
        last = (until.astimezone(tz) + timedelta(hours=3)).replace(tzinfo=None)
        while wall <= last:
            if cron.matches(wall):
                real = wall
                while not _real(real, tz):
                    real += MINUTE
                moment = real.replace(tzinfo=tz, fold=0).astimezone(UTC)
                if after < moment <= until:
                    ticks.add(moment)
            wall += MINUTE
    return sorted(ticks)


def taken(schedule: Schedule, after: datetime, until: datetime) -> list[datetime]:
    ticks: list[datetime] = []
    for tick in schedule.ticks_after(after):
        if tick > until:
            return ticks
        ticks.append(tick)
    raise AssertionError("unreachable")  # ticks_after never ends


# a range of up to two days that contains a DST change of the zone, or, now and then, of
# another zone (so none)
@st.composite
def ranges(draw: st.DrawFn) -> tuple[str, datetime, datetime]:
    zone = draw(st.sampled_from(ZONES))
    year = draw(st.integers(2020, 2032))
    change = draw(st.sampled_from(transitions(draw(st.sampled_from([zone, *ZONES])), year)))
    before = draw(st.integers(0, 36 * 60 * 60 * 1_000_000))
    length = draw(st.integers(1, 48 * 60 * 60 * 1_000_000))
    after = change - timedelta(microseconds=before)
    if draw(st.booleans()):  # on a whole minute: exactly on a tick now and then
        after = after.replace(second=0, microsecond=0)
    return zone, after, after + timedelta(microseconds=length)


def _strictly_increasing(ticks: list[datetime]) -> bool:
    return all(a < b for a, b in itertools.pairwise(ticks))


@settings(max_examples=scaled(0.5))
@given(crons, ranges())
@example(  # 02:30 on Berlin's spring-forward day runs once, at 03:00 (CEST)
    Cron(Field("30", frozenset([30])), Field("2", frozenset([2])), None),
    ("Europe/Berlin", datetime(2026, 3, 28, 12, tzinfo=UTC), datetime(2026, 3, 30, tzinfo=UTC)),
)
@example(  # 01:30 on New York's fall-back day runs once, at its first (EDT) occurrence
    Cron(Field("30", frozenset([30])), Field("1", frozenset([1])), None),
    ("America/New_York", datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 2, tzinfo=UTC)),
)
@example(  # an hourly job runs in each real hour: twice in New York's repeated 01:00 hour
    Cron(Field("0", frozenset([0])), Field("*", frozenset(range(24))), None),
    ("America/New_York", datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 2, tzinfo=UTC)),
)
@example(  # Lord Howe skips 02:00-02:30 in October: 02:15 runs at 02:30
    Cron(Field("15", frozenset([15])), Field("2", frozenset([2])), None),
    (
        "Australia/Lord_Howe",
        datetime(2026, 10, 3, 0, tzinfo=UTC),
        datetime(2026, 10, 5, 0, tzinfo=UTC),
    ),
)
@example(  # a wildcard job (minute starts with "*"): no tick on Berlin's spring-forward day
    Cron(Field("*/30", frozenset([0, 30])), Field("2", frozenset([2])), None),
    ("Europe/Berlin", datetime(2026, 3, 28, 12, tzinfo=UTC), datetime(2026, 3, 29, 9, tzinfo=UTC)),
)
@example(  # ... and four in its repeated 02:00 hour on fall-back day (0,30 2 gives two)
    Cron(Field("*/30", frozenset([0, 30])), Field("2", frozenset([2])), None),
    (
        "Europe/Berlin",
        datetime(2026, 10, 24, 12, tzinfo=UTC),
        datetime(2026, 10, 25, 12, tzinfo=UTC),
    ),
)
@example(  # "0 */2" runs 02:00 twice on fall-back day, "0 0-23/2" (the same hours) once
    Cron(Field("0", frozenset([0])), Field("*/2", frozenset(range(0, 24, 2))), None),
    (
        "Europe/Berlin",
        datetime(2026, 10, 24, 23, tzinfo=UTC),
        datetime(2026, 10, 25, 3, tzinfo=UTC),
    ),
)
@example(  # from inside New York's second 01:00 hour, 01:01 EDT (an hour ago) was returned
    Cron(Field("1", frozenset([1])), Field("0-1", frozenset([0, 1])), None),
    ("America/New_York", datetime(2020, 11, 1, 6, tzinfo=UTC), datetime(2020, 11, 2, tzinfo=UTC)),
)
def test_cron_ticks_match_the_reference(cron: Cron, window: tuple[str, datetime, datetime]) -> None:
    zone, after, until = window
    schedule = Schedule("s", "t", cron=cron.text, tz=zone)
    got = taken(schedule, after, until)
    assert _strictly_increasing(got), got
    expected = reference_cron(cron, zone, after, until)
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    assert got == expected, f"{cron.text} in {zone}: missing {missing[:5]}, extra {extra[:5]}"


# --- every= -----------------------------------------------------------------------------------

_US = 1_000_000
steps = st.one_of(
    st.integers(1, 10_000).map(lambda ms: ms * 1_000),  # 1 ms to 10 s
    st.sampled_from([60, 90, 3600, 6 * 3600, 86_400, 7 * 86_400]).map(lambda s: s * _US),
    st.integers(1_000, 86_400 * _US),
)


@settings(max_examples=scaled(0.5))
@given(steps, ranges(), st.integers(0, 50), st.booleans())
@example(  # float seconds made this tick equal to ``after``, not strictly after it
    262_141,
    ("America/New_York", datetime(2020, 3, 8, 7, tzinfo=UTC), datetime(2020, 3, 8, 8, tzinfo=UTC)),
    0,
    True,
)
def test_every_ticks_count_real_time(
    step_us: int, window: tuple[str, datetime, datetime], count: int, on_tick: bool
) -> None:
    """``every=`` ticks are epoch + n * step, strictly after ``after``, whatever the zone
    (they ignore DST), and ``after`` exactly on a tick does not return that tick."""
    zone, after, _ = window
    step = timedelta(microseconds=step_us)
    if on_tick:  # exactly on a tick: the next one comes first
        after = EPOCH + (after - EPOCH) // step * step
    schedule = Schedule("s", "t", every=step, tz=zone)
    got = schedule.next_ticks(after, count + 1)
    since = (after - EPOCH) // timedelta(microseconds=1)
    first = since // step_us + 1
    expected = [EPOCH + timedelta(microseconds=(first + i) * step_us) for i in range(count + 1)]
    assert got == expected, f"every {step} after {after}: {got[:3]} != {expected[:3]}"


# --- scheduler passes: the marks, late and missed ticks -------------------------------------

GRACE = timedelta(seconds=30)


def expected_passes(
    reference: list[datetime], passes: list[datetime], misfire: str, max_misfires: int
) -> list[datetime]:
    """What passes at ``passes`` enqueue after the first, per docs/schedules.md: a tick is
    looked at by the first pass at or after it; on time if at most ``GRACE`` late, else missed
    (``skip``: dropped; ``once``: the latest missed runs if that pass has no on-time tick;
    ``all``: the latest ``max_misfires`` missed run)."""
    out: list[datetime] = []
    i = 0
    for previous, now in itertools.pairwise(passes):
        seen = []
        while i < len(reference) and reference[i] <= now:
            if reference[i] > previous:
                seen.append(reference[i])
            i += 1
        on_time = [t for t in seen if now - t <= GRACE]
        missed = [t for t in seen if now - t > GRACE]
        if misfire == "skip":
            out += on_time
        elif misfire == "once":
            out += on_time or missed[-1:]
        else:
            out += missed[-max_misfires:] + on_time
    return out


@st.composite
def crossing(draw: st.DrawFn) -> tuple[str, datetime, datetime]:
    """One to twelve hours of a zone, starting up to six hours before a DST change of it."""
    zone = draw(st.sampled_from(ZONES))
    change = draw(st.sampled_from(transitions(zone, draw(st.integers(2020, 2032)))))
    after = change - timedelta(seconds=draw(st.integers(0, 6 * 3600)))
    return zone, after, after + timedelta(seconds=draw(st.integers(3600, 12 * 3600)))


@st.composite
def pass_times(draw: st.DrawFn, window: tuple[str, datetime, datetime]) -> list[datetime]:
    """Scheduler passes from the window's start: mostly up to ``GRACE`` apart (a busy
    scheduler), with now and then every scheduler down for up to three hours."""
    _, after, until = window
    rng = random.Random(draw(st.integers(0, 2**32)))  # one draw: the passes are many
    downtime = draw(st.floats(0.0, 1.0))
    moment, passes = after, [after]
    while moment < until:
        if rng.random() < downtime / 200:
            gap = timedelta(seconds=rng.uniform(31, 3 * 3600))
        else:
            gap = timedelta(microseconds=rng.randint(1, 30_000_000))
        moment += gap
        passes.append(moment)
    return passes


@settings(max_examples=scaled(0.1))
@given(
    st.one_of(crons.map(lambda c: c.text), st.sampled_from([1, 7, 60, 900, 3600])),
    crossing(),
    st.sampled_from(["skip", "once", "all"]),
    st.sampled_from([1, 3, 100]),
    st.data(),
)
def test_scheduler_passes_enqueue_each_tick_once(
    when: str | int,
    window: tuple[str, datetime, datetime],
    misfire: Any,
    max_misfires: int,
    data: st.DataObject,
) -> None:
    """Passes of the scheduler over a range crossing a DST change, the mark kept as the
    broker keeps it (a float timestamp): each tick enqueued at most once, in order, exactly
    the ones the documented late/missed policy runs."""
    zone, after, until = window
    if isinstance(when, str):
        schedule = Schedule(
            "s", "t", cron=when, tz=zone, misfire=misfire, max_misfires=max_misfires
        )
    else:
        schedule = Schedule(
            "s", "t", every=timedelta(seconds=when), misfire=misfire, max_misfires=max_misfires
        )
    passes = data.draw(pass_times((zone, after, until)))
    mark: float | None = None
    enqueued: list[datetime] = []
    for now in passes:
        last = datetime.fromtimestamp(mark, UTC) if mark is not None else None
        due = schedule.due(last, now)
        if last is None:  # a new schedule: its latest on-time tick, or nothing
            assert len(due) <= 1 and all(now - t <= GRACE for t in due), due
        if due:
            mark = due[-1].timestamp()
        enqueued += due
    assert all(a < b for a, b in itertools.pairwise(enqueued)), "a tick twice, or out of order"
    first = next(i for i, t in enumerate(passes) if mark is None or t >= enqueued[0])
    event("ticks enqueued" if enqueued else "no tick in the range")
    if mark is None:
        return  # nothing ever ran (no tick on time at the first passes): nothing to compare
    start = passes[first]
    reference = taken(schedule, enqueued[0], passes[-1])
    expected = [enqueued[0], *expected_passes(reference, passes[first:], misfire, max_misfires)]
    assert enqueued == expected, (
        f"missing {sorted(set(expected) - set(enqueued))[:3]}, "
        f"extra {sorted(set(enqueued) - set(expected))[:3]} (first pass {start})"
    )


def test_scheduler_sleeps_in_the_second_pass_of_a_repeated_hour() -> None:
    """At 01:10 EST, the second 01:10 of New York's fall-back night, ``30 1 * * *`` ran at
    01:30 EDT an hour ago: the next tick is tomorrow. cronsim gave the past 01:30 EDT, so the
    scheduler's sleep was 0 and it ran pass after pass until 01:30 EST."""
    app = App("memory://")

    @app.periodic(cron="30 1 * * *", tz="America/New_York")
    @app.task(name="props.nightly")
    def nightly() -> None: ...

    now = datetime(2026, 11, 1, 6, 10, tzinfo=UTC)  # 01:10 EST

    async def clock() -> float:
        return now.timestamp()

    try:
        sleep = app.run_sync(Scheduler(app, clock=clock).seconds_to_next_tick())
    finally:
        app.close()
    assert sleep == MAX_SLEEP_S
