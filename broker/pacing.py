"""The embedded broker reads each device's connection no faster than the device's budget.

amqtt reads every packet a client sends as fast as it arrives and starts a task for each, all
on the broker's one event loop. One device flooding valid requests (6,000 a second from one
Python client) took that loop from every other client: a neighbour's p99 went from 7 ms to
98 ms, 14 times, even with the bridge no longer reading the flood (``bench/flood.py --broker
embedded``; paced at the defaults below, 1.12 times).
Refusing a message after reading it costs as much as carrying it; the one lever that costs the
flooder and not the fleet is to leave its connection unread while its budget is spent. The
kernel's buffers then fill and TCP stops the sender. Nothing is dropped: the device's own
traffic is late, no one else's.

The budget counts MQTT packets, not bytes or reads: a packet is what costs the broker, and a
device's honest traffic (its requests, its acknowledgements of chunks, its pings) is a few
packets a second. Only logins whose role is ``device`` are paced; the bridge, distributor,
operators and monitors speak for the whole fleet. A broker open to anonymous clients (the demo,
a lab) knows no roles and paces no one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from amqtt.adapters import ReaderAdapter

from edgewire.acl import Role
from edgewire.ratelimit import BucketsPerKey, TokenBucket

log = logging.getLogger(__name__)

#: A device's packets a second, after its burst. amqtt spends over half a millisecond of its one
#: loop on each request it carries (read, acknowledged, routed, answered), so one device at this
#: rate takes under a tenth of it. An escalation is two packets from the device (the request,
#: its acknowledgement of the answer): a camera escalating every frame at 30 fps sends about 65
#: a second with its pings and telemetry, and a device replaying its queue after an outage
#: replays 50 requests a second. Below the bridge's per-device request budget (500/s): on the
#: embedded broker a device that sends more is slowed by TCP before the bridge refuses it.
DEVICE_READ_RATE = 100.0
#: What a device may send at once (a reconnection's queued requests) before the rate paces it;
#: read at once, it is what one device can make every other client wait for (~50 ms).
DEVICE_READ_BURST = 100

_TYPE, _LENGTH, _BODY = 0, 1, 2


@dataclass(frozen=True)
class ReadBudget:
    """Packets a second each device's connection is read at, after ``burst`` at once."""

    rate_per_s: float = DEVICE_READ_RATE
    burst: int = DEVICE_READ_BURST

    def __post_init__(self) -> None:
        if not (self.rate_per_s > 0 and self.burst >= 1):
            raise ValueError(f"a read budget needs rate > 0 and burst >= 1, got {self.rate_per_s}/s, {self.burst}")


class DevicePacing:
    """One bucket per device login, kept across its reconnections (so reconnecting does not
    buy a fresh burst), at most 65,536 remembered. Each wait is counted per device
    (:attr:`waits`) and logged as a warning at most once a minute per device."""

    #: Seconds between two warnings about one device.
    LOG_EVERY_S = 60.0

    def __init__(self, budget: ReadBudget, roles: dict[str, Role], clock: Callable[[], float] = time.monotonic):
        self.budget = budget
        self.roles = roles
        self.clock = clock
        self.waits: Counter[str] = Counter()
        self._logged: dict[str, float] = {}
        self._buckets = BucketsPerKey(budget.rate_per_s, budget.burst, clock=clock)

    def reader(self, inner: ReaderAdapter, username: str | None) -> ReaderAdapter:
        """``inner`` paced if ``username`` is a device login; as it is otherwise."""
        if not username or self.roles.get(username, "device") != "device":
            return inner
        return PacedReader(inner, self._buckets.bucket(username), self.clock, lambda: self._waited(username))

    def _waited(self, username: str) -> None:
        self.waits[username] += 1
        now = self.clock()
        last = self._logged.get(username)
        if last is not None and now - last < self.LOG_EVERY_S:
            return
        if len(self._logged) >= 65536:
            self._logged.clear()
        self._logged[username] = now
        log.warning(
            "embedded broker: %s sends past its budget (%g packets/s, %d at once): its connection is read "
            "at that pace (%d waits so far)",
            username,
            self.budget.rate_per_s,
            self.budget.burst,
            self.waits[username],
        )


class PacedReader(ReaderAdapter):
    """Pays for each packet whose first byte it has handed out, and waits, before the next
    read, until the connection's bucket has paid back its debt. Packets are counted from MQTT's
    own framing (a type byte, a variable-length remaining length, that many bytes), so each is
    paid for once whatever sizes the reader is asked for."""

    def __init__(
        self,
        inner: ReaderAdapter,
        bucket: TokenBucket,
        clock: Callable[[], float],
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self._inner = inner
        self._bucket = bucket
        self._clock = clock
        self._on_wait = on_wait
        self._state = _TYPE
        self._left = 0  # bytes of the remaining length still to come (in _BODY)
        self._shift = 0  # bits of the remaining length read so far (in _LENGTH)
        self._started = 0  # packets begun since the bucket was last paid

    async def read(self, n: int = -1) -> bytes:
        if self._started:
            delay = self._bucket.pace(self._started, self._clock())
            self._started = 0
            if delay > 0:
                if self._on_wait is not None:
                    self._on_wait()
                await asyncio.sleep(delay)
        data = await self._inner.read(n)
        self._follow(data)
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()

    def _follow(self, data: bytes) -> None:
        i, end = 0, len(data)
        while i < end:
            if self._state == _TYPE:
                i += 1
                self._started += 1
                self._state, self._left, self._shift = _LENGTH, 0, 0
            elif self._state == _LENGTH:
                byte = data[i]
                i += 1
                self._left |= (byte & 0x7F) << self._shift
                self._shift += 7
                if not byte & 0x80 or self._shift > 21:  # a fifth length byte is malformed: resync
                    self._state = _BODY if self._left else _TYPE
            else:
                step = min(self._left, end - i)
                i += step
                self._left -= step
                if not self._left:
                    self._state = _TYPE
