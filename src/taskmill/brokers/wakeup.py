"""Cross-process wake-ups for brokers without notifications of their own (SQLite).

Each idle worker binds a Unix datagram socket in a directory derived from the database path;
a producer that commits due jobs sends one byte to every socket there. Delivery is best effort:
a datagram that is lost only delays a job until the worker's fallback check, never loses it.
A datagram that arrives while the worker is busy stays in its socket buffer, so a notify between
an empty claim and the next wait is not missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import tempfile


def channel_dir(database_path: str) -> str:
    # Socket paths are limited to 108 bytes, so the directory is a short hash in the temp dir
    # rather than a sibling of a possibly deep database path.
    digest = hashlib.sha1(os.path.realpath(database_path).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"taskmill-wake-{digest}")


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
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        for _ in range(3):  # another worker's close() may remove the empty directory meanwhile
            os.makedirs(directory, mode=0o700, exist_ok=True)
            try:
                self._sock.bind(self.path)
                break
            except FileNotFoundError:
                continue
        self._sock.setblocking(False)

    def drain(self) -> bool:
        """Consume pending wake-ups without waiting; True if there were any."""
        woke = False
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
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):  # the last worker out removes the directory
            os.rmdir(os.path.dirname(self.path))


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
