"""Work handed to a thread pool, its result handed back to the event loop.

``loop.run_in_executor`` chains a concurrent future to an asyncio future (callbacks both ways,
a state copy, a lock) for every call. The device hands one micro-batch to its workers every few
milliseconds on a two-core board, where that bookkeeping is time taken from decoding; here a
call costs one asyncio future, and results that finish while the loop has not yet woken for an
earlier one ride on that wake-up: a loop that is slow to get a core (a busy device) is woken
once for several batches, not once each.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")

_Outcome = tuple["asyncio.Future[Any]", Any, "BaseException | None"]


class _Settler:
    """Outcomes waiting to be settled on one loop, and whether a wake-up is on its way."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._ready: list[_Outcome] = []

    def put(self, future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
        """From a worker thread: settle ``future`` on the loop."""
        with self._lock:
            self._ready.append((future, result, exc))
            if len(self._ready) > 1:
                return  # the loop is already asked to settle the ones before, and takes this too
        self._loop.call_soon_threadsafe(self._settle_ready)

    def _settle_ready(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for future, result, exc in ready:
            _settle(future, result, exc)


_SETTLERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Settler] = weakref.WeakKeyDictionary()


def run_on(executor: Executor, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Run ``fn(*args)`` on ``executor``; the future settles on the running loop with its result
    or its exception. Cancelling the future does not stop work already started."""
    loop = asyncio.get_running_loop()
    settler = _SETTLERS.get(loop)
    if settler is None:
        settler = _SETTLERS[loop] = _Settler(loop)
    future: asyncio.Future[T] = loop.create_future()

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine, as run_in_executor does
            settler.put(future, None, exc)
        else:
            settler.put(future, result, None)

    executor.submit(work)
    return future


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)
