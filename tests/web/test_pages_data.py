"""What the pages compute from the admin API, without a server: arguments by name, the
throughput of the last hour and its chart."""

from __future__ import annotations

import asyncio

from taskmill import App
from taskmill.web.pages_data import (
    Throughput,
    chart,
    named_arguments,
    throughput,
)


def test_positional_arguments_are_named_by_the_signature() -> None:
    app = App("memory://")

    @app.task(name="t.many")
    def many(first: int, *rest: int, flag: bool = False) -> None: ...

    job = app.get_job(many.send(1, 2, 3, flag=True).id)
    assert named_arguments(app, job) == {"first": 1, "rest[0]": 2, "rest[1]": 3, "flag": True}
    other = App("memory://")  # an app without the task: positions stand in for names
    assert named_arguments(other, job) == {"#0": 1, "#1": 2, "#2": 3, "flag": True}
    app.close()
    other.close()


def test_the_chart_scales_to_the_busiest_minute() -> None:
    data = Throughput(start=0.0, succeeded=[0, 3, 1], failed=[0, 1, 0])
    drawn = chart(data, width=300, height=100)
    assert drawn.peak == 4
    empty, busy, calm = drawn.bars
    assert (empty.ok_height, empty.failed_height) == (0, 0)
    assert (busy.ok_height, busy.failed_height, busy.failed_y) == (75, 25, 0)
    assert (calm.ok_y, calm.ok_height) == (75, 25)
    assert busy.label == "1 min ago: 3 succeeded, 1 failed"
    assert chart(Throughput(0.0, [0], [0])).peak == 0  # no job: no division by zero


def test_throughput_counts_the_last_hour_by_minute() -> None:
    app = App("memory://")

    @app.task(name="t.ok")
    def ok() -> None: ...

    @app.task(name="t.bad", retries=0)
    def bad() -> None:
        raise ValueError("no")

    ok.send_many([() for _ in range(5)])
    bad.send()
    app.run_until_idle()
    now = app.now()
    counted = asyncio.run(throughput(app, now))
    assert (sum(counted.succeeded), sum(counted.failed)) == (5, 1)
    assert counted.succeeded[-1] + counted.succeeded[-2] == 5  # this minute (or the last)
    app.close()
