"""The flood shield: a device flooding past its refusals' budget is shut out at the broker.

Admission (cloud_bridge.admission) stops a flood from costing Triton or other devices' answers,
but every flooded request is still carried to the bridge and read there, behind the same socket
every other device's requests arrive on: at thousands a second the bridge spends its loop on
them and a neighbour's request waits in line. MQTT has no subscription that leaves out one
publisher, so while a device is shut out the bridge holds one subscription per other device
(``req/<device>/+``) instead of ``req/+/+``, and the broker drops the flood without sending it.

Which devices: those the bridge has taken requests from, and those whose presence says they are
online (``presence/+``). A shut-out device is let back after a cool-off that doubles each time
it floods again (up to ``max_cooloff_s``), on probation: with no burst or refusals to spend, so
a flood that starts again is shut out again at once, not after another burst. When no device
has flooded for ``calm_s`` the bridge goes back to the one wildcard subscription.

What it costs, said plainly: while shielded, a device the bridge has neither heard from nor seen
the presence of is not read until its presence arrives (its requests stay owed at the device,
which sends them again); a request sent while subscriptions change may arrive twice and is
answered once (the bridge's dedupe). Subscriptions live in the bridge's persistent session, so
a bridge stopped cleanly goes back to the wildcard first; one killed while shielded leaves its
per-device subscriptions at the broker, each delivering its device's requests a second time.
The next run sweeps them: while it is not shielded, each device it comes to know is unsubscribed
once (one UNSUBSCRIBE for all those learnt in a tick), so at most the first request of each
device arrives twice, and is answered once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from edgewire import envelopes as env
from edgewire import topics
from edgewire.errors import DecodeError
from edgewire.metrics import Meter
from edgewire.session import MqttSession, NotConnected

log = logging.getLogger(__name__)

#: Devices remembered at most (the first heard are forgotten first).
KNOWN_MAX = 100_000


class FloodShield:
    def __init__(
        self,
        meter: Meter,
        filter_for: Callable[[str | None], str],
        *,
        cooloff_s: float = 5.0,
        max_cooloff_s: float = 120.0,
        calm_s: float = 30.0,
        known_ttl_s: float = 3600.0,
        tick_s: float = 0.2,
        probation: Callable[[str], None] | None = None,
    ) -> None:
        """``filter_for(device_id)``: the bridge's request filter for one device, or (None) for
        every device; shared or not as the bridge subscribes. ``probation(device_id)``: empties
        a device's budgets when it is let back (cloud_bridge.admission)."""
        self.meter = meter
        self.filter_for = filter_for
        self.cooloff_s = cooloff_s
        self.max_cooloff_s = max_cooloff_s
        self.calm_s = calm_s
        self.known_ttl_s = known_ttl_s
        self.tick_s = tick_s
        self._known: dict[str, float] = {}  # device -> when last heard (time.time())
        self._shut_out: dict[str, float] = {}  # device -> until when
        self._strikes: dict[str, tuple[int, float]] = {}  # device -> (floods, when the last began)
        self._subscribed: set[str] = set()  # per-device subscriptions held now
        self._unswept: list[str] = []  # devices newly known: a killed run's subscription to drop
        self.shielded = False
        self._last_flood = 0.0
        self._probation = probation
        self._woken = asyncio.Event()  # a device was just shut out: change subscriptions now

    # -- what the bridge tells it ----------------------------------------------------------------

    def heard(self, device_id: str, now: float) -> None:
        """A request taken from ``device_id``: it is a device to keep reading while shielded."""
        known = self._known
        if device_id not in known:
            if len(known) >= KNOWN_MAX:
                del known[next(iter(known))]
            if len(self._unswept) < KNOWN_MAX:
                self._unswept.append(device_id)
        known[device_id] = now

    def presence(self, payload: bytes, now: float) -> None:
        """A presence message: an online device is one to keep reading while shielded."""
        try:
            seen = env.decode(env.Presence, payload)
        except DecodeError:  # anyone's presence is read; a bad one teaches nothing
            return
        if seen.kind == "device" and seen.online:
            self.heard(seen.client_id, now)

    def flooded(self, device_id: str, now: float) -> None:
        """``device_id`` went past both its budgets: shut it out for its cool-off."""
        if device_id in self._shut_out:
            return
        floods, last = self._strikes.get(device_id, (0, 0.0))
        if now - last > 2 * self.max_cooloff_s:
            floods = 0  # calm long enough: starts again from the shortest cool-off
        floods += 1
        self._strikes[device_id] = (floods, now)
        wait = min(self.max_cooloff_s, self.cooloff_s * 2 ** (floods - 1))
        self._shut_out[device_id] = now + wait
        self._last_flood = now
        self.meter.inc("devices_shut_out_total")
        log.warning("flood from %s: its requests are left at the broker for %.0f s", device_id, wait)
        self._woken.set()

    def shut_out(self, device_id: str) -> bool:
        return device_id in self._shut_out

    # -- what it does at the broker --------------------------------------------------------------

    async def keep(self, session: MqttSession) -> None:
        """Hold the subscriptions the shut-out list says, at once when a device is shut out and
        every tick for those let back (on probation) after their cool-off; until cancelled."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._woken.wait(), self.tick_s)
            self._woken.clear()
            try:
                await self.apply(session, time.time())
            except NotConnected:
                continue  # the session restores what it holds when the link is back
            except Exception:  # a refused change is tried again next tick
                log.exception("flood shield: changing subscriptions failed")

    async def release(self, session: MqttSession) -> None:
        """Back to the one wildcard before the bridge stops, so its persistent session does not
        keep per-device subscriptions for the next start."""
        self._shut_out.clear()
        self._last_flood = 0.0
        await self.apply(session, time.time())

    async def _sweep(self, session: MqttSession) -> None:
        """Unsubscribe the per-device filter of each device newly known (none is held by this
        run while unshielded): what a killed run left in the persistent session goes."""
        while self._unswept and session.connected:
            some = self._unswept[:1000]
            await session.unsubscribe(*[self.filter_for(d) for d in some])
            del self._unswept[: len(some)]

    async def apply(self, session: MqttSession, now: float) -> None:
        """Bring the broker's subscriptions to what the shut-out list says now."""
        for device_id, until in list(self._shut_out.items()):
            if now >= until:
                del self._shut_out[device_id]
                self._last_flood = now  # calm is counted from the last flooder let back
                if self._probation is not None:
                    self._probation(device_id)
                log.info("%s: its requests are read again, with no burst to spend", device_id)
        want_shield = bool(self._shut_out) or (self.shielded and now - self._last_flood < self.calm_s)
        if not want_shield:
            if self.shielded:
                await session.subscribe(self.filter_for(None), qos=topics.REQUEST.qos)
                await session.unsubscribe(*[self.filter_for(d) for d in self._subscribed])
                self._subscribed.clear()
                self.shielded = False
                self.meter.set("flood_shield_on", 0)
                log.info("flood shield off: reading every device's requests again")
            await self._sweep(session)
            return
        stale = now - self.known_ttl_s
        for device_id in [d for d, at in self._known.items() if at < stale]:
            del self._known[device_id]
        wanted = {d for d in self._known if d not in self._shut_out}
        add, drop = wanted - self._subscribed, self._subscribed - wanted
        if add:
            await session.subscribe_all([self.filter_for(d) for d in sorted(add)], qos=topics.REQUEST.qos)
            self._subscribed |= add
        if not self.shielded:  # every other device's subscription is in place before this goes
            await session.unsubscribe(self.filter_for(None))
            self.shielded = True
            self.meter.set("flood_shield_on", 1)
            log.warning("flood shield on: reading %d devices' requests one subscription each", len(wanted))
        if drop:
            await session.unsubscribe(*[self.filter_for(d) for d in sorted(drop)])
            self._subscribed -= drop
