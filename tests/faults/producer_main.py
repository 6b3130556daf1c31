"""A producer process for the crash tests: ``python -m faults.producer_main SEED``.

Sends ``faults.work`` jobs (``faults.jobs:app``, URL from ``TASKMILL_URL``) one at a time until
the file ``$FAULTS_STOP`` exists. Before each send it records the job id in the ledger with
outcome ``unknown``, after the send returns with ``ok``: a producer killed mid-send leaves an
``unknown`` behind (the checker counts it recovered if the job turned up), and every job the
broker acknowledged is in the ledger as ``ok`` unless the kill fell between the send's return
and the ledger's write (then it stays ``unknown``: not counted lost).
"""

from __future__ import annotations

import os
import random
import sys
import time
import uuid
from pathlib import Path

from faults.jobs import app, ledger
from faults.ledger import Outcome

STOP_ENV = "FAULTS_STOP"


def main(seed: int) -> None:
    rng = random.Random(seed)
    stop = Path(os.environ[STOP_ENV])
    book = ledger()
    while not stop.exists():
        job_id = f"p-{uuid.uuid4().hex[:16]}"
        book.record_enqueue(job_id, Outcome.UNKNOWN, "intent")
        try:
            app.send_task("faults.work", [rng.randrange(21)], job_id=job_id)
        except Exception as exc:
            book.record_enqueue(job_id, Outcome.UNKNOWN, repr(exc))
            time.sleep(0.05)  # a busy file: let the others through before the next send
            continue
        book.record_enqueue(job_id, Outcome.OK)
    app.close()


if __name__ == "__main__":
    main(int(sys.argv[1]))
