"""``taskmill dashboard web.dashboard_app:app`` in the CLI tests: the test app on the broker
``TASKMILL_URL`` names."""

from __future__ import annotations

import os

from web.webapp import build_app

app = build_app(os.environ["TASKMILL_URL"])
