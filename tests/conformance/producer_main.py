"""One producer process for the conformance suite: ``python -m <package>.producer_main DB COUNT
IDS`` sends COUNT ``record`` jobs (half one by one with ``send``, half with one ``send_many``)
through ``apps:app`` and writes their ids to the file IDS, one a line."""

from __future__ import annotations

import sys
from pathlib import Path

from .apps import app


def main(argv: list[str]) -> int:
    db, count, ids = argv[0], int(argv[1]), Path(argv[2])
    record = app.tasks["conformance.record"]
    try:
        half = count // 2
        handles = [record.send(db, n) for n in range(half)]
        handles += record.send_many([(db, n) for n in range(half, count)])
        assert len({h.id for h in handles}) == count, "duplicate ids from one producer"
        ids.write_text("".join(f"{h.id}\n" for h in handles))
    finally:
        app.close()
    print(f"producer: sent {count}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
