"""taskmill's web side: a dashboard with actions, an HTTP API, health and Prometheus metrics,
as one ASGI application (install the ``web`` extra: ``pip install 'taskmill[web]'``).

>>> from taskmill import App
>>> from taskmill.web import WebConfig, create_app
>>> app = App("memory://")
>>> asgi = create_app(app, WebConfig(users={"admin": "a long secret"}))
>>> "/api/v1/queues" in {route.path for route in asgi.routes}
True
>>> app.close()

Run it with ``taskmill dashboard myapp:app``, or mount it in a Starlette/FastAPI app or
Django's ``asgi.py`` under a prefix (``docs/dashboard.md``).
"""

from taskmill.web.app import create_app
from taskmill.web.config import User, WebConfig

__all__ = ["User", "WebConfig", "create_app"]
