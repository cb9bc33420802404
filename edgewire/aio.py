"""asyncio helpers the components share."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


def spawn(jobs: set[asyncio.Future[Any]], work: Awaitable[T]) -> asyncio.Future[T]:
    """Run ``work`` in the background, held in ``jobs`` until it ends: the event loop keeps only
    a weak reference to a task, so one nobody holds can vanish mid-run. Whoever owns ``jobs``
    waits for them (or cancels them) when it stops."""
    job = asyncio.ensure_future(work)
    jobs.add(job)
    job.add_done_callback(jobs.discard)
    return job


async def cancel_and_wait(*tasks: asyncio.Future[object] | None) -> None:
    """Cancel tasks and wait until they have really ended.

    On Python 3.10 and 3.11, ``asyncio.wait_for`` can swallow a cancellation that lands in the
    same loop iteration as the awaited result (fixed in 3.12), and aiomqtt awaits every QoS 1
    acknowledgement through it; a task cancelled once may then run on. So ask again until done.
    """
    pending = {t for t in tasks if t is not None and not t.done()}
    for task in pending:
        task.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=0.1)
        for task in pending:
            task.cancel()
    for task in tasks:
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # retrieved: an error at shutdown is not worth a warning


def settle_heap() -> None:
    """Put every object alive now out of the garbage collector's reach, for good.

    What imports and start-up leave behind (modules, classes, pydantic schemas, loaded models)
    lives as long as the process. A service that then allocates short-lived objects for every
    message triggers full collections that walk all of it again and again: measured on a model
    push, a quarter of the pusher's CPU went to that. Frozen, they are never walked again.
    """
    gc.collect()
    gc.freeze()
