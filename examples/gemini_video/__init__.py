"""GeminiVideo's Celery fleet (seed 004) rebuilt on taskmill and Redis: worker pools with their
own queues and concurrency from one command, four periodic schedules, per-task time limits,
live progress, and the dashboard with a login. ``python -m examples.gemini_video`` runs it."""
