"""Job ids: time-ordered ones (UUIDv7, RFC 9562) that sort in creation order within one
process, and the ids a workflow gives its steps' jobs (``wf:<workflow>:<step>``)."""

from __future__ import annotations

import os
import random
import threading
import time

_lock = threading.Lock()
_last_ms = 0
_counter = 0
# Ids need to be unique, not secret: a PRNG seeded from the OS avoids a syscall per id, and a
# fork reseeds it so a child does not repeat its parent's sequence.
_random = random.Random(random.SystemRandom().getrandbits(128))


def uuid7() -> str:
    """A UUIDv7 string; monotonic within a process (a 12-bit counter orders ids of one ms)."""
    global _last_ms, _counter
    ms = time.time_ns() // 1_000_000
    with _lock:
        if ms <= _last_ms:
            ms = _last_ms
            _counter += 1
            if _counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                ms += 1
                _counter = 0
        else:
            _counter = _random.getrandbits(6)
        _last_ms = ms
        counter = _counter
        rand = _random.getrandbits(62)
    value = (ms << 80) | (0x7 << 76) | (counter << 64) | (0x2 << 62) | rand
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def step_job_id(workflow_id: str, step: str) -> str:
    """The job id of a workflow's step: stored once, whoever releases the step.

    >>> step_job_id("0190", "2"), workflow_of("wf:0190:2"), workflow_of("0190")
    ('wf:0190:2', '0190', None)
    """
    return f"wf:{workflow_id}:{step}"


def workflow_of(job_id: str) -> str | None:
    """The workflow a step's job belongs to (None for a job outside any workflow)."""
    if not job_id.startswith("wf:"):
        return None
    return job_id[3:].rpartition(":")[0] or None


def _reseed() -> None:
    _random.seed(random.SystemRandom().getrandbits(128))


os.register_at_fork(after_in_child=_reseed)
