"""The jobs a worker process holds, in a file its supervisor's next process reads if it dies.

A job claimed by a process that dies keeps its lease until the lease runs out, and recovery
then counts a lost lease against it (the third quarantines it, ``max_lost_leases``), whether
or not anything of it ran: the jobs claimed in one batch with a job that kills its process
were charged with it, and good jobs were quarantined beside such a job (docs/reliability.md,
T10, "innocent batch-mates"). So a worker process under a supervisor keeps a small table in a
file, a slot per job it holds: the job's claim (id and lease token) and whether it is *idle*:
claimed and not yet taken up by the pipeline, or waiting in the thread pool's queue after the
steps before its call completed. The supervisor starts the next process of that slot on the
same file; once its broker is open, it hands back the jobs that were idle (``Released``: no
attempt spent, no lost lease), fenced by their tokens, so a lease recovered meanwhile refuses
it. Every other job is charged as before: whatever of a job's own ran and did not complete
(its decoding, a hook, its body) may be what killed the process, so a job that kills its
process is still quarantined.

The table is written by the worker's loop (claims, ends) and the task threads (a call taken
up); each slot's state byte is written last, after the claim it stands for, and read only by
a process that starts after the writer died.
"""

from __future__ import annotations

import logging
import mmap
import os
from typing import TYPE_CHECKING

from taskmill.job import Claim, Finish, Released

if TYPE_CHECKING:
    from taskmill.brokers.base import Broker

log = logging.getLogger("taskmill.worker")

SLOT_BYTES = 256
"""A slot: the state, the lengths of the id and the token, then both (UTF-8)."""
_FREE, _IDLE, _BUSY = 0, 1, 2
_MAX_TEXT = SLOT_BYTES - 3
NOT_HELD = -1
"""``hold``'s answer for a claim the table has no room for (it is charged as before)."""


class Holdings:
    """The table of one worker process, ``slots`` jobs at most (``HELD_PER_SLOT`` times
    its concurrency: its slots and its reserve, ``worker.reserve``), in the file at
    ``path`` (created or cleared)."""

    def __init__(self, path: str, slots: int) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self._fd, 0)  # what was there is the caller's (``left_idle``) to read
        os.ftruncate(self._fd, slots * SLOT_BYTES)
        self._map = mmap.mmap(self._fd, slots * SLOT_BYTES)
        self._free = list(range(slots - 1, -1, -1))

    def hold(self, claim: Claim) -> int:
        """A slot for a job just claimed, idle; ``NOT_HELD`` if there is none, or its id and
        token do not fit one."""
        job_id, token = claim.job_id.encode(), claim.token.encode()
        if not self._free or len(job_id) + len(token) > _MAX_TEXT:
            return NOT_HELD
        index = self._free.pop()
        at = index * SLOT_BYTES
        end = at + 3 + len(job_id) + len(token)
        self._map[at + 1 : end] = bytes((len(job_id), len(token))) + job_id + token
        self._map[at] = _IDLE
        return index

    def mark(self, index: int, idle: bool) -> None:
        """The job's own work begins (``idle=False``), or it waits again having done none."""
        if index != NOT_HELD:
            self._map[index * SLOT_BYTES] = _IDLE if idle else _BUSY

    def release(self, index: int) -> None:
        """The job is no longer this process's to hand back (its outcome is decided)."""
        if index != NOT_HELD:
            self._map[index * SLOT_BYTES] = _FREE
            self._free.append(index)

    def close(self) -> None:
        """Clear the table (nothing is left to hand back) and let go of the file."""
        self._map[:] = bytes(len(self._map))
        self._map.close()
        os.close(self._fd)


def left_idle(path: str) -> list[Claim]:
    """The claims of the jobs a dead process's table at ``path`` shows idle (none if there
    is no such file)."""
    try:
        with open(path, "rb") as f:
            table = f.read()
    except FileNotFoundError:
        return []
    claims = []
    for at in range(0, len(table) - SLOT_BYTES + 1, SLOT_BYTES):
        if table[at] != _IDLE:
            continue
        id_len, token_len = table[at + 1], table[at + 2]
        text = table[at + 3 : at + 3 + id_len + token_len]
        try:
            claims.append(Claim(text[:id_len].decode(), text[id_len:].decode()))
        except UnicodeDecodeError:  # not written by a worker: its job is recovered as before
            log.warning(
                "a held-jobs table at %s has a damaged slot (%d); left out", path, at // SLOT_BYTES
            )
    return claims


async def take_over(broker: Broker, path: str, slots: int, *, worker_id: str) -> Holdings:
    """Hand back the jobs the table at ``path`` shows idle (its process died holding them),
    then make it this process's table."""
    left = left_idle(path)
    if not left:
        return Holdings(path, slots)
    try:
        taken = await broker.finish([Finish(claim, Released()) for claim in left])
    except Exception as exc:  # they are recovered when their leases run out, as before
        log.warning(
            "worker %s: could not hand back the %d job(s) the process before it held and "
            "had not begun (they come back when their leases run out): %s",
            worker_id,
            len(left),
            exc,
        )
    else:
        log.warning(
            "worker %s: handed back %d job(s) that the process before it held when it died "
            "and had not begun (no lost lease counted; %d had been recovered already): %s",
            worker_id,
            sum(taken),
            len(left) - sum(taken),
            ", ".join(claim.job_id for claim in left),
        )
    return Holdings(path, slots)
