"""Result messages handed to the MQTT client without waiting for each one's write.

Waiting for every batch's message to leave the socket before finishing the next batch costs
the event loop two or three passes per batch, and leaves each message to its own write. Here
up to ``size`` messages may be queued unwritten: a burst goes out together, and a link slower
than the device still holds the pipeline back (the oldest write is awaited once the window is
full), so nothing piles up in the client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from edgewire.metrics import Meter
from edgewire.session import MqttSession, NotConnected


class WriteWindow:
    def __init__(self, session: MqttSession, meter: Meter, size: int) -> None:
        self.session = session
        self.meter = meter
        self.size = size
        self._unwritten: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        """Messages handed over whose write has not been seen finished yet."""
        return len(self._unwritten)

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        """Publish as ``MqttSession.publish`` does, returning once the window has room."""
        if self.offer(topic, payload, qos):
            while len(self._unwritten) > self.size:
                with contextlib.suppress(Exception):  # counted by _written
                    await self._unwritten[0]
                self._unwritten.popleft()
            return
        await self.session.publish(topic, payload, qos=qos)  # the session's own rules when down

    def offer(self, topic: str, payload: bytes, qos: int) -> bool:
        """Hand the message over without waiting, if the link is up (False: nothing was done).
        The window may be over full afterwards: :meth:`publish` waits for room, a caller that
        cannot wait (a timer) lets the next publish do it."""
        session = self.session
        if not session.connected:
            return False
        try:
            written = session.publish_soon(topic, payload, qos=qos)
        except NotConnected:
            return False
        written.add_done_callback(self._written)
        unwritten = self._unwritten
        unwritten.append(written)
        while unwritten and unwritten[0].done():
            unwritten.popleft()
        return True

    async def drain(self) -> None:
        """Wait until every message handed over is written (or lost with the link)."""
        while self._unwritten:
            with contextlib.suppress(Exception):
                await self._unwritten[0]
            self._unwritten.popleft()

    def _written(self, written: asyncio.Future[None]) -> None:
        if not written.cancelled() and written.exception() is not None:
            self.meter.inc("publish_dropped_total")
