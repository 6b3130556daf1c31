"""One worker process for the conformance suite (deliberately not the ``taskmill`` CLI).

``python -m <package>.worker_main module:app [--queues a,b] [--concurrency N]
[--drain-timeout S] [--pool thread|async]`` runs ``Worker(app, ...)`` with its SIGTERM/SIGINT
handlers installed and exits 0 once it has stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from taskmill.loader import load_app
from taskmill.worker import Worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("app", help="module:attribute of the App")
    parser.add_argument("--queues", default=None)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument("--pool", choices=["thread", "async"], default="thread")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    app = load_app(args.app)
    worker = Worker(
        app,
        queues=args.queues.split(",") if args.queues else app.queues(),
        concurrency=args.concurrency,
        drain_timeout_s=args.drain_timeout,
        pool=args.pool,
    )

    async def run() -> int:
        worker.install_signal_handlers()
        return await worker.run()

    try:
        done = asyncio.run(run())
    finally:
        app.close()
    print(f"worker_main: stopped after {done} jobs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
