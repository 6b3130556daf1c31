"""Which runner a worker's ``pool`` means: where its tasks' functions run.

``async`` runs them on the worker's event loop (sync tasks inline), ``thread`` on a pool of
``concurrency`` threads (``pools.py``), ``process`` in child processes that load the app by
its ``module:app`` path (``process_pool.py``, imported only then: it brings multiprocessing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from taskmill.worker.pools import InlineRunner, Runner, ThreadRunner

if TYPE_CHECKING:
    from taskmill.hooks import Instrumentation

PoolKind = Literal["async", "thread", "process"]

__all__ = ["PoolKind", "make_runner"]


def make_runner(
    pool: PoolKind,
    concurrency: int,
    *,
    app_path: str | None,
    max_tasks_per_child: int | None,
    instrumentations: Sequence[Instrumentation],
) -> Runner:
    """A runner for ``pool``; ``process`` needs ``app_path`` (``module:app``)."""
    if pool == "process":
        from taskmill.worker.process_pool import ProcessRunner

        if app_path is None:
            raise ValueError("pool='process' needs app_path ('module:app') for the children")
        return ProcessRunner(app_path, concurrency, max_tasks_per_child, instrumentations)
    if pool == "async":
        return InlineRunner()
    return ThreadRunner(concurrency)
