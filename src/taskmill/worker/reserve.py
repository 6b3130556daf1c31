"""Claiming in place of jobs that end before they run: the worker's reserve.

A claimed job whose stored arguments do not decode, whose task this worker does not know or
whose payload is over the limit fails at once, without running: it is *dead on arrival*.
Its slot is then free, but nothing fills it before the next claim's round trip, which on a
busy broker takes a few milliseconds (a transaction, another process's write first). A queue
where such records are common (a producer's bug, damaged data: T9 of docs/reliability.md)
leaves slots idle for that long each.

``Reserve`` estimates, from the jobs the worker finished, the share that was dead on arrival,
and the claim loop asks for that many more jobs than it has free slots. The jobs beyond the
slots wait at ``BodySlots``, the gate every job passes just before its function is called,
with their leases held; a job that waits longer than ``wait_s`` (the guess was wrong: the
others ran long) is handed back unstarted (``Released``: no attempt spent) for any worker to
take. A worker whose jobs all run claims exactly its free slots, as before.

Claiming in place of the jobs that end at once is not enough by itself: those jobs free
their slots at once, so the claim loop claims back to back, and a slot whose job ends waits
for the claim under way and then its own (T9 on NATS, whose claim takes 5-7 ms under load:
10 ms jobs ran 43 % of the time). So while the share is high and the jobs that run are short,
the worker also keeps a *standing* reserve: up to ``concurrency x share`` claimed jobs beyond
its slots, which take a slot the moment one is free. A hand-back from the reserve (a job that
waited ``wait_s``) stops the standing reserve for ``QUIET_S``, so a long job in a slot does
not make the worker claim and hand back the same jobs again and again.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque

__all__ = ["HELD_PER_SLOT", "QUIET_S", "WAIT_S", "BodySlots", "Reserve"]

WAIT_S = 1.0
"""How long a reserve job may wait for a slot before it is handed back: far longer than the
jobs whose place it takes (they end at once), far shorter than a lease."""

HELD_PER_SLOT = 3
"""At most this many jobs held a slot: one running, a standing reserve and the extras of a
claim (each at most the concurrency). Capped at two, the claims among T9's bad records were
smaller, and NATS ran 0.77-0.83 of its clean rate against 0.89-0.93."""
QUIET_S = 10.0
"""How long a hand-back from the reserve stops the standing reserve."""
SHORT_S = WAIT_S / 4
"""A standing reserve is kept only while the jobs that run take no longer than this on average:
its jobs then wait a fraction of ``WAIT_S`` for a slot, not the whole of it."""

_WEIGHT = 1 / 32  # of each finished job in the estimates
_FLOOR = 0.1  # below this share of dead-on-arrival jobs, claim no more than the free slots
_CEILING = 0.8  # at most 6 extra jobs a free slot, and at most the worker's concurrency
# How many dead-on-arrival jobs a claim brings varies from claim to claim (half of 8 jobs
# claimed: 3 or fewer run in a third of the claims), so the claim takes half as many again as
# expected: fewer slots wait for the next claim, and the jobs in reserve wait no longer than
# one job's run (T9 on PostgreSQL, full size: 0.80 and 0.79 of the clean run, 0.83 with it)
_MARGIN = 1.5


class Reserve:
    """The share of finished jobs that were dead on arrival, and the extra jobs it calls for."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.share = 0.0
        self.run_s: float | None = None
        """How long the jobs that ran took, on average (the first, then ``_WEIGHT`` of
        each); None until one has: no standing reserve before the worker knows."""
        self.quiet_until = 0.0
        """Monotonic: no standing reserve before then (``handed_back``)."""

    def finished(self, *, ran: bool, took_s: float | None = None) -> None:
        """A job ended: ``ran`` if its function was called (whatever the outcome), having
        taken ``took_s``."""
        self.share += ((0.0 if ran else 1.0) - self.share) * _WEIGHT
        if ran and took_s is not None:
            last = took_s if self.run_s is None else self.run_s
            self.run_s = last + (took_s - last) * _WEIGHT

    def handed_back(self, now: float) -> None:
        """A job in reserve waited ``WAIT_S`` for a slot and went back: the slots are busy
        for longer than the reserve was meant to wait, so keep none standing for a while."""
        self.quiet_until = now + QUIET_S

    def extra(self, free: int) -> int:
        """How many jobs to claim beyond ``free`` slots: half as many again as are expected
        to end without running, so that the free slots still get jobs that run.

        >>> r = Reserve(concurrency=8)
        >>> r.extra(4)
        0
        >>> for _ in range(64):
        ...     r.finished(ran=False); r.finished(ran=True)
        >>> r.extra(4)  # half end without running: claim 10 for 4 slots
        6
        """
        share = min(self.share, _CEILING)
        if share < _FLOOR:
            return 0
        return min(self.concurrency, int(_MARGIN * free * share / (1.0 - share) + 0.5))

    def standing(self, now: float) -> int:
        """How many claimed jobs to keep waiting beyond the slots: ``concurrency x share``
        (rounded up) while the share calls for a reserve, the jobs that ran were short, and
        no job went back from the reserve in the last ``QUIET_S``.

        >>> r = Reserve(concurrency=4)
        >>> r.share = 0.5
        >>> r.standing(now=0.0)  # no job has run yet: how long they take is unknown
        0
        >>> r.finished(ran=True, took_s=0.01)
        >>> r.standing(now=0.0)
        2
        >>> r.handed_back(now=0.0)
        >>> r.standing(now=1.0), r.standing(now=QUIET_S)
        (0, 2)
        >>> r.run_s = 2 * SHORT_S  # long jobs: a job in reserve would wait too long
        >>> r.standing(now=QUIET_S)
        0
        """
        share = min(self.share, _CEILING)
        short = self.run_s is not None and self.run_s <= SHORT_S
        if share < _FLOOR or not short or now < self.quiet_until:
            return 0
        return min(self.concurrency, math.ceil(self.concurrency * share))


class BodySlots:
    """At most ``size`` job functions running at once; the jobs beyond wait, first come
    first served, up to ``wait_s`` each. ``close`` (the worker stops) turns every waiting
    and later job away."""

    def __init__(self, size: int, wait_s: float) -> None:
        self.size = size
        self.wait_s = wait_s
        self.taken = 0
        self._waiting: deque[asyncio.Future[bool]] = deque()
        self._closed = False

    def try_take(self) -> bool:
        """A slot at once, if one is free and no job waits for one."""
        if self.taken < self.size and not self._waiting and not self._closed:
            self.taken += 1
            return True
        return False

    async def take(self) -> bool:
        """A slot, after waiting up to ``wait_s`` for one; False if none came in time or the
        worker is stopping. A cancel while waiting takes none."""
        if self.try_take():
            return True
        if self._closed:
            return False
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        got = False
        try:
            async with asyncio.timeout(self.wait_s):
                got = await waiter
        except TimeoutError:
            got = False
        finally:
            with contextlib.suppress(ValueError):  # not there if give_back or close took it
                self._waiting.remove(waiter)
            if not waiter.done():
                waiter.cancel()
            elif not got and not waiter.cancelled() and waiter.result():
                self.give_back()  # the slot came as the wait ended: it passes on
        return got

    def give_back(self) -> None:
        """A job's function returned: its slot goes to the first job waiting, if any."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(True)  # the slot passes to it: ``taken`` is unchanged
                return
        self.taken -= 1

    def close(self) -> None:
        """Turn away the jobs waiting and any that come later (they are handed back)."""
        self._closed = True
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(False)
