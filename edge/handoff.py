"""Work handed to a thread pool, its result handed back to the event loop.

``loop.run_in_executor`` chains a concurrent future to an asyncio future (callbacks both ways,
a state copy, a lock) for every call. The device hands one micro-batch to its workers every few
milliseconds on a two-core board, where that bookkeeping is time taken from decoding; here a
call costs one asyncio future, and results that finish while the loop has not yet woken for an
earlier one ride on that wake-up: a loop that is slow to get a core (a busy device) is woken
once for several results, not once each.

Each wake-up has a price beyond its own work: the loop takes the interpreter for as long as it
handles what came back, and a worker that has just finished a batch, about to start its next,
waits for it; and every wake-up takes a core from a worker on a board with no core to spare.
So a caller that keeps several batches in flight may ask (``together=n``) for a finished result
to wait until ``n`` results of the same executor are ready, unless nothing else of it is in
flight or a wake-up is already due: the loop wakes once per ``n`` batches, at the cost of a
result sitting ``n - 1`` batch times at most. Work run that way must never wait for the loop to
take an earlier result.

The work itself may run on any executor, or on :class:`Workers`: ``ThreadPoolExecutor.submit``
builds a concurrent future (a condition and its lock) and a work item and takes an idle
semaphore for every call, and its worker settles that future under the condition again, which
costs more than the handoff itself. Work handed over by :func:`run_on` reports through the
handoff alone, so a queue of callables and threads that take from it are all it needs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Submits(Protocol):
    """Where work runs: an ``Executor``, or :class:`Workers`."""

    def submit(self, fn: Callable[[], Any], /) -> object: ...


class Workers:
    """``count`` threads, started with the first work, taking callables from one queue in order.

    What a callable raises is logged and the thread goes on (work run by :func:`run_on` hands its
    own exceptions to the loop). :meth:`shutdown` lets the work already queued finish first, as
    an executor's does."""

    def __init__(self, count: int, name: str) -> None:
        self.count = count
        self.name = name
        self._queue: queue.SimpleQueue[Callable[[], Any] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, fn: Callable[[], Any], /) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name}: cannot take work after shutdown")
        if not self._threads:
            self._threads = [
                threading.Thread(target=self._serve, name=f"{self.name}_{i}", daemon=True) for i in range(self.count)
            ]
            for thread in self._threads:
                thread.start()
        self._queue.put(fn)

    def shutdown(self, wait: bool = True) -> None:
        """Stop taking work; the threads end once the work queued before is done."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()

    def _serve(self) -> None:
        take = self._queue.get
        while (fn := take()) is not None:
            try:
                fn()
            except Exception:
                log.exception("%s: work failed", self.name)


_Outcome = tuple["asyncio.Future[Any]", Any, "BaseException | None"]


class _Settler:
    """Outcomes of one executor's work waiting to be settled on one loop, how much of that work
    is still in flight, and whether the loop is already asked to settle."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._ready: list[_Outcome] = []
        self._in_flight = 0
        self._asked = False

    def started(self) -> None:
        with self._lock:
            self._in_flight += 1

    def put(self, future: asyncio.Future[Any], result: Any, exc: BaseException | None, together: int) -> None:
        """From a worker thread: settle ``future`` on the loop."""
        with self._lock:
            self._ready.append((future, result, exc))
            self._in_flight -= 1
            if self._asked:
                return  # the loop is already asked to settle the ones before, and takes this too
            if self._in_flight and len(self._ready) < together:
                return  # a later result asks for them all
            self._asked = True
        self.loop.call_soon_threadsafe(self._settle_ready)

    def _settle_ready(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
            self._asked = False
        for future, result, exc in ready:
            _settle(future, result, exc)


_SETTLERS: weakref.WeakKeyDictionary[Submits, _Settler] = weakref.WeakKeyDictionary()


def run_on(executor: Submits, fn: Callable[..., T], *args: Any, together: int = 1) -> asyncio.Future[T]:
    """Run ``fn(*args)`` on ``executor``; the future settles on the running loop with its result
    or its exception. Cancelling the future does not stop work already started. ``together``:
    settle once that many results of the same executor are ready, or none of its work is left
    in flight."""
    loop = asyncio.get_running_loop()
    settler = _SETTLERS.get(executor)
    if settler is None or settler.loop is not loop:
        settler = _SETTLERS[executor] = _Settler(loop)
    future: asyncio.Future[T] = loop.create_future()

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine, as run_in_executor does
            settler.put(future, None, exc, together)
        else:
            settler.put(future, result, None, together)

    settler.started()
    executor.submit(work)
    return future


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)
