"""Virtual time for schedulers: several schedulers' loops run minutes of ticks in a moment
(``tests/conformance/test_periodic.py``, and the fault suite's T17)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from datetime import datetime

from taskmill import App
from taskmill.scheduler import PassReport, Scheduler
from taskmill.schedules import Schedule


class VirtualTime:
    """A clock and a sleep for several schedulers at once. Time stands still while any of them
    is awake (its pass does real I/O on the real broker); once all sleep, it jumps to the
    earliest wake-up and wakes whoever is due. A minute of ticks takes as long as the passes."""

    def __init__(self, at: datetime, sleepers: int) -> None:
        self.now = at.timestamp()
        self.sleepers = sleepers
        self._sleeping: list[tuple[float, asyncio.Future[None]]] = []
        self._all_asleep = asyncio.Event()

    async def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float, stop: asyncio.Event) -> None:
        woken = asyncio.get_running_loop().create_future()
        self._sleeping.append((self.now + seconds, woken))
        if len(self._sleeping) == self.sleepers:
            self._all_asleep.set()
        await woken

    async def run(self, schedulers: Sequence[Scheduler], until: datetime) -> None:
        """Run the schedulers' loops while virtual time reaches ``until``, then stop them."""
        stop = asyncio.Event()
        loops = [asyncio.create_task(s.run(stop)) for s in schedulers]
        try:
            while True:
                await self._until_all_asleep(loops)
                wake_at = min(at for at, _ in self._sleeping)
                if wake_at > until.timestamp():
                    break
                self.now = wake_at
                self._wake(until=wake_at)
        finally:
            stop.set()
            self._wake(until=math.inf)
            async with asyncio.timeout(10):
                await asyncio.gather(*loops)

    async def _until_all_asleep(self, loops: Sequence[asyncio.Task[None]]) -> None:
        asleep = asyncio.ensure_future(self._all_asleep.wait())
        try:
            done, _ = await asyncio.wait(
                {asleep, *loops}, timeout=10, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            asleep.cancel()
        ended = [loop for loop in loops if loop in done]
        assert not ended, f"a scheduler's loop ended: {ended[0]!r}"
        assert asleep in done, f"the schedulers did not all go to sleep at {self.now}"
        self._all_asleep.clear()

    def _wake(self, until: float) -> None:
        woken = [fut for at, fut in self._sleeping if at <= until]
        self._sleeping = [(at, fut) for at, fut in self._sleeping if at > until]
        for fut in woken:
            fut.set_result(None)


class RecordingScheduler(Scheduler):
    """A scheduler that keeps each pass's report with the virtual time it ran at."""

    def __init__(self, app: App, virtual: VirtualTime) -> None:
        super().__init__(app, clock=virtual.clock, sleep=virtual.sleep)
        self.virtual = virtual
        self.passes: list[tuple[float, PassReport]] = []

    async def run_pass(self, schedules: Sequence[Schedule] | None = None) -> PassReport:
        at = self.virtual.now
        report = await super().run_pass(schedules)
        self.passes.append((at, report))
        return report
