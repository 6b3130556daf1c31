"""Settings of the test project: Django's database and taskmill's broker come from the
environment the test sets."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

SECRET_KEY = "only for the tests"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["shop"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"


def _database(where: str) -> dict[str, object]:
    """A SQLite file, or a ``postgresql://user@host:port/name`` URL."""
    if not where.startswith("postgresql://"):
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": where}
    url = urlsplit(where)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": url.path.lstrip("/"),
        "USER": url.username,
        "HOST": url.hostname,
        "PORT": url.port,
    }


DATABASES = {"default": _database(os.environ["DJANGO_DB"])}

ENQUEUE = os.environ.get("TASKMILL_ENQUEUE", "now")  # now, on_commit or in_transaction

TASKS = {
    "default": {
        "BACKEND": "taskmill.integrations.django.TaskmillBackend",
        "QUEUES": ["default", "mail"],
        "OPTIONS": {
            "url": os.environ["TASKMILL_URL"],
            "enqueue_on_commit": ENQUEUE == "on_commit",
            "enqueue_in_transaction": ENQUEUE == "in_transaction",
            "retries": int(os.environ.get("TASKMILL_RETRIES", "0")),
            "backoff": 0.2,
            "lease_s": 5.0,
        },
    },
}
