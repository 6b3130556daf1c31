"""``taskmill worker -p N`` (or ``--pool-spec``): worker processes under one supervisor.

The supervisor does no job work. It runs one or more pools, each a number of copies of one
child command (``python -m taskmill worker … -p 1``, with the pool's queues and concurrency),
restarts a child that dies unexpectedly after a back-off (the same way in every pool), and
forwards stop signals: the first SIGTERM/SIGINT asks every child to drain, the second to stop
at once, a third kills them. It exits once every child has exited after a stop.

Each child gets ``--heartbeat-fd N``, the write end of a pipe on which it writes a byte after
every heartbeat the broker took; ``health()`` reports from those bytes (the supervisor's
``--health-port`` endpoint answers for all children at once). Each slot also has a file, given
to its child as ``--holdings PATH``: the child keeps there the jobs it holds, and the next
child of the slot hands back those a dead one held and had not begun
(``taskmill.worker.holdings``). The files live in a directory of the supervisor's own,
removed when it exits.

A pool whose child died of its work restarts children by fork for ``fork_keep_s`` after that
death (Linux): from a *fork server*, a copy of the child command that imported the app once
and waits on a socket (``taskmill.worker.forkserver``). A fresh interpreter costs 0.3-0.4 s
of CPU before it claims; in a crash storm that was most of the machine (T10 in
docs/reliability.md). The server stops once its pool has gone ``fork_keep_s`` without a
death, so a healthy pool runs no extra process.

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
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

from taskmill.worker.forkserver import (
    FORK_SERVER_OPTION,
    Forked,
    become_subreaper,
    is_ready,
    request_fork,
)
from taskmill.worker.health import Status, heartbeat_status

log = logging.getLogger("taskmill.supervisor")

USAGE_EXIT_CODE = 2
"""A child exiting with this code was started wrongly: restarting it would fail again."""
NO_RESTART_EXIT_CODE = 3
"""A child exiting with this code stopped on an error no restart fixes: the broker refused it
at start or while it ran (a permanent ``BrokerError``: a read-only SQLite file, a wrong
password), or stayed unreachable past ``--max-start-wait``."""
_FINAL_EXIT_CODES = (USAGE_EXIT_CODE, NO_RESTART_EXIT_CODE)
HEARTBEAT_FD_OPTION = "--heartbeat-fd"
HOLDINGS_OPTION = "--holdings"

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class Pool:
    """``processes`` copies of the child command ``argv``; ``name`` labels them in logs and
    in ``health()``."""

    argv: Sequence[str]
    processes: int
    name: str = ""


_Process = subprocess.Popen[bytes] | Forked


@dataclass(eq=False)
class _Slot:
    index: int
    pool: Pool
    proc: _Process | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    beats: int | None = None  # read end of the child's heartbeat pipe
    last_beat: float | None = None  # time.monotonic() of the child's last heartbeat
    label: str = ""  # for log lines: the index, and the pool if there are several


@dataclass(eq=False)
class _ForkServer:
    """A pool's fork server: its app imported, it forks the pool's restarted children."""

    pool: Pool
    proc: subprocess.Popen[bytes] | None = None
    sock: socket.socket | None = None  # the supervisor's end; closing it stops the server
    ready: bool = False  # it said so: it imported everything and can fork
    refused: bool = False  # it would not fork (threads at import): no more for this pool
    wanted_until: float = 0.0  # time.monotonic() until which the pool keeps one
    failures: int = 0  # servers that exited unasked, in a row
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
    """Runs the children of every pool and keeps them running until stopped.

    A child that took a heartbeat and then died (its work killed it) is restarted at once.
    One that died before its first heartbeat (it cannot start: an import error, a broken
    environment) is restarted after ``restart_base_s``, doubled with each such quick failure
    of the same slot up to ``restart_cap_s``; a child that ran at least ``stable_after_s``
    resets its slot's back-off.
    ``heartbeat_max_age_s``: how old a child's last heartbeat may be for ``health()`` to call
    it healthy (three of its heartbeat intervals). ``on_exit`` is told the pid of each child
    that exited, once it is reaped (the metrics endpoint keeps its last counts).
    ``fork_keep_s``: how long after a child died of its work its pool restarts children by
    fork (0: never; only on Linux).
    """

    def __init__(
        self,
        pools: Sequence[Pool],
        *,
        restart_base_s: float = 0.5,
        restart_cap_s: float = 30.0,
        stable_after_s: float = 30.0,
        heartbeat_max_age_s: float = 6.0,
        on_exit: Callable[[int], None] | None = None,
        fork_keep_s: float = 60.0,
    ) -> None:
        if not pools or any(pool.processes < 1 for pool in pools):
            raise ValueError("every pool needs processes >= 1")
        self.slots: list[_Slot] = []
        self.fork_servers = [_ForkServer(pool) for pool in pools]
        self.fork_keep_s = fork_keep_s
        self._forking = False  # run() made this process a subreaper: forked children are ours
        for pool in pools:
            for _ in range(pool.processes):
                slot = _Slot(len(self.slots), pool)
                slot.label = f"{slot.index} ({pool.name})" if len(pools) > 1 else str(slot.index)
                self.slots.append(slot)
        self.heartbeat_max_age_s = heartbeat_max_age_s
        self.restart_base_s = restart_base_s
        self.restart_cap_s = restart_cap_s
        self.stable_after_s = stable_after_s
        self.on_exit = on_exit
        self._stop_requests = 0
        self._exit_code = 0
        self._holdings_dir = ""  # made by run()

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
            self._holdings_dir = tempfile.mkdtemp(prefix="taskmill-holdings-")
            self._forking = self.fork_keep_s > 0 and become_subreaper()
            log.info("supervisor %d: starting %d worker processes", os.getpid(), len(self.slots))
            for slot in self.slots:
                self._spawn(slot)
            while True:
                self._wait_for_news(read_fd)
                self._reap()
                if self._forking:
                    self._reap_orphans()
                if self._stop_requests and not self._alive():
                    log.info("supervisor %d: all worker processes exited", os.getpid())
                    return self._exit_code
                if not self._stop_requests:
                    self._restart_due()
                    self._fork_servers_due()
        finally:
            self._kill_all()  # only on an error of our own: never leave orphans
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            os.close(read_fd)
            os.close(write_fd)
            if self._holdings_dir:
                shutil.rmtree(self._holdings_dir, ignore_errors=True)

    def _wait_for_news(self, signals_fd: int) -> None:
        """Until a signal, a child's heartbeat or exit, or a restart comes due: take the
        heartbeats and act on stop signals (exits are reaped by the caller)."""
        beats = {slot.beats: slot for slot in self.slots if slot.beats is not None}
        ready: list[int] = []
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select([signals_fd, *beats], [], [], self._next_timeout())
        for fd in ready:
            if fd in beats:
                self._read_beats(beats[fd])
        for sig in _read_signals(signals_fd):
            if sig in _STOP_SIGNALS:
                self._on_stop_signal(signal.Signals(sig))

    def _processes(self) -> list[_Process]:
        """Every child process not yet reaped: the workers, and the fork servers."""
        procs = [slot.proc for slot in self.slots] + [s.proc for s in self.fork_servers]
        return [proc for proc in procs if proc is not None]

    def _kill_all(self) -> None:
        for proc in self._processes():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for slot in self.slots:
            self._close_beats(slot)
        for server in self.fork_servers:
            self._close_socket(server)

    def _next_timeout(self) -> float:
        # SIGCHLD wakes the loop when a child exits; the timeout only serves pending restarts
        # and is a safety net should a wake-up byte ever be lost.
        timeout = 1.0
        now = time.monotonic()
        pending: list[_Slot | _ForkServer] = [*self.slots, *self.fork_servers]
        for waiting in pending:
            if waiting.restart_at is not None:
                timeout = min(timeout, max(0.0, waiting.restart_at - now))
        return timeout

    def _alive(self) -> bool:
        return bool(self._processes())

    # --- children -------------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        slot.restart_at = None
        slot.last_beat = None
        holdings = os.path.join(self._holdings_dir, f"slot-{slot.index}")
        if self._fork_into(slot, holdings):
            return
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        argv = [*slot.pool.argv, HOLDINGS_OPTION, holdings, HEARTBEAT_FD_OPTION, str(write_end)]
        try:
            slot.proc = subprocess.Popen(argv, pass_fds=(write_end,))
        except OSError as exc:
            os.close(read_end)
            log.error("supervisor: cannot start worker process %s: %s", slot.label, exc)
            self._schedule_restart(slot, time.monotonic())
            return
        finally:
            os.close(write_end)  # the child holds it now: its exit ends the pipe
        slot.beats = read_end
        slot.started_at = time.monotonic()
        log.info("supervisor: worker process %s started (pid %d)", slot.label, slot.proc.pid)

    # --- fork servers ----------------------------------------------------------------------------

    def _server_of(self, pool: Pool) -> _ForkServer:
        return next(server for server in self.fork_servers if server.pool is pool)

    def _fork_into(self, slot: _Slot, holdings: str) -> bool:
        """Start ``slot``'s child from its pool's fork server, if one runs: True if it did."""
        server = self._server_of(slot.pool)
        if server.proc is None or server.sock is None or server.proc.poll() is not None:
            return False
        server.ready = server.ready or is_ready(server.sock)
        if not server.ready:
            return False  # still importing: a fresh process now, rather than a wait
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        try:
            pid = request_fork(server.sock, holdings, write_end)
        finally:
            os.close(write_end)  # the child holds it now: its exit ends the pipe
        if pid is None:
            os.close(read_end)
            log.warning(
                "supervisor: the fork server (pid %d) did not answer; stopping it, starting "
                "a fresh process",
                server.proc.pid,
            )
            self._close_socket(server)
            return False
        slot.proc, slot.beats = Forked(pid), read_end
        slot.started_at = time.monotonic()
        log.info("supervisor: worker process %s started (pid %d, forked)", slot.label, pid)
        return True

    def _fork_servers_due(self) -> None:
        """Start the fork servers wanted and not running; stop those no longer wanted."""
        now = time.monotonic()
        for server in self.fork_servers:
            if server.proc is None:
                due = server.restart_at is None or server.restart_at <= now
                if now < server.wanted_until and due and not server.refused:
                    self._spawn_fork_server(server)
            elif now >= server.wanted_until and server.sock is not None:
                log.info(
                    "supervisor: no worker process died for %.0f s: stopping the fork server "
                    "(pid %d)",
                    self.fork_keep_s,
                    server.proc.pid,
                )
                self._close_socket(server)  # it reads the end of the socket, and exits

    def _spawn_fork_server(self, server: _ForkServer) -> None:
        server.restart_at, server.ready = None, False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [*server.pool.argv, FORK_SERVER_OPTION, str(theirs.fileno())]
        try:
            server.proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),))
        except OSError as exc:
            ours.close()
            log.error("supervisor: cannot start a fork server: %s", exc)
            self._schedule_restart(server, time.monotonic())
            return
        finally:
            theirs.close()
        server.sock = ours
        log.info("supervisor: fork server started (pid %d)", server.proc.pid)

    @staticmethod
    def _close_socket(server: _ForkServer) -> None:
        if server.sock is not None:
            server.sock.close()
            server.sock = None

    def _reap_fork_servers(self) -> None:
        now = time.monotonic()
        for server in self.fork_servers:
            proc = server.proc
            if proc is None or proc.poll() is None:
                continue
            retired = server.sock is None
            server.proc = None
            self._close_socket(server)
            if self._stop_requests or (retired and proc.returncode == 0):
                continue
            if proc.returncode in _FINAL_EXIT_CODES or proc.returncode == 0:
                # it cannot start (the pool's children will say why), or it would not fork
                # (threads at import: it said so): restarts start fresh processes
                server.refused = True
                log.warning(
                    "supervisor: the fork server (pid %d) exited (%s); restarts start fresh "
                    "processes",
                    proc.pid,
                    describe_exit(proc.returncode),
                )
                continue
            delay = self._schedule_restart(server, now)
            log.warning(
                "supervisor: the fork server (pid %d) exited (%s); starting another in %.1f s",
                proc.pid,
                describe_exit(proc.returncode),
                delay,
            )

    def _reap_orphans(self) -> None:
        """As a subreaper, this process inherits its children's orphans (a forked child's
        own children, left behind when it died): wait for those no slot knows."""
        known = {proc.pid for proc in self._processes()}
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid in known:
                return
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.si_pid, 0)

    # --- heartbeats -----------------------------------------------------------------------------

    def _read_beats(self, slot: _Slot) -> None:
        assert slot.beats is not None
        got = False
        while True:
            try:
                chunk = os.read(slot.beats, 4096)
            except BlockingIOError:
                break
            if not chunk:  # the child exited (reaped separately)
                self._close_beats(slot)
                break
            got = True
        if got:
            slot.last_beat = time.monotonic()

    @staticmethod
    def _close_beats(slot: _Slot) -> None:
        if slot.beats is not None:
            os.close(slot.beats)
            slot.beats = None

    def health(self) -> Status:
        """Healthy while every child runs and heartbeated within ``heartbeat_max_age_s``, or
        has none yet but started less than that ago (one that is being restarted is not).
        Safe to call from another thread."""
        now = time.monotonic()
        children = []
        for slot in self.slots:
            proc = slot.proc
            ok, details = heartbeat_status(
                slot.last_beat, started=slot.started_at, max_age_s=self.heartbeat_max_age_s, now=now
            )
            if proc is None:
                ok, details["status"] = False, "restarting"
            status = details["status"]
            children.append(
                {
                    "pool": slot.pool.name,
                    "pid": proc.pid if proc is not None else None,
                    "status": status,
                    "heartbeat_age_s": details["heartbeat_age_s"],
                    "ok": ok,
                }
            )
        healthy = all(child.pop("ok") for child in children)
        return healthy, {
            "status": "ok" if healthy else "unhealthy",
            "max_age_s": self.heartbeat_max_age_s,
            "processes": children,
        }

    def _reap(self) -> None:
        self._reap_fork_servers()
        now = time.monotonic()
        for slot in self.slots:
            proc = slot.proc
            code = None if proc is None else proc.poll()
            if proc is None or code is None:
                continue
            slot.proc = None
            self._read_beats_left(slot)
            if self.on_exit is not None:
                self.on_exit(proc.pid)
            if self._stop_requests:
                log.info("supervisor: worker process %s (pid %d) exited", slot.label, proc.pid)
                continue
            if code in _FINAL_EXIT_CODES:
                why = "a usage error" if code == USAGE_EXIT_CODE else "an error no restart fixes"
                log.error(
                    "supervisor: worker process %s (pid %d) exited with %s (exit code %d); not "
                    "restarting it, stopping the others",
                    slot.label,
                    proc.pid,
                    why,
                    code,
                )
                self._exit_code = code
                self._stop_children(signal.SIGTERM)
                self._stop_requests = 1
                continue
            if slot.last_beat is not None:
                # it took a heartbeat: its start works (app imported, broker reached), and it
                # died of its work, so it is replaced at once, as the plan's crash storm (T1)
                # asks. A job that kills its process is quarantined after max_lost_leases
                # deaths, so such restarts end by themselves; backing off here left a pool
                # down 30 s at a time while 50 such jobs were worked through (T10)
                slot.failures = 0
                slot.restart_at, delay = now, 0.0
                if self._forking:
                    server = self._server_of(slot.pool)
                    server.wanted_until = now + self.fork_keep_s
                    server.failures = 0
            else:
                if now - slot.started_at >= self.stable_after_s:
                    slot.failures = 0
                delay = self._schedule_restart(slot, now)
            log.warning(
                "supervisor: worker process %s (pid %d) died unexpectedly (%s); restarting in "
                "%.1f s",
                slot.label,
                proc.pid,
                describe_exit(code),
                delay,
            )

    def _read_beats_left(self, slot: _Slot) -> None:
        if slot.beats is not None:
            self._read_beats(slot)
            self._close_beats(slot)

    def _schedule_restart(self, slot: _Slot | _ForkServer, now: float) -> float:
        """The back-off of a slot's child, or of a pool's fork server, that could not start:
        ``restart_base_s`` doubled with each failure in a row, up to ``restart_cap_s``."""
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
        for server in self.fork_servers:
            server.restart_at, server.wanted_until = None, 0.0
            self._close_socket(server)  # it reads the end of the socket, and exits
        alive = sum(1 for slot in self.slots if slot.proc is not None)
        if self._stop_requests == 1:  # a normal shutdown: INFO, not a warning
            log.info(
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
        for proc in self._processes():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)


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


__all__ = ["HEARTBEAT_FD_OPTION", "NO_RESTART_EXIT_CODE", "Pool", "Supervisor", "describe_exit"]
