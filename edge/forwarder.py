"""Moves the outbox to the broker: in order, paced, and only what the broker acknowledged leaves.

Every escalation goes through here, online or not, so there is one path to test. A token bucket
caps the rate (its burst equals one second of rate, so normal traffic never waits) and a fleet
coming back online replays its backlog without flooding the bridge. A message is marked sent
only after the broker's PUBACK, and one owed an answer stays until the answer settles it: after
a reconnect, or when its answer is overdue, it goes again. A crash anywhere re-sends, which the
bridge's trace_id dedupe and the device's owed-answer table turn into exactly-once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from edgewire.config import OutboxSettings
from edgewire.metrics import Meter
from edgewire.ratelimit import TokenBucket
from edgewire.session import MqttSession, NotConnected

from .outbox import Outbox, QueuedEntry

log = logging.getLogger(__name__)

T = TypeVar("T")
OnExpired = Callable[[list[QueuedEntry]], Awaitable[None]]


class Forwarder:
    def __init__(
        self,
        outbox: Outbox,
        session: MqttSession,
        settings: OutboxSettings,
        meter: Meter,
        *,
        on_expired: OnExpired,
        io: ThreadPoolExecutor,
        window: int = 64,
        on_sent: Callable[[list[QueuedEntry], float], None] | None = None,
    ) -> None:
        """``on_sent``: told which requests were handed to the broker, and when (hop stamps)."""
        self.outbox = outbox
        self.session = session
        self.settings = settings
        self.meter = meter
        self._on_expired = on_expired
        self._io = io
        self._window = window
        self._on_sent = on_sent
        # Its burst is one second of its rate, so normal traffic never waits.
        rate = settings.replay_per_s
        self._bucket = TokenBucket.full(rate, max(rate, 1.0), time.monotonic())
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.forwarded = 0

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        """Outbox calls run on the one I/O thread: SQLite stays single-threaded, the loop free."""
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def link_back(self) -> None:
        """A new connection: whatever the broker took before may not have reached a bridge."""
        again = await self.db(lambda: self.outbox.resend())
        if again:
            log.info("%s: sending %d unanswered requests again after reconnecting", self.session.client_id, again)
        self.wake()

    def wake(self) -> None:
        self._idle.clear()
        self._wake.set()

    async def wait_empty(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def run(self) -> None:
        self.wake()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._expire()
                if not self.session.connected:
                    continue
                await self.db(functools.partial(self.outbox.resend, older_than_s=self.settings.resend_after_s))
            except Exception:  # a bug must not end the forwarding for good
                log.exception("%s: forwarder error", self.session.client_id)
                continue
            try:
                await self._drain()
            except NotConnected as exc:
                log.info("%s: replay paused, link down: %s", self.session.client_id, exc)
            except Exception:  # a bug must not end the forwarding for good
                log.exception("%s: forwarder error", self.session.client_id)

    async def _expire(self) -> None:
        deadlines = self.settings.late == "expire"
        gone = await self.db(lambda: self.outbox.expire(deadlines=deadlines))
        if gone:
            self.meter.inc("escalations_expired_total", len(gone))
            await self._on_expired(gone)

    async def _drain(self) -> None:
        while True:
            items = await self.db(self.outbox.peek, self._window)
            self.meter.set("outbox_depth", len(self.outbox))
            if not items:
                self._idle.set()
                return
            delay = self._bucket.pace(len(items), time.monotonic())
            if delay > 0:
                await asyncio.sleep(delay)
            if self._on_sent is not None:
                self._on_sent(items, time.time())
            try:
                await asyncio.wait_for(self.session.publish_many([(i.topic, i.payload) for i in items], qos=1), 10.0)
            except asyncio.TimeoutError:
                raise NotConnected(f"{len(items)} queued messages not acknowledged within 10 s") from None
            await self.db(self.outbox.sent, [i.id for i in items])
            self.forwarded += len(items)
            self.meter.inc("outbox_forwarded_total", len(items))
