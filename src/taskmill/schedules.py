"""When periodic jobs are due: cron expressions (by cronsim) or fixed intervals, in a time zone.

A ``Schedule`` only does time arithmetic; the scheduler loop that enqueues its ticks is elsewhere.
Every tick is an instant in UTC, so schedulers in different processes (and time zones) agree on
it, and the tick time names the job that runs it (its unique key), which is what makes a tick run
once however many schedulers see it.

Daylight saving time follows Debian's cron (cronsim matches it): on a spring-forward day a time
inside the skipped hour runs once, at the first minute after the gap (``30 2 * * *`` in
Europe/Paris runs at 03:00 on the last Sunday of March); on a fall-back day a time inside the
repeated hour runs once, at its first occurrence; an hourly schedule runs in each real hour.
``every=`` intervals are counted in real seconds from the Unix epoch, so they ignore DST: every
6 hours is 00:00, 06:00, 12:00 and 18:00 UTC.

    >>> from datetime import datetime, timedelta, timezone
    >>> s = Schedule("nightly", "reports.build", cron="0 2 * * *", tz="Europe/Paris")
    >>> [t.isoformat() for t in s.next_ticks(datetime(2026, 3, 28, 12, tzinfo=timezone.utc), 2)]
    ['2026-03-29T01:00:00+00:00', '2026-03-30T00:00:00+00:00']
    >>> every = Schedule("sync", "accounts.sync", every=timedelta(hours=6))
    >>> every.next_ticks(datetime(2026, 1, 1, 7, tzinfo=timezone.utc), 1)[0].hour
    12
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from taskmill.errors import ConfigurationError

Misfire = Literal["skip", "once", "all"]
"""What to do with ticks that came due while no scheduler ran: ``skip`` them (the default),
run ``once`` for the latest of them, or run ``all`` of them (at most ``max_misfires``, the
latest ones)."""
Overlap = Literal["allow", "skip"]
"""A tick that comes due while the previous run is still pending or running: ``allow`` it to
run as well, or ``skip`` it."""

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class Schedule:
    """A periodic job: ``task`` with fixed ``args``/``kwargs``, on a ``cron`` expression (five
    fields, minute resolution, evaluated in ``tz``) or ``every`` fixed interval.

    ``grace`` is how late a scheduler may see a tick and still count it on time (not a misfire):
    a scheduler that was busy or restarting for less than that loses no tick whatever ``misfire``
    says.
    """

    name: str
    task: str
    cron: str | None = None
    every: timedelta | None = None
    tz: str = "UTC"
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    misfire: Misfire = "skip"
    max_misfires: int = 100
    overlap: Overlap = "allow"
    grace: timedelta = timedelta(seconds=30)
    meta: Mapping[str, Any] = field(default_factory=dict)
    """Stored on every tick's job (``Job.meta``)."""
    zone: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every is None):
            raise ConfigurationError(
                f"schedule {self.name!r}: give exactly one of cron= and every="
            )
        try:
            zone = ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigurationError(
                f"schedule {self.name!r}: unknown time zone {self.tz!r} (an IANA name such as "
                "'Europe/Paris' or 'UTC')"
            ) from None
        object.__setattr__(self, "zone", zone)
        if self.cron is not None:
            try:
                CronSim(self.cron, datetime.now(zone))
            except CronSimError as exc:
                raise ConfigurationError(
                    f"schedule {self.name!r}: bad cron expression {self.cron!r}: {exc}"
                ) from None
        if self.every is not None and self.every.total_seconds() < 0.001:
            raise ConfigurationError(f"schedule {self.name!r}: every= must be at least 1 ms")
        if self.misfire not in ("skip", "once", "all"):
            raise ConfigurationError(
                f"schedule {self.name!r}: misfire must be 'skip', 'once' or 'all', "
                f"not {self.misfire!r}"
            )
        if self.overlap not in ("allow", "skip"):
            raise ConfigurationError(
                f"schedule {self.name!r}: overlap must be 'allow' or 'skip', not {self.overlap!r}"
            )
        if self.max_misfires < 1:
            raise ConfigurationError(f"schedule {self.name!r}: max_misfires must be >= 1")

    def ticks_after(self, after: datetime) -> Iterator[datetime]:
        """Tick instants (UTC) strictly after ``after`` (an aware datetime), in order."""
        after = _aware(after)
        if self.every is not None:
            # in whole microseconds (timedelta's unit), exactly: float seconds could round a
            # tick to just before ``after`` or just after the next one
            step = self.every // _MICROSECOND
            n = (after - EPOCH) // _MICROSECOND // step + 1
            while True:
                yield EPOCH + n * step * _MICROSECOND
                n += 1
        assert self.cron is not None
        for local in CronSim(self.cron, after.astimezone(self.zone)):
            tick = local.astimezone(UTC)
            # cronsim walks a fixed-time job's wall clock: from inside the second pass of a
            # repeated hour it gives the first, an instant before ``after``: not a tick after it
            if tick > after:
                yield tick

    def next_ticks(self, after: datetime, n: int = 3) -> list[datetime]:
        ticks = self.ticks_after(after)
        return [next(ticks) for _ in range(n)]

    def due(self, last: datetime | None, now: datetime) -> list[datetime]:
        """The ticks to enqueue at ``now``, given ``last``, the latest tick already enqueued.
        On-time ticks (at most ``grace`` old) always; missed ones as ``misfire`` says.
        ``last=None`` (a schedule never run): nothing was missed, and of the on-time ticks only
        the latest runs (a new every-second schedule does not start with a burst)."""
        now = _aware(now)
        if last is None:
            return [t for t in self.due(now - self.grace, now) if now - t <= self.grace][-1:]
        since = _aware(last)
        if self.every is not None:  # nothing older than what the policy could still run
            since = max(since, now - self.grace - self.every * (self.max_misfires + 1))
        ticks: list[datetime] = []
        for tick in self.ticks_after(since):
            if tick > now:
                break
            ticks.append(tick)
            if len(ticks) > 2 * self.max_misfires + 1_000:  # a minutely cron down for months
                ticks = ticks[-(self.max_misfires + 1_000) :]
        on_time = [t for t in ticks if now - t <= self.grace]
        missed = [t for t in ticks if now - t > self.grace]
        if not missed or self.misfire == "skip":
            return on_time
        if self.misfire == "once":
            return on_time or missed[-1:]
        return missed[-self.max_misfires :] + on_time

    def key(self, tick: datetime) -> str:
        """The unique key of the job that runs ``tick``: one job per (schedule, tick)."""
        return f"schedule:{self.name}:{_aware(tick).astimezone(UTC).isoformat()}"


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"{moment!r} has no time zone: pass an aware datetime")
    return moment
