"""The app of T5's worker processes (``faults.crash_app:app``): ``faults.jobs``'s ``work`` task
on an app that quarantines a job only after 100 lost leases, not 3.

T5 kills a process about every 0.5 s among five, so a worker lives a few seconds: a job can be
claimed by three workers in a row that are each killed before its body starts, and with the
default ``max_lost_leases`` it would end ``failed`` (the crash-poison quarantine, which T10
tests). T5 tests that SQLite keeps every committed job through the kills, so it lets such a
job run; the test reports how many jobs lost 3 leases or more.
"""

from __future__ import annotations

import os

from faults import jobs
from taskmill import App

app = App(os.environ.get("TASKMILL_URL", "memory://"), max_lost_leases=100)
app.task(name="faults.work", retries=10, backoff=0.05)(jobs.work)
