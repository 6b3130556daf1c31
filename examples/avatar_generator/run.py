"""Starting the pieces: worker processes (``flask ... taskmill worker``) and the web server on a
loopback port. Used by ``python -m examples.avatar_generator`` and by its end-to-end test."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import IO, Any

from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from examples._support.processes import ROOT, child_env, kill, stop_all

FACTORY = "examples.avatar_generator.web:create_app"


class Workers:
    """``flask --app ... taskmill worker`` processes, each in a session of its own (a kill
    takes its children too), configured by ``FLASK_*`` variables as ``create_app`` reads them."""

    def __init__(self, log_dir: Path, config: dict[str, Any]) -> None:
        self.log_dir = log_dir
        self.env = child_env(
            {
                f"FLASK_{key}": value if isinstance(value, str) else json.dumps(value)
                for key, value in config.items()
            }
        )
        self.procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"worker-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", FACTORY, "taskmill", "worker", *args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
        self.procs.append((proc, log))
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL: no drain, no sign-off; its jobs come back when their leases expire."""
        kill(proc, group=True)

    def output(self) -> str:
        logs = sorted(self.log_dir.glob("worker-*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in logs)

    def stop(self, timeout: float = 30) -> list[int | None]:
        """SIGTERM every worker (they drain), wait, SIGKILL the ones still there."""
        codes = stop_all([proc for proc, _ in self.procs], timeout_s=timeout)
        for _, log in self.procs:
            log.close()
        return codes


class Server:
    """The Flask app served by werkzeug on a loopback port, on a thread."""

    def __init__(self, app: Flask, port: int = 0) -> None:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        self._server: BaseWSGIServer = make_server("127.0.0.1", port, app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> Server:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def call(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """One JSON request: its status and decoded body (errors included, not raised)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    req.add_header("Accept", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as answer:
            text = answer.read().decode()
            is_json = answer.headers.get_content_type() == "application/json"
            return answer.status, json.loads(text) if is_json else text
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        is_json = exc.headers.get_content_type() == "application/json"
        return exc.code, json.loads(text) if is_json else text
