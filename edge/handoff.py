"""Work handed to a thread pool, its result handed back to the event loop.

``loop.run_in_executor`` chains a concurrent future to an asyncio future (callbacks both ways,
a state copy, a lock) for every call. The device hands one micro-batch to its workers every few
milliseconds on a two-core board, where that bookkeeping is time taken from decoding; here a
call costs one asyncio future and one thread-safe callback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")


def run_on(executor: Executor, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Run ``fn(*args)`` on ``executor``; the future settles on the running loop with its result
    or its exception. Cancelling the future does not stop work already started."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine, as run_in_executor does
            loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    executor.submit(work)
    return future


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)
