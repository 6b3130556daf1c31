"""The table of held jobs a worker process keeps for its supervisor's next process
(``taskmill.worker.holdings``): what it shows idle after its writer is gone. The hand-back
itself, with a process that really dies, is in tests/conformance/test_processes.py; one the
broker cannot take in tests/integration/test_hand_back.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskmill.job import Claim
from taskmill.worker.holdings import NOT_HELD, SLOT_BYTES, Holdings, left_idle

pytestmark = pytest.mark.timeout(10)


def test_only_jobs_that_wait_are_left_idle(tmp_path: Path) -> None:
    path = str(tmp_path / "slot-0")
    table = Holdings(path, 4)
    waiting, working, queued, done = (Claim(f"job-{n}", f"token-{n}") for n in range(4))
    slots = {claim: table.hold(claim) for claim in (waiting, working, queued, done)}
    table.mark(slots[working], idle=False)  # its steps began
    table.mark(slots[queued], idle=False)
    table.mark(slots[queued], idle=True)  # its steps completed: it waits for a thread
    table.release(slots[done])  # its outcome is decided
    # read from the file, as the next process does
    assert sorted(left_idle(path), key=lambda c: c.job_id) == [waiting, queued]
    table.close()


def test_a_released_slot_is_used_again_and_a_full_table_holds_nothing_more(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "slot-0")
    table = Holdings(path, 2)
    first = table.hold(Claim("a", "1"))
    table.hold(Claim("b", "2"))
    assert table.hold(Claim("c", "3")) == NOT_HELD  # not recorded: charged as before
    table.release(first)
    assert table.hold(Claim("d", "4")) == first
    assert sorted(c.job_id for c in left_idle(path)) == ["b", "d"]
    table.mark(NOT_HELD, idle=False)  # a job the table has no slot for: nothing to mark
    table.release(NOT_HELD)
    table.close()


def test_a_claim_too_long_for_a_slot_is_not_held(tmp_path: Path) -> None:
    table = Holdings(str(tmp_path / "slot-0"), 2)
    assert table.hold(Claim("x" * (SLOT_BYTES - 3 - 5), "12345")) != NOT_HELD  # just fits
    assert table.hold(Claim("x" * (SLOT_BYTES - 3 - 5), "123456")) == NOT_HELD
    table.close()


def test_a_non_ascii_id_comes_back_whole(tmp_path: Path) -> None:
    path = str(tmp_path / "slot-0")
    table = Holdings(path, 1)
    table.hold(Claim("fac-ture-№7-é", "tök"))
    assert left_idle(path) == [Claim("fac-ture-№7-é", "tök")]
    table.close()


def test_a_closed_table_and_a_missing_file_leave_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "slot-0")
    assert left_idle(path) == []
    table = Holdings(path, 2)
    table.hold(Claim("a", "1"))
    table.close()  # a worker that stopped handed back or finished all it held
    assert left_idle(path) == []


def test_a_new_table_clears_what_the_dead_process_left(tmp_path: Path) -> None:
    path = str(tmp_path / "slot-0")
    old = Holdings(path, 2)
    old.hold(Claim("a", "1"))  # the process "dies": its table is never closed
    assert left_idle(path) == [Claim("a", "1")]
    new = Holdings(path, 3)
    assert left_idle(path) == []
    new.close()


def test_a_damaged_slot_is_left_out_and_the_others_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "slot-0"
    table = Holdings(str(path), 2)
    table.hold(Claim("a", "1"))
    table.hold(Claim("b", "2"))
    raw = bytearray(path.read_bytes())
    raw[3] = 0xFF  # the first slot's id is no longer UTF-8
    path.write_bytes(bytes(raw))
    assert left_idle(str(path)) == [Claim("b", "2")]
    assert "damaged slot (0)" in caplog.text
    table.close()
