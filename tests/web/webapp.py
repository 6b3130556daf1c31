"""The app the web tests serve: a few tasks covering what the API shows and hides."""

from __future__ import annotations

from typing import Any

from taskmill import App


def build_app(url: str, **settings: Any) -> App:
    """An app on ``url`` with the tasks the web tests send (``settings``: App's)."""
    app = App(url, **settings)

    @app.task(name="math.add")
    def add(a: int, b: int) -> int:
        return a + b

    @app.task(name="text.echo", queue="text")
    def echo(text: str) -> str:
        return text

    @app.task(name="auth.login", retries=0)
    def login(user: str, password: str) -> dict[str, str]:
        if user == "nobody":
            raise PermissionError(f"wrong password {password!r} for {user}")
        return {"user": user, "session_token": "s3ss10n-t0k3n"}

    @app.task(name="ops.fail", retries=0)
    def fail() -> None:
        raise RuntimeError("boom")

    app.periodic(cron="0 2 * * *", args=(1, 2), name="nightly-add")(add)
    return app
