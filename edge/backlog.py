"""Frames read from the source and not yet batched: bounded, filled and emptied a list at a time.

An ``asyncio.Queue`` costs a dozen Python calls per frame on each side, which on a two-core
device is time taken from decoding; here the source's chunk goes in with one ``extend`` and a
micro-batch comes out in one pass. One reader, one taker; the taker may take without waiting
(:meth:`Backlog.take_now`) whenever it has room for more work, and wait (:meth:`Backlog.arrival`)
only when it has nothing else to do.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .sources import Frame


class Backlog:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._frames: deque[Frame] = deque()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        #: Size of the chunk waiting to be put, while one waits.
        self._wanted = 0
        self._closed = False

    def __len__(self) -> int:
        return len(self._frames)

    async def put(self, frames: list[Frame]) -> None:
        """Add frames in order, once they fit (or the backlog is empty: a chunk larger than the
        limit is not held back forever)."""
        waiting = self._frames
        while waiting and len(waiting) + len(frames) > self.limit:
            self._wanted = len(frames)
            self._room.clear()
            await self._room.wait()
        self._wanted = 0
        waiting.extend(frames)
        if frames and not self._arrived.is_set():
            self._arrived.set()

    def close(self) -> None:
        """No more frames: the taker gets what is queued, then an empty batch."""
        self._closed = True
        self._arrived.set()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def drained(self) -> bool:
        """Closed, and every frame taken."""
        return self._closed and not self._frames

    async def take(self, most: int) -> list[Frame]:
        """The oldest frames, at least one and at most ``most``; empty once closed and drained."""
        while not self._frames:
            if self._closed:
                return []
            await self.arrival()
        return self.take_now(most)

    async def arrival(self) -> None:
        """Until frames are put or the backlog is closed; at once when frames wait or it is."""
        if self._frames or self._closed:
            return
        self._arrived.clear()
        await self._arrived.wait()

    def take_now(self, most: int) -> list[Frame]:
        """The oldest frames, at most ``most``, without waiting: empty when none are queued."""
        frames = self._frames
        count = min(most, len(frames))
        if not count:
            return []
        batch = [frames.popleft() for _ in range(count)]
        # The reader is woken once its chunk fits, not for every frame taken before then.
        if not self._room.is_set() and (not frames or len(frames) + self._wanted <= self.limit):
            self._room.set()
        return batch
