"""``python -m examples.task_tracker``: the whole Task Tracker on one machine.

1. start ``nats-server`` with JetStream (unless ``--url`` names a running one), the fake
   scoring model (latency, and a share of 500s and 429s: ``--error-rate``), and ``--workers``
   ``taskmill worker`` processes (each drains for 30 s on SIGTERM);
2. serve the web app at http://127.0.0.1:8000/ (``--port``): send messages there, watch their
   pipeline live, retry failed ones, and open taskmill's dashboard at ``/taskmill/``;
3. send a few sample messages through the webhook, one of which the model refuses once;
4. Ctrl-C: the server stops, the workers drain, a summary of the messages is printed.

``python -m examples.task_tracker web`` serves only the web app, and ``... model`` only the
fake model, configured by the environment (``settings.py``): the end-to-end tests start
them so, with ``taskmill worker examples.task_tracker.tasks:app``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import uvicorn

from examples._support.processes import ROOT, child_env, stop
from examples._support.servers import ThrowawayNats
from examples.task_tracker.model_service import Fault, ModelService, ModelState

NATS_HINT = "or give the URL of a running server with --url nats://host:4222"
SAMPLES = [
    ("alice", "Decision: the release deadline moves to Friday, customer agreed"),
    ("bob", "lol"),
    ("carol", "Incident: the payment outage was a bug in the retry budget"),
    ("dave", "anyone up for lunch?"),
    ("erin", "Security review before we migrate the customer database"),
    ("frank", "gibberish the model refuses once: the launch budget"),
]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.command == "web":
        return serve_web(args.host, args.port)
    if args.command == "model":
        return serve_model(args.port, ModelState(args.latency_s, args.error_rate))
    return run_all(args)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m examples.task_tracker")
    parser.add_argument("command", nargs="?", default="all", choices=["all", "web", "model"])
    parser.add_argument("--url", help="a running NATS server (default: start one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--error-rate", type=float, default=0.15,
                        help="share of model calls that fail with a 500 or a 429")  # fmt: skip
    parser.add_argument("--latency-s", type=latency, default=(0.05, 0.5), metavar="MIN:MAX",
                        help="the model's latency, at random between the two")  # fmt: skip
    parser.add_argument("--no-samples", action="store_true", help="send no sample messages")
    return parser.parse_args(argv)


def latency(text: str) -> tuple[float, float]:
    low, _, high = text.partition(":")
    try:
        bounds = (float(low), float(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN:MAX in seconds") from None
    if not 0 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: want 0 <= MIN <= MAX")
    return bounds


def serve_web(host: str, port: int) -> int:
    # a WebSocket left open must not hold the shutdown (and the drain after it) for ever
    config = uvicorn.Config("examples.task_tracker.web:api", host=host, port=port,
                            timeout_graceful_shutdown=5, log_level="warning")  # fmt: skip
    uvicorn.Server(config).run()
    return 0


def serve_model(port: int, state: ModelState) -> int:
    service = ModelService(state, port=port).start()
    print(f"fake model at {service.url}", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    with contextlib.suppress(KeyboardInterrupt):
        stopped.wait()
    service.stop()
    return 0


def run_all(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="task-tracker-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        url = args.url or stack.enter_context(ThrowawayNats(workdir / "nats", hint=NATS_HINT)).url
        model = ModelState(latency_s=args.latency_s, error_rate=args.error_rate)
        model.faults.append(Fault(match="gibberish", status=422, times=1))
        service = stack.enter_context(ModelService(model))
        os.environ.update(
            TASKMILL_URL=url,
            TASK_TRACKER_MODEL_URL=service.url,
            TASK_TRACKER_DB=str(workdir / "messages.db"),
        )
        workers = start_workers(args.workers, workdir / "workers.log")
        stack.callback(stop_workers, workers)
        base = f"http://{args.host}:{args.port}"
        print(
            f"Task Tracker: NATS at {url}, {args.workers} worker process(es), fake model at "
            f"{service.url}\n  open {base}/  (the dashboard: {base}/taskmill/)\n"
            f"  worker logs: {workdir / 'workers.log'}\n  Ctrl-C to stop",
            flush=True,
        )
        if not args.no_samples:
            threading.Thread(target=send_samples, args=(base,), daemon=True).start()
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn raises Ctrl-C again when done
            serve_web(args.host, args.port)
        print("stopping: the workers drain (up to 30 s)...", flush=True)
        stop_workers(workers)
        summary(str(workdir / "messages.db"))
    return 0


def start_workers(n: int, log_path: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "taskmill", "worker", "examples.task_tracker.tasks:app",
            "-p", str(n), "-c", "8", "--drain-timeout", "30", "--log-level", "warning"]  # fmt: skip
    with open(log_path, "ab") as log:
        # a session of their own: Ctrl-C in the terminal reaches this process only, which then
        # sends one SIGTERM (a second signal would make them stop without draining)
        return subprocess.Popen(
            argv, cwd=ROOT, env=child_env(drop_prefixes=()), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def stop_workers(workers: subprocess.Popen[bytes]) -> None:
    stop(workers, timeout_s=40)  # SIGTERM: they drain, and running jobs get 30 s to finish


def send_samples(base: str) -> None:
    deadline = time.monotonic() + 30
    for n, (author, text) in enumerate(SAMPLES, 1):
        body = json.dumps({"chat_id": 1, "message_id": n, "author": author, "text": text})
        request = urllib.request.Request(f"{base}/webhook/telegram", data=body.encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        while True:  # the server may still be starting
            try:
                urllib.request.urlopen(request, timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.2)


def summary(db_path: str) -> None:
    if not Path(db_path).exists():
        return
    from examples.task_tracker.store import MessageStore

    messages = MessageStore(db_path).latest(limit=1000)
    classes = Counter(m["classification"] or "not scored" for m in messages)
    extracted = sum(1 for m in messages if m["topics"] is not None)
    print(f"{len(messages)} message(s): " + ", ".join(f"{n} {c}" for c, n in classes.items())
          + f"; knowledge extracted from {extracted}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
