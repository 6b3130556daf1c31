"""Running jobs: the worker loop, the pools tasks run in, and the process supervisor."""

from taskmill.worker.worker import Worker

__all__ = ["Worker"]
