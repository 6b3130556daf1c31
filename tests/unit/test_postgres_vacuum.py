"""When a PostgreSQL worker vacuums its jobs table (``VacuumPacer``: the decisions only; the
vacuum itself runs on a real server in tests/integration/test_postgres.py)."""

from __future__ import annotations

from taskmill.brokers.postgres.vacuum import VacuumPacer

FAR, NEAR = 6_000, 3  # pages a scan: past dead entries, and a clean index


def pacer() -> VacuumPacer:
    return VacuumPacer(walk_pages=1000, pause_s=30.0, max_pause_s=120.0)


def claim(p: VacuumPacer, pages_per_scan: int, at: float, scans: int = 1) -> bool:
    return p.after_claim(pages_per_scan * scans, scans, started=at, now=at + 0.01)


def test_a_long_walk_starts_one_vacuum_at_a_time() -> None:
    p = pacer()
    assert claim(p, FAR, at=0.0, scans=2)
    assert p.running
    assert not claim(p, FAR, at=1.0)
    p.ended(now=2.0)
    assert not p.running


def test_short_walks_and_scanless_claims_start_none() -> None:
    p = pacer()
    assert not claim(p, 999, at=0.0)
    assert not claim(p, NEAR, at=1.0, scans=3)
    assert not p.after_claim(pages=50_000, scans=0, started=2.0, now=2.0)  # paused queues
    assert not p.running


def test_after_a_vacuum_that_helped_the_pause_stays_the_same() -> None:
    p = pacer()
    assert claim(p, FAR, at=0.0)
    p.ended(now=5.0)
    assert not claim(p, NEAR, at=6.0)  # it helped
    assert not claim(p, FAR, at=20.0)  # a new bulk change, within the pause
    assert claim(p, FAR, at=35.0)  # 30 s after the vacuum ended


def test_each_vacuum_that_did_not_help_doubles_the_pause_up_to_the_cap() -> None:
    p = pacer()  # pause 30 s, at most 120 s
    assert claim(p, FAR, at=0.0)
    for ended, pause in ((1.0, 60.0), (62.0, 120.0), (183.0, 120.0)):
        p.ended(now=ended)
        assert not claim(p, FAR, at=ended + 1)  # the first claim after it: it did not help
        assert not claim(p, FAR, at=ended + pause - 1)
        assert claim(p, FAR, at=ended + pause)


def test_a_claim_that_started_before_the_vacuum_ended_does_not_judge_it() -> None:
    p = pacer()
    assert claim(p, FAR, at=0.0)
    p.ended(now=5.0)
    assert not p.after_claim(FAR, 1, started=4.9, now=5.1)  # walked the index before the end
    assert not claim(p, NEAR, at=6.0)  # the first claim after it: it helped
    assert claim(p, FAR, at=35.0)  # so the pause is still 30 s


def test_a_role_that_may_not_vacuum_never_tries_again() -> None:
    p = pacer()
    assert claim(p, FAR, at=0.0)
    p.disabled = True
    p.ended(now=1.0)
    assert not any(claim(p, FAR, at=float(t)) for t in range(2, 2000, 10))
