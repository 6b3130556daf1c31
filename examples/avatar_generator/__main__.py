"""``python -m examples.avatar_generator``: the seed's avatar pipeline, end to end.

1. start the fake persona API (latency, and faults injected for some batches);
2. start 2 ``flask ... taskmill worker`` processes and the web app on a loopback port;
3. send three requests through the JSON API, follow their status until they end;
4. retry the failed batches of the request left ``partial``, through the API;
5. print a summary; with ``--serve``, keep serving the page until Ctrl-C.

The broker is ``FLASK_TASKMILL_URL`` (or ``TASKMILL_URL``) if set, e.g. a PostgreSQL URL, else a
fresh SQLite file in a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from examples._support.processes import interrupt_on_sigterm
from examples.avatar_generator.fake_api import FakeAvatarApi
from examples.avatar_generator.run import Server, Workers, call
from examples.avatar_generator.web import ACTIVE, create_app
from taskmill.urls import redact_url

DEADLINE_S = 60.0
DEMO_REQUESTS = [  # (prompt, avatars, faults: batch -> kind)
    ("friendly engineers", 50, {1: "500", 2: "429"}),
    ("sailors", 100, {3: "reject"}),
    ("chess players", 30, {0: "timeout"}),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.avatar_generator")
    parser.add_argument("--serve", action="store_true", help="keep serving the page at the end")
    parser.add_argument("--port", type=int, default=0, help="the web app's port (0: any free)")
    options = parser.parse_args(argv)
    interrupt_on_sigterm()  # SIGTERM stops the workers as Ctrl-C does
    workdir = Path(tempfile.mkdtemp(prefix="avatar-generator-"))
    url = (
        os.environ.get("FLASK_TASKMILL_URL")
        or os.environ.get("TASKMILL_URL")
        or f"sqlite:///{workdir}/avatars.db"
    )
    api = FakeAvatarApi(latency_s=0.4).start()
    config = {"TASKMILL_URL": url, "AVATAR_API_URL": api.url, "AVATAR_API_TIMEOUT_S": 2}
    for prompt, _, faults in DEMO_REQUESTS:
        for batch, kind in faults.items():
            api.inject(prompt, batch, kind, seconds=3.0)  # type: ignore[arg-type]
    workers = Workers(workdir, config)
    server = Server(create_app(**config), options.port).start()
    try:
        for _ in range(2):
            workers.start("-c", "8")
        print(f"web app: {server.url}   workers: 2 x 8 slots   broker: {redact_url(url)}")
        ids = [_send(server.url, prompt, n) for prompt, n, _ in DEMO_REQUESTS]
        final = _follow(server.url, ids)
        partial = [r["id"] for r in final if r["status"] in ("partial", "failed")]
        for request_id in partial:
            status, body = call("POST", f"{server.url}/api/requests/{request_id}/retry")
            print(f"retry {request_id[-8:]}: HTTP {status}, batches {body}")
        final = _follow(server.url, ids) if partial else final
        _summary(final, api)
        if options.serve:
            print(f"\nserving {server.url} (Ctrl-C to stop)")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        workers.stop()
        api.stop()
        print(f"\nworker logs: {workdir}")
    return 0


def _send(base: str, prompt: str, quantity: int) -> str:
    status, body = call("POST", f"{base}/api/requests", {"prompt": prompt, "quantity": quantity})
    if status != 202:
        raise SystemExit(f"POST /api/requests answered {status}: {body}")
    print(f"sent {quantity:>3} avatars of {prompt!r}: request {body['id'][-8:]}")
    return str(body["id"])


def _follow(base: str, ids: list[str]) -> list[dict[str, Any]]:
    """Print each request's status as it changes, until none is active."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + DEADLINE_S
    while True:
        found = [call("GET", f"{base}/api/requests/{i}")[1] for i in ids]
        for r in found:
            if seen.get(r["id"]) != r["status"]:
                seen[r["id"]] = r["status"]
                print(f"  {r['id'][-8:]} {r['status']:<10} {r['personas']:>3} avatars")
                for b in r["batches"] if r["status"] in ("partial", "failed") else []:
                    if b["state"] == "failed":
                        print(f"           batch {b['number']} failed: {b['error']}")
        if all(r["status"] not in ACTIVE for r in found):
            return found
        if time.monotonic() > deadline:
            raise SystemExit(f"requests still running after {DEADLINE_S:g} s: {seen}")
        time.sleep(0.3)


def _summary(found: list[dict[str, Any]], api: FakeAvatarApi) -> None:
    print("\nrequest   status      avatars  batches  attempts per batch")
    for r in found:
        attempts = ",".join(str(b["attempt"]) for b in r["batches"])
        print(
            f"{r['id'][-8:]}  {r['status']:<10}  {r['personas']:>7}  {len(r['batches']):>7}  "
            f"{attempts}"
        )
    print(
        f"\npersona API: {sum(api.calls.values())} calls, at most {api.max_in_flight} at once "
        "(the taskmill concurrency limit is 5)"
    )


if __name__ == "__main__":
    sys.exit(main())
