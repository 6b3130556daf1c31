"""The dashboard mounted in a Django project's ``asgi.py`` as docs/dashboard.md shows it:
Starlette routes ``/tasks`` to the dashboard and everything else to Django."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.urls import path
from starlette.applications import Starlette
from starlette.routing import Mount

from asgi_server import serving
from taskmill import App, JobState
from taskmill.web import WebConfig, create_app

ADMIN = ("ops", "a long secret")
AUTH = WebConfig(users=dict([ADMIN]))


def home(request: HttpRequest) -> HttpResponse:
    return HttpResponse(f"the django site at {request.path}")


urlpatterns = [path("", home), path("shop/", home)]


def _django_application() -> Any:
    """Django's ASGI application, its settings those of a minimal project (this module is its
    URLconf)."""
    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="only for this test",
            ALLOWED_HOSTS=["127.0.0.1"],
            ROOT_URLCONF=__name__,
            INSTALLED_APPS=[],
            MIDDLEWARE=[],
        )
    from django.core.asgi import get_asgi_application

    return get_asgi_application()


@pytest.fixture
def project(tmp_path: Path) -> Iterator[tuple[App, str]]:
    tasks = App("sqlite:///" + str(tmp_path / "jobs.db"))

    @tasks.task(name="shop.ship", retries=0)
    def ship(order_id: int) -> None:
        raise RuntimeError("no courier")

    application = Starlette(  # what the docs put in asgi.py
        routes=[
            Mount("/tasks", app=create_app(tasks, AUTH)),
            Mount("/", app=_django_application()),
        ]
    )
    try:
        with serving(application) as base:
            yield tasks, base
    finally:
        tasks.close()


def test_the_dashboard_beside_django(project: tuple[App, str]) -> None:
    tasks, base = project
    failed = tasks.tasks["shop.ship"].send(7).id
    tasks.run_until_idle()
    with httpx.Client(base_url=base, auth=ADMIN, timeout=10) as client:
        assert client.get("/").text == "the django site at /"
        assert client.get("/shop/").text == "the django site at /shop/"
        overview = client.get("/tasks/")
        assert overview.status_code == 200 and f'href="{base}/tasks/jobs"' in overview.text
        page = client.get(f"/tasks/job?id={failed}")
        assert page.status_code == 200 and "RuntimeError" in page.text
        assert f'action="{base}/tasks/actions/retry"' in page.text
        retried = client.post(
            "/tasks/actions/retry", data={"id": failed, "next": f"{base}/tasks/job?id={failed}"}
        )
        assert retried.status_code == 303
        assert retried.headers["location"] == f"{base}/tasks/job?id={failed}&done=retried&n=1"
    assert tasks.get_job(failed).state is JobState.QUEUED
