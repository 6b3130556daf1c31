"""Settings of the test project: Django's database and taskmill's broker come from the
environment the test sets."""

from __future__ import annotations

import os

SECRET_KEY = "only for the tests"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["shop"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["DJANGO_DB"]},
}

TASKS = {
    "default": {
        "BACKEND": "taskmill.integrations.django.TaskmillBackend",
        "QUEUES": ["default", "mail"],
        "OPTIONS": {
            "url": os.environ["TASKMILL_URL"],
            "enqueue_on_commit": os.environ.get("TASKMILL_ON_COMMIT") == "1",
            "retries": int(os.environ.get("TASKMILL_RETRIES", "0")),
            "backoff": 0.2,
            "lease_s": 5.0,
        },
    },
}
