"""Who a NATS send wakes (docs/brokers.md, "Wake-ups, events, pauses").

An idle worker keeps a long pull open on each of its lanes, so a job's pointer reaches it with
no other message; only a wait that holds no long pull (``run_until_idle``'s) listens for the
jobs made ready. Before, every send woke every idle worker process, each of which then claimed
and found nothing, in the middle of the new job's claim. A worker whose long pulls went with
the server (a restart) sends new ones as soon as it is reconnected.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from servers import NatsServer
from taskmill import App
from taskmill.testing import await_until, wait_until

from .support import nats_lanes_made, nats_url, on_io_loop

pytestmark = pytest.mark.timeout(60)


def test_a_send_does_not_wake_a_wait_that_holds_long_pulls(nats_server: NatsServer) -> None:
    """A wait that takes hand-overs, on queue ``a``, while a job is sent to queue ``b``: the
    send's announcement does not reach it, only a wake-up sent after it as a marker does
    (messages of one subscription arrive in order, so an announcement on the wake-up subject
    would have come first), and the session never subscribed to the announcements."""
    from taskmill.brokers.base import HandOver

    app = App(nats_url(nats_server.url))
    other = app.task(name="other", queue="b")(lambda: None)
    broker: Any = app.broker
    try:
        app.open()

        async def scenario() -> tuple[list[Any], int, Any]:
            session = await nats_lanes_made(broker, ["a", "b"])
            before = session.wake_version
            waiting = asyncio.ensure_future(broker.wait(["a"], 30.0, HandOver("w1", 30.0)))
            await other.asend()
            await broker._wake("b")  # the marker
            handed = await asyncio.wait_for(waiting, 10)
            return handed, session.wake_version - before, session.ready_sub

        handed, wake_ups, ready_sub = on_io_loop(app, scenario())
        assert handed == []  # ended by the marker, with nothing handed over
        assert wake_ups == 1, f"{wake_ups} wake-ups: the send's announcement woke the wait"
        assert ready_sub is None
    finally:
        app.close()


def test_a_wait_without_long_pulls_returns_when_a_job_is_made_ready(
    nats_server: NatsServer,
) -> None:
    """``run_until_idle``'s wait (no hand-over, no long pull): its first wait subscribes to the
    announcements and returns at once (a job made ready before the server had the subscription
    is then claimed), and a later one returns when a job is sent, long before its 30 s."""
    app = App(nats_url(nats_server.url))
    job = app.task(name="job", queue="a")(lambda: None)
    broker: Any = app.broker
    try:
        app.open()

        async def scenario() -> tuple[list[Any], list[Any], bool]:
            await nats_lanes_made(broker, ["a"])
            first = await asyncio.wait_for(broker.wait(["a"], 30.0), 10)
            waiting = asyncio.ensure_future(broker.wait(["a"], 30.0))
            await job.asend()
            second = await asyncio.wait_for(waiting, 10)
            session = await broker._session()
            return first, second, session.ready_version >= 1

        first, second, announced = on_io_loop(app, scenario())
        assert (first, second, announced) == ([], [], True)
    finally:
        app.close()


def test_a_wait_through_a_server_restart_returns_and_the_next_sends_a_new_long_pull(
    nats_server_own: NatsServer,
) -> None:
    """A wait that takes hand-overs (60 s) while the server restarts: its long pull is gone
    with the server, and sends no longer wake such a wait, so once reconnected it returns (the
    worker claims again) and the next wait sends a new long pull. Else an idle worker would
    take nothing until its wait ran out, unless a producer happened to make a lane again."""
    from taskmill.brokers.base import HandOver

    app = App(nats_url(nats_server_own.url))
    broker: Any = app.broker
    handover = HandOver("w1", 30.0)

    async def pulls_waiting() -> int:
        session = await broker._session()
        js = session.nc.jetstream()
        info = await js.consumer_info(broker.config.dispatch_stream, "a_p0")
        return int(info.num_waiting)

    try:
        app.open()
        waiting = on_io_loop(app, _start_wait(broker, handover))
        wait_until(lambda: on_io_loop(app, pulls_waiting()) == 1, timeout=10, what="a long pull")
        nats_server_own.restart(kill=True)  # a clean stop ends the pull, saying so

        async def after_the_restart() -> tuple[list[Any], int]:
            handed = await asyncio.wait_for(waiting, 15)
            assert await broker.claim(["a"], 1, "w1", 30.0) == []  # as the worker does next
            again = asyncio.ensure_future(broker.wait(["a"], 60.0, handover))
            await await_until(pulls_waiting, timeout=10, what="the new long pull")
            again.cancel()
            return handed, await pulls_waiting()

        handed, pulls = on_io_loop(app, after_the_restart())
        assert (handed, pulls) == ([], 1)
    finally:
        app.close()


async def _start_wait(broker: Any, handover: Any) -> asyncio.Future[list[Any]]:
    await nats_lanes_made(broker, ["a"])
    return asyncio.ensure_future(broker.wait(["a"], 60.0, handover))


def test_the_claim_after_a_hand_over_of_a_lanes_last_message_sends_no_pull(
    nats_server: NatsServer,
) -> None:
    """A job handed over to an idle worker's wait was its lane's only message: the worker's
    claim right after it (the claim loop's next step) sends no pull request, a round trip
    that could only find nothing. Another worker's claim, and the same worker's next one,
    pull as before; a job sent after the hand-over is claimed by that next claim."""
    from taskmill.brokers.base import HandOver

    app = App(nats_url(nats_server.url))
    job = app.task(name="job", queue="a")(lambda: None)
    broker: Any = app.broker
    try:
        app.open()

        async def scenario() -> tuple[int, list[int], list[str], str]:
            session = await nats_lanes_made(broker, ["a"])
            # pull requests are plain messages: one subscription sees those of this session
            requests = await session.nc.subscribe(
                f"$JS.API.CONSUMER.MSG.NEXT.{broker.config.dispatch_stream}.>"
            )

            async def pulls_sent() -> int:
                # the server routes a connection's messages in order and answers its PING
                # after them: what this session sent before is queued by the time it returns
                await session.nc.flush()
                return requests.pending_msgs

            waiting = asyncio.ensure_future(broker.wait(["a"], 30.0, HandOver("w1", 30.0)))
            await await_until(pulls_sent, timeout=10, what="the long pull")
            await job.asend()
            handed = await asyncio.wait_for(waiting, 10)
            counts = [await pulls_sent()]
            assert await broker.claim(["a"], 16, "w1", 30.0) == []
            counts.append(await pulls_sent())
            assert await broker.claim(["a"], 16, "w2", 30.0) == []
            counts.append(await pulls_sent())
            sent = await job.asend()
            claimed = await broker.claim(["a"], 16, "w1", 30.0)
            counts.append(await pulls_sent())
            await requests.unsubscribe()
            return len(handed), counts, [j.id for j in claimed], sent.id

        handed, counts, claimed, sent = on_io_loop(app, scenario())
        assert handed == 1
        assert counts[1] == counts[0], f"the claim after the hand-over pulled: {counts}"
        assert counts[2] > counts[1], f"another worker's claim must pull: {counts}"
        assert claimed == [sent] and counts[3] > counts[2], counts
    finally:
        app.close()
