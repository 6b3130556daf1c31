"""Restarting worker processes by fork, from a process that imported the app once.

A worker process that dies of its work (a job that calls ``os._exit``, a segfault, the
out-of-memory killer) is replaced at once by its supervisor. A fresh interpreter spends
0.3-0.4 s of CPU importing taskmill, the broker's client and the app before it claims
anything; in a crash storm that is most of the machine (T10 in docs/reliability.md: 55
restarts cost 18.9 s of CPU in a 12 s window on 2 CPUs). So after a death, the supervisor
starts a *fork server* for the pool: the pool's child command with ``--fork-server-fd N``,
which imports everything and then waits on a Unix socket. Each restart asks it for a child:
it forks, and the child runs the worker with the slot's holdings file and heartbeat pipe
(sent with the request, ``SCM_RIGHTS``). A fork costs milliseconds.

The child is forked twice (the server forks a helper that forks the worker and exits), so
that it is reparented to the supervisor, which is a *child subreaper* (Linux's
``PR_SET_CHILD_SUBREAPER``): the supervisor waits for it and reads its exit status as for a
child it started itself (``Forked``). Linux only; elsewhere, and whenever the server cannot
answer, the supervisor starts a fresh interpreter as before.

Only restarts use it: the first children of a pool are started fresh, and the server is
stopped once its pool has gone a while without a death, so a healthy pool runs no extra
process. Like any prefork pool (Celery's, gunicorn's with ``--preload``), a forked child
shares what the app's modules made at import: connections opened at import time must not be
used by two processes (taskmill's own App opens nothing before its first use).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import time

log = logging.getLogger("taskmill.supervisor")

__all__ = [
    "FORK_SERVER_NAME",
    "FORK_SERVER_OPTION",
    "Forked",
    "become_subreaper",
    "is_ready",
    "request_fork",
    "serve_forks",
]

FORK_SERVER_OPTION = "--fork-server-fd"
FORK_SERVER_NAME = "taskmill-fork"
"""The fork server's process name (``/proc/PID/comm``, what ``ps -o comm`` and ``top`` show;
its command line is its pool's children's): the workers it forks take theirs back."""
_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36
_MAX_REQUEST = 4096
REPLY_TIMEOUT_S = 2.0
"""How long the supervisor waits for a ready fork server's answer (a fork: milliseconds)
before it stops that server and starts a fresh process."""
READY = b"ready"
"""What a fork server sends once it can fork: until then restarts start fresh processes,
so a slow import never holds the supervisor up."""


def _prctl(option: int, arg: int | bytes) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(option, arg, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux); False elsewhere or
    if the kernel refused."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def _process_name() -> bytes:
    try:
        with open("/proc/self/comm", "rb") as f:
            return f.read().strip()
    except OSError:
        return b""


def serve_forks(fd: int) -> tuple[str, int] | None:
    """In the fork server: answer requests on the socket ``fd`` until the supervisor closes
    it (then None). In each worker forked, it returns that worker's place: its holdings file
    and the write end of its heartbeat pipe (the caller then runs the worker)."""
    sock = socket.socket(fileno=fd)
    if threading.active_count() > 1:  # a fork would copy locks held by those threads
        log.error(
            "fork server: the app started %d thread(s) at import; restarts start fresh "
            "processes instead",
            threading.active_count() - 1,
        )
        sock.close()
        return None
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    own_name = _process_name()
    _prctl(_PR_SET_NAME, FORK_SERVER_NAME.encode())
    try:
        sock.sendall(READY)
    except OSError:
        sock.close()
        return None
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, _MAX_REQUEST, 1)
        except OSError:
            data, fds = b"", []
        if not data or len(fds) != 1:
            for stray in fds:
                os.close(stray)
            sock.close()
            return None
        place = os.fsdecode(data), fds[0]
        if _fork_worker(sock, place):
            if own_name:
                _prctl(_PR_SET_NAME, own_name)
            return place  # in the worker
        os.close(fds[0])


def _fork_worker(sock: socket.socket, place: tuple[str, int]) -> bool:
    """Fork a worker for ``place`` and tell the supervisor its pid: True in the worker."""
    report_r, report_w = os.pipe()
    helper = os.fork()
    if helper == 0:  # the helper: fork the worker, hand its pid over, and exit
        os.close(report_r)
        worker = os.fork()
        if worker == 0:
            os.close(report_w)
            sock.close()
            return True
        os.write(report_w, str(worker).encode())
        os._exit(0)
    os.close(report_w)
    with os.fdopen(report_r, "rb") as report:
        pid = report.read()
    os.waitpid(helper, 0)
    sock.sendall(pid or b"0")
    return False


def is_ready(sock: socket.socket) -> bool:
    """In the supervisor: the fork server on ``sock`` said it is ready (without waiting)."""
    try:
        return sock.recv(len(READY), socket.MSG_DONTWAIT) == READY
    except OSError:  # nothing yet (BlockingIOError), or the server is gone
        return False


def request_fork(sock: socket.socket, holdings: str, heartbeat_fd: int) -> int | None:
    """In the supervisor: ask the fork server on ``sock`` for a worker; its pid, or None if
    the server did not answer in time (it is then to be stopped)."""
    try:
        sock.settimeout(REPLY_TIMEOUT_S)
        socket.send_fds(sock, [os.fsencode(holdings)], [heartbeat_fd])
        reply = sock.recv(64)
    except OSError:
        return None
    with contextlib.suppress(ValueError):
        pid = int(reply)
        if pid > 0:
            return pid
    return None


class Forked:
    """A worker process forked by a fork server and reparented to this (subreaper) process:
    the part of ``subprocess.Popen`` the supervisor uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # not ours (should not happen: the helper has exited)
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    self.returncode = 255  # gone, its status unknown
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        while (code := self.poll()) is None:
            time.sleep(0.01)
        return code

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
