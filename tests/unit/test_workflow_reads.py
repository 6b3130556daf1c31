"""What a workflow's advance costs the job store: one read for all its steps."""

from __future__ import annotations

from collections.abc import Sequence

from taskmill import App, chain, group
from taskmill.brokers.memory import MemoryBroker
from taskmill.job import Job
from taskmill.testing import running_worker
from taskmill.workflows import advance


class CountingReads(MemoryBroker):
    """Counts the calls that read jobs by id."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0
        self.get_manys: list[int] = []

    async def get(self, job_id: str) -> Job | None:
        self.gets += 1
        return await super().get(job_id)

    async def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        self.get_manys.append(len(job_ids))
        return await super().get_many(job_ids)


def test_an_advance_reads_every_step_in_one_call() -> None:
    broker = CountingReads()
    app = App("memory://")
    app.client.use_broker(broker)

    @app.task(name="wf.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="wf.total")
    def total(values: list[int]) -> int:
        return sum(values)

    try:
        workflow = chain(group([add.s(1, 1), add.s(2, 2), add.s(3, 3)]), total.s()).send(app)
        with running_worker(app):
            assert workflow.result(timeout=10) == 12
        broker.gets, broker.get_manys = 0, []
        assert app.run_sync(advance(app, workflow.id)) == "succeeded"
        assert broker.gets == 0, "no step is read on its own"
        assert broker.get_manys == [4], "the four steps are read in one call"
    finally:
        app.close()
