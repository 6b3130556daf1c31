"""Cross-process wake-ups for SQLite, which cannot notify one process of another's commit.

Each idle worker binds a Unix datagram socket in a directory derived from the database path;
a producer that commits due jobs sends one byte to every socket there. Delivery is best effort:
a datagram that is lost only delays a job until the worker's fallback check, never loses it.
A datagram that arrives while the worker is busy stays in its socket buffer, so a notify between
an empty claim and the next wait is not missed. The fallback is ``PRAGMA data_version``, which
changes when another connection commits to the file (``Wakeups.data_changed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import sqlite3
import tempfile
import threading

log = logging.getLogger("taskmill.broker")
_MAX_SOCKET_PATH = 107  # bytes: sun_path holds 108, with the terminating NUL


def channel_dir(database_path: str) -> str:
    # Socket paths are limited to 108 bytes, so the directory is a short hash in the temp dir
    # rather than a sibling of a possibly deep database path; a temp dir too deep for that
    # (a long TMPDIR) gives way to /tmp.
    digest = hashlib.sha1(os.path.realpath(database_path).encode()).hexdigest()[:16]
    name = f"taskmill-wake-{digest}"
    directory = os.path.join(tempfile.gettempdir(), name)
    too_deep = len(os.fsencode(os.path.join(directory, "x" * 12))) > _MAX_SOCKET_PATH
    return os.path.join("/tmp", name) if too_deep and os.path.isdir("/tmp") else directory


class WakeSender:
    """Sends wake-ups; caches the directory listing until the directory changes."""

    def __init__(self, directory: str) -> None:
        self._dir = directory
        self._mtime_ns = -1
        self._peers: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def notify(self) -> None:
        try:
            mtime_ns = os.stat(self._dir).st_mtime_ns
        except FileNotFoundError:
            return
        if mtime_ns != self._mtime_ns:
            self._mtime_ns = mtime_ns
            self._peers = [os.path.join(self._dir, n) for n in os.listdir(self._dir)]
        for peer in self._peers:
            try:
                self._sock.sendto(b"\x01", peer)
            except BlockingIOError:
                pass  # that worker already has wake-ups pending: one more adds nothing
            except (ConnectionRefusedError, FileNotFoundError):
                with contextlib.suppress(OSError):  # a killed worker's socket file: tidy it
                    os.unlink(peer)
            except OSError:
                pass

    def close(self) -> None:
        self._sock.close()


class WakeListener:
    """One worker's receiving end."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, os.urandom(6).hex())
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._bind(directory)
        except OSError as exc:  # waits still end at their timeout: the fallback check's pace
            log.warning(
                "SQLite wake-ups are off for this process (claims poll instead, so jobs start "
                "later): cannot bind a socket at %s: %s",
                self.path,
                exc,
            )
            self._sock.close()
            self._sock = None
            return
        self._sock.setblocking(False)

    def _bind(self, directory: str) -> None:
        assert self._sock is not None
        for _ in range(3):  # another worker's close() may remove the empty directory meanwhile
            os.makedirs(directory, mode=0o700, exist_ok=True)
            try:
                self._sock.bind(self.path)
                return
            except FileNotFoundError:
                continue
        raise FileNotFoundError(f"{directory} kept disappearing")

    def drain(self) -> bool:
        """Consume pending wake-ups without waiting; True if there were any."""
        woke = False
        if self._sock is None:
            return False
        while True:
            try:
                self._sock.recv(64)
                woke = True
            except BlockingIOError:
                return woke

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a wake-up; True if one came."""
        if self.drain():
            return True
        if self._sock is None:
            await asyncio.sleep(timeout)
            return False
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = self._sock.fileno()
        loop.add_reader(fd, _resolve, fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(fd)
        return self.drain()

    def close(self) -> None:
        if self._sock is None:
            return
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):  # the last worker out removes the directory
            os.rmdir(os.path.dirname(self.path))


class Wakeups:
    """One broker's wake-ups: the sender its writes notify through, the listener its waits
    use (bound before the first claim, so a notify after an empty claim is not missed), and
    the fallback's baseline."""

    def __init__(self, database_path: str) -> None:
        self.directory = channel_dir(database_path)
        self._sender: WakeSender | None = None
        self._listener: WakeListener | None = None
        self._listener_lock = threading.Lock()
        self._baseline = threading.local()
        # commits on this process's own connection do not change its PRAGMA data_version, so
        # a wait also watches this count of our own writes that may schedule work
        self._own_writes = 0

    def open(self) -> None:
        if self._sender is None:
            self._sender = WakeSender(self.directory)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def listener(self) -> WakeListener:
        """This process's listener, bound on first use."""
        listener = self._listener
        if listener is None:
            with self._listener_lock:
                if self._listener is None:
                    self._listener = WakeListener(self.directory)
                listener = self._listener
        return listener

    def notify(self) -> None:
        """Wake every idle worker on the file: work is due now."""
        if self._sender is not None:
            self._sender.notify()

    def wrote(self) -> None:
        """This process committed something a wait of its own must notice."""
        self._own_writes += 1

    def data_changed(self, conn: sqlite3.Connection) -> bool:
        """Whether the file changed since this thread last asked: another connection's
        commit, or one of our own ``wrote``. The first call sets the baseline."""
        (version,) = conn.execute("PRAGMA data_version").fetchone()
        seen = (version, self._own_writes)
        changed = seen != getattr(self._baseline, "seen", None)
        self._baseline.seen = seen
        return changed


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
