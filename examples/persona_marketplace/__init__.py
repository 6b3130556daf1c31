"""The persona marketplace (seed 002, Celery + Redis) on FastAPI and taskmill on Redis: see
README.md, and ``python -m examples.persona_marketplace``."""
