"""``taskmill worker -p N``: N worker processes under one supervisor.

The supervisor does no job work. It starts each child (``python -m taskmill worker … -p 1``),
restarts one that dies unexpectedly after a back-off, and forwards stop signals: the first
SIGTERM/SIGINT asks every child to drain, the second to stop at once, a third kills them. It
exits once every child has exited after a stop.

Children stay in the supervisor's process group (so killing the group kills them all) and
ignore SIGINT, because a Ctrl-C in a terminal reaches the whole group and the supervisor
forwards it as SIGTERM already: each child must see each stop request once.

Signals arrive through ``signal.set_wakeup_fd`` on a pipe that the loop ``select``s on; the
Python-level handlers do nothing. That keeps all state changes in the loop, with no code
running inside a signal handler.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

log = logging.getLogger("taskmill.supervisor")

USAGE_EXIT_CODE = 2
"""A child exiting with this code was started wrongly: restarting it would fail again."""
BROKER_REFUSED_EXIT_CODE = 3
"""A child met a broker error no retry fixes (``BrokerError.permanent``): nor would a restart."""

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(eq=False)
class _Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None


def describe_exit(code: int) -> str:
    """``exit code 3`` or ``killed by SIGKILL``, for log lines."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Runs ``processes`` copies of ``child_argv`` and keeps them running until stopped.

    ``restart_base_s`` doubles with each quick failure of the same slot up to
    ``restart_cap_s``; a child that ran at least ``stable_after_s`` resets its slot's back-off.
    """

    def __init__(
        self,
        child_argv: Sequence[str],
        processes: int,
        *,
        restart_base_s: float = 0.5,
        restart_cap_s: float = 30.0,
        stable_after_s: float = 30.0,
    ) -> None:
        if processes < 1:
            raise ValueError("processes must be >= 1")
        self.child_argv = list(child_argv)
        self.slots = [_Slot(i) for i in range(processes)]
        self.restart_base_s = restart_base_s
        self.restart_cap_s = restart_cap_s
        self.stable_after_s = stable_after_s
        self._stop_requests = 0
        self._exit_code = 0

    # --- main loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Start the children and supervise them until they all exit after a stop signal.
        Must be called from the main thread. Returns the exit code for the process."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        watched = (*_STOP_SIGNALS, signal.SIGCHLD)
        old_handlers = {sig: signal.signal(sig, _ignore) for sig in watched}
        try:
            log.info("supervisor %d: starting %d worker processes", os.getpid(), len(self.slots))
            for slot in self.slots:
                self._spawn(slot)
            while True:
                with contextlib.suppress(InterruptedError):
                    select.select([read_fd], [], [], self._next_timeout())
                for sig in _read_signals(read_fd):
                    if sig in _STOP_SIGNALS:
                        self._on_stop_signal(signal.Signals(sig))
                self._reap()
                if self._stop_requests and not self._alive():
                    log.info("supervisor %d: all worker processes exited", os.getpid())
                    return self._exit_code
                if not self._stop_requests:
                    self._restart_due()
        finally:
            for slot in self.slots:  # only on an error of our own: never leave orphans
                if slot.proc is not None and slot.proc.poll() is None:
                    slot.proc.kill()
                    slot.proc.wait()
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            os.close(read_fd)
            os.close(write_fd)

    def _next_timeout(self) -> float:
        # SIGCHLD wakes the loop when a child exits; the timeout only serves pending restarts
        # and is a safety net should a wake-up byte ever be lost.
        timeout = 1.0
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None:
                timeout = min(timeout, max(0.0, slot.restart_at - now))
        return timeout

    def _alive(self) -> bool:
        return any(slot.proc is not None for slot in self.slots)

    # --- children -------------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        slot.restart_at = None
        try:
            slot.proc = subprocess.Popen(self.child_argv)
        except OSError as exc:
            log.error("supervisor: cannot start worker process %d: %s", slot.index, exc)
            self._schedule_restart(slot, time.monotonic())
            return
        slot.started_at = time.monotonic()
        log.info("supervisor: worker process %d started (pid %d)", slot.index, slot.proc.pid)

    def _reap(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            proc = slot.proc
            if proc is None or proc.poll() is None:
                continue
            slot.proc = None
            code = proc.returncode
            if self._stop_requests:
                log.info("supervisor: worker process %d (pid %d) exited", slot.index, proc.pid)
                continue
            if code in (USAGE_EXIT_CODE, BROKER_REFUSED_EXIT_CODE):
                log.error(
                    "supervisor: worker process %d (pid %d) exited with %s; not restarting it, "
                    "stopping the others",
                    slot.index,
                    proc.pid,
                    "a usage error" if code == USAGE_EXIT_CODE else "a broker error",
                )
                self._exit_code = USAGE_EXIT_CODE if code == USAGE_EXIT_CODE else 1
                self._stop_children(signal.SIGTERM)
                self._stop_requests = 1
                continue
            if now - slot.started_at >= self.stable_after_s:
                slot.failures = 0
            delay = self._schedule_restart(slot, now)
            log.warning(
                "supervisor: worker process %d (pid %d) died unexpectedly (%s); restarting in "
                "%.1f s",
                slot.index,
                proc.pid,
                describe_exit(code),
                delay,
            )

    def _schedule_restart(self, slot: _Slot, now: float) -> float:
        delay = min(self.restart_cap_s, self.restart_base_s * 2.0**slot.failures)
        slot.failures += 1
        slot.restart_at = now + delay
        return delay

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.proc is None and slot.restart_at is not None and slot.restart_at <= now:
                self._spawn(slot)

    # --- stopping -------------------------------------------------------------------------------

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._stop_requests += 1
        for slot in self.slots:
            slot.restart_at = None
        alive = sum(1 for slot in self.slots if slot.proc is not None)
        if self._stop_requests == 1:
            log.warning(
                "supervisor: %s: draining %d worker processes (send again to stop at once)",
                sig.name,
                alive,
            )
            self._stop_children(signal.SIGTERM)
        elif self._stop_requests == 2:
            log.warning("supervisor: %s again: stopping %d worker processes now", sig.name, alive)
            self._stop_children(signal.SIGTERM)
        else:
            log.warning("supervisor: %s a third time: killing %d worker processes", sig.name, alive)
            self._stop_children(signal.SIGKILL)

    def _stop_children(self, sig: signal.Signals) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(sig)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The wake-up fd carries the signal; a handler must exist so the default action (exit)
    does not run."""


def _read_signals(fd: int) -> list[int]:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 512)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return list(data)


__all__ = ["Supervisor", "describe_exit"]
