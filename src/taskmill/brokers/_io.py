"""Where a network broker's coroutines run: on an attached worker loop, or on its own I/O loop.

Redis and PostgreSQL clients are bound to the event loop that opened them. A worker attaches
its loop and gets connections of its own (no thread hop on the hot path); every other caller
(a producer's portal, a test's loop, a dashboard) is sent over to the broker's I/O loop.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class LoopBound(Protocol):
    @property
    def _attached(self) -> set[asyncio.AbstractEventLoop]: ...

    def _io_loop(self) -> asyncio.AbstractEventLoop: ...


B = TypeVar("B", bound=LoopBound)


def on_io_loop(
    method: Callable[Concatenate[B, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[B, P], Coroutine[Any, Any, T]]:
    """Run the method on the broker's I/O loop, unless the caller is an attached worker loop."""

    @functools.wraps(method)
    async def run(self: B, /, *args: P.args, **kwargs: P.kwargs) -> T:
        caller = asyncio.get_running_loop()
        if caller in self._attached:
            return await method(self, *args, **kwargs)
        io = self._io_loop()
        if caller is io:
            return await method(self, *args, **kwargs)
        future = asyncio.run_coroutine_threadsafe(method(self, *args, **kwargs), io)
        return await asyncio.wrap_future(future)

    return run
