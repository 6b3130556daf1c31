"""taskmill in other people's frameworks: FastAPI/Starlette, Flask, Django's tasks framework,
OpenTelemetry. Each module imports its framework, installed by its extra
(``pip install 'taskmill[fastapi]'`` and so on); this package imports none of them itself.

This layer sits on top: it may import everything in taskmill, and nothing in taskmill
imports it (``docs/architecture.md``, the dependency rule).
"""
