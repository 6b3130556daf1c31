"""The app of the security tests' worker processes (``security.canary_app:app``; URL from
``TASKMILL_URL``): tasks that take a secret argument (``password``, a name the dashboard
redacts) and succeed, fail, or fail once and then succeed on their retry. No task quotes its
secret in an error: what the tests look for is taskmill itself showing it."""

from __future__ import annotations

import os

from taskmill import App, current_job


def build(url: str) -> App:
    app = App(url, events=True)

    @app.task(name="sec.ok")
    def ok(n: int, password: str) -> dict[str, int]:
        return {"n": n, "length": len(password)}

    @app.task(name="sec.fail", retries=0)
    def fail(n: int, password: str) -> None:
        raise ValueError(f"job {n} failed on purpose (a secret of {len(password)} characters)")

    @app.task(name="sec.flaky", retries=1, backoff=0.05)
    def flaky(n: int, password: str) -> int:
        if current_job().attempt == 1:
            raise ConnectionError(f"job {n}: first attempt fails, the retry succeeds")
        return n

    return app


app = build(os.environ.get("TASKMILL_URL", "memory://"))
