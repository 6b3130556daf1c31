"""A PostgreSQL worker vacuums the jobs table when its claims walk dead index entries.

A claim reads the ready index (the queued jobs, in claim order) from its head. A job that
leaves the queue leaves a dead entry there until a vacuum removes it, and every claim steps
over the dead entries page by page. After a million queued jobs left the queue in one
statement (a bulk change, a purge), each claim read some 6,000 pages of the index, and a
20,000-job drain fell from 2,815 to 713 jobs/s on the test machine (``bench.compare_postgres``,
the churn case). Autovacuum repairs it, but only at its next round on the database
(``autovacuum_naptime``: up to a minute by default).

So a claim, at most every ``probe_every_s``, also reads how many pages of the ready index its
session's scans read (the session's statistics not yet reported to the server: one more
statement in the claim's round trip, about 25 us). From ``walk_pages`` pages a scan, the
worker vacuums the table itself, if its role owns the table: on a connection of its own, at
the pace autovacuum has there (migration 5), not while another vacuum of the table runs
(``SKIP_LOCKED``), one at a time per broker, then a pause, doubled after each vacuum that did
not shorten the walk (a long transaction elsewhere keeps vacuum from removing anything; see
docs/brokers.md).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import psycopg

from taskmill.urls import scrub

log = logging.getLogger("taskmill.brokers.postgres")


@dataclass
class VacuumPacer:
    """When to vacuum: after a claim whose scans read ``walk_pages`` or more pages each, one
    vacuum at a time, then ``pause_s`` before the next, doubled (up to ``max_pause_s``) each
    time the first claim that started after a vacuum still walked that far.

    >>> pacer = VacuumPacer(walk_pages=1000, pause_s=30.0)
    >>> pacer.probe_due(now=0.0), pacer.probe_due(now=0.1)  # at most every probe_every_s
    (True, False)
    >>> pacer.after_claim(pages=12_000, scans=2, started=0.0, now=0.1)  # 6,000 a scan
    True
    >>> pacer.after_claim(pages=12_000, scans=2, started=0.2, now=0.3)  # one is running
    False
    >>> pacer.ended(now=3.0)
    >>> pacer.after_claim(pages=8, scans=2, started=3.1, now=3.2)  # it helped
    False
    """

    walk_pages: int = 1000
    pause_s: float = 30.0
    max_pause_s: float = 900.0
    probe_every_s: float = 0.5
    running: bool = False
    disabled: bool = False  # the role may not vacuum the table: never again
    _pause: float = field(init=False)
    _probe_at: float = field(init=False, default=-math.inf)
    _next_at: float = field(init=False, default=-math.inf)
    _ended_at: float | None = field(init=False, default=None)  # until a claim judged it

    def __post_init__(self) -> None:
        self._pause = self.pause_s

    def probe_due(self, now: float) -> bool:
        """Should the claim starting now read its walk? Not while a vacuum runs or if the
        role may not vacuum, and at most every ``probe_every_s``."""
        if self.running or self.disabled or now < self._probe_at:
            return False
        self._probe_at = now + self.probe_every_s
        return True

    def after_claim(self, pages: int, scans: int, started: float, now: float) -> bool:
        """A claim that started at ``started`` (monotonic) has read ``pages`` pages of the
        ready index in ``scans`` scans; True if a vacuum should start now (call ``ended``
        when it is over)."""
        if scans <= 0 or self.running or self.disabled:
            return False
        walked_far = pages / scans >= self.walk_pages
        if self._ended_at is not None and started >= self._ended_at:
            self._pause = min(self._pause * 2, self.max_pause_s) if walked_far else self.pause_s
            self._next_at = self._ended_at + self._pause
            self._ended_at = None
        if not walked_far or now < self._next_at:
            return False
        self.running = True
        return True

    def ended(self, now: float) -> None:
        """The vacuum started by ``after_claim`` is over (done, skipped or failed)."""
        self.running = False
        self._ended_at = now
        self._next_at = now + self._pause


async def vacuum_jobs(
    pacer: VacuumPacer,
    walk: float,
    conninfo: str,
    url: str,
    schema: str,
    queries: Mapping[str, str],
    connect_timeout_s: float,
) -> None:
    """Vacuum ``{schema}.jobs`` on a connection of its own, then tell ``pacer``; errors are
    logged (``url`` is scrubbed from them), never raised."""
    try:
        async with asyncio.timeout(connect_timeout_s):
            conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        async with conn:
            row = await (await conn.execute(queries["may_vacuum"])).fetchone()
            if not (row and row[0]):
                pacer.disabled = True
                log.warning(
                    "claims read %.0f pages of %s.jobs_ready per scan (entries of jobs that "
                    "left the queue, until a vacuum removes them), but this role does not own "
                    "%s.jobs and may not vacuum it: leaving it to autovacuum",
                    walk,
                    schema,
                    schema,
                )
                return
            log.info(
                "claims read %.0f pages of %s.jobs_ready per scan (entries of jobs that left "
                "the queue): vacuuming %s.jobs",
                walk,
                schema,
                schema,
            )
            started = time.monotonic()
            await conn.execute(queries["vacuum_pace"])
            await conn.execute(queries["vacuum_jobs"])
            log.info("vacuumed %s.jobs in %.1f s", schema, time.monotonic() - started)
    except Exception as exc:
        log.warning("vacuuming %s.jobs failed: %s", schema, scrub(str(exc), url))
    finally:
        pacer.ended(time.monotonic())
