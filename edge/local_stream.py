"""The device's ``local/<device>`` results, at most one message per interval.

A paced camera finishes a batch every few tens of milliseconds, and each batch leaves at once as
its own message. A device working through a backlog finishes hundreds of batches a second; one
message each would cost the device a write and the broker a fan-out per batch, for monitors that
gain nothing from seeing them separately. So the first batch after a quiet interval goes out at
once, and the batches that follow within ``min_interval_s`` share the next message (bounded in
rows, so a message stays far below the LocalResults size limit). Order is kept: rows leave in the
order their batches finished.
"""

from __future__ import annotations

import asyncio

from .local_results import LocalRows, encode_packed
from .write_window import WriteWindow

#: Rows per message at most: a few hundred bytes each, far below LocalResults' 1 MiB limit.
MAX_ROWS = 256


class LocalStream:
    def __init__(
        self, window: WriteWindow, topic: str, qos: int, device_id: str, min_interval_s: float, max_rows: int = MAX_ROWS
    ) -> None:
        self.window = window
        self.topic = topic
        self.qos = qos
        self.device_id = device_id
        self.min_interval_s = min_interval_s
        self.max_rows = max_rows
        #: Rows waiting for the next message, as packed batches, and how many.
        self._parts: list[bytes] = []
        self._count = 0
        self._last_sent = float("-inf")
        self._timer: asyncio.TimerHandle | None = None
        self._timed: asyncio.Task[None] | None = None
        self.messages = 0

    def __len__(self) -> int:
        """Rows waiting for the next message."""
        return self._count

    async def add(self, rows: LocalRows) -> None:
        """Queue a batch's rows; they leave now when the interval since the last message has
        passed (or enough rows wait), else with the next message, at most ``min_interval_s`` on."""
        self._parts.append(rows.packed())
        self._count += len(rows)
        if self._timer is not None and self._count < self.max_rows:
            return  # the next message is already due
        loop = asyncio.get_running_loop()
        due = self._last_sent + self.min_interval_s
        if self._count >= self.max_rows or loop.time() >= due:
            await self.flush()
        else:
            self._timer = loop.call_at(due, self._on_due)

    async def flush(self) -> None:
        """Send whatever rows wait, as one message."""
        message = self._take()
        if message is not None:
            # The session takes the message before the first await: messages leave in call order.
            await self.window.publish(self.topic, message, self.qos)

    async def drain(self) -> None:
        """Send what waits and wait until every message is written (or lost with the link)."""
        await self.flush()
        if self._timed is not None:
            await self._timed
        await self.window.drain()

    def _take(self) -> bytes | None:
        """The waiting rows as one message, counted as sent; None when none wait."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        parts, count = self._parts, self._count
        self._parts, self._count = [], 0
        if not count:
            return None
        self._last_sent = asyncio.get_running_loop().time()
        self.messages += 1
        return encode_packed(self.device_id, parts, count)

    def _on_due(self) -> None:
        self._timer = None
        message = self._take()
        if message is not None and not self.window.offer(self.topic, message, self.qos):
            # The link is down: the session's own rules (wait, or drop and count) apply.
            self._timed = asyncio.ensure_future(self.window.publish(self.topic, message, self.qos))
