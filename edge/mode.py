"""Whether the device works with the cloud (joint) or alone (degraded), and why.

The link to the broker and the cloud's own answers both move the mode: a lost link degrades at
once and its return restores it; cloud failures (timeouts, unavailable answers) degrade after a
configured number in a row, and a trial back to joint follows a cool-off. Every change is logged,
counted and announced on the presence topic (through ``on_change``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from edgewire.metrics import Meter
from edgewire.session import MqttSession

log = logging.getLogger(__name__)

JOINT, DEGRADED, LOCAL_ONLY = "joint", "degraded", "local-only"
#: Degraded for the cloud's sake, a device tries joint again after this long.
COOLOFF_S = 10.0


class DeviceMode:
    def __init__(
        self,
        device_id: str,
        meter: Meter,
        *,
        cloud: bool,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.device_id = device_id
        self.meter = meter
        self.on_change = on_change
        self.state = JOINT if cloud else LOCAL_ONLY
        self.degraded_by: str | None = None
        self.since = time.monotonic()
        self._failures = 0
        self.meter.set("degraded", 0)  # there from the start, so "not degraded" is a value, not a gap

    @property
    def degraded(self) -> bool:
        return self.state == DEGRADED

    def set(self, state: str, reason: str) -> None:
        if state == self.state:
            return
        log.warning("%s: %s -> %s (%s)", self.device_id, self.state, state, reason)
        self.state = state
        self.degraded_by = reason if state == DEGRADED else None
        self.since = time.monotonic()
        self._failures = 0
        self.meter.inc("mode_transitions_total", to=state, reason=reason)
        self.meter.set("degraded", 1 if state == DEGRADED else 0)
        if self.on_change is not None:
            self.on_change()

    def cloud_failed(self, reason: str, degraded_after: int) -> None:
        """The cloud let a request down (``timeout``, ``unavailable``): the ``degraded_after``-th
        time in a row, the device goes on alone."""
        self._failures += 1
        if self.state == JOINT and self._failures >= degraded_after:
            self.set(DEGRADED, reason)

    def cloud_answered(self, link_up: bool) -> None:
        self._failures = 0
        if self.state == DEGRADED and link_up:
            self.set(JOINT, "cloud_answered")

    async def watch_link(self, session: MqttSession, on_reconnect: Callable[[], Awaitable[None]]) -> None:
        """Degraded while the broker is away; back when it returns. Degraded for the cloud's
        sake, a trial back to joint after the cool-off."""
        was = session.connected
        connects = session.connects
        if not was:
            self.set(DEGRADED, "link")
        while True:
            await asyncio.sleep(0.1)
            now = session.connected
            if now != was or (now and session.connects != connects):
                was, connects = now, session.connects
                if not now:
                    self.set(DEGRADED, "link")
                else:
                    if self.degraded_by == "link":
                        self.set(JOINT, "link")
                    await on_reconnect()
            elif now and self.degraded and self.degraded_by != "link" and time.monotonic() - self.since > COOLOFF_S:
                self.set(JOINT, "trial")
