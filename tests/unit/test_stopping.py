"""The stop request (``worker/stopping.py``): any thread may make it, the loop hears of it."""

from __future__ import annotations

import asyncio
import threading

from taskmill.worker.stopping import Stop


async def test_a_request_from_another_thread_wakes_the_workers_loop() -> None:
    woken = asyncio.Event()
    stop = Stop(wake=woken.set)
    stop.loop = asyncio.get_running_loop()
    thread = threading.Thread(target=stop.request)
    thread.start()
    thread.join(timeout=5)
    async with asyncio.timeout(5):
        await woken.wait()
    assert stop.requested and not stop.now  # the first request drains
    stop.request()
    assert stop.now  # the second stops at once


async def test_without_a_wake_the_request_sets_the_event() -> None:
    stop = Stop()
    stop.loop = asyncio.get_running_loop()
    stop.request()
    async with asyncio.timeout(5):
        await stop.wait()


def test_before_the_loop_is_known_a_request_only_sets_the_flags() -> None:
    stop = Stop()
    stop.request()
    assert stop.requested and not stop.is_set()  # Worker.run sets the event when it starts


def test_a_request_after_the_loop_closed_is_kept() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    stop = Stop()
    stop.loop = loop
    stop.request()
    assert stop.requested
