"""Admission: each device's budget of requests and the bridge's defences against a flood.

Each device's requests are paid from its own token bucket, so one device cannot starve the
others. A request past it is refused, and those refusals are paid from a second bucket per
device: a device flooding past both is not answered at all, and until one of its buckets has a
token again its requests are dropped on their topic alone, before any parsing. A flood then
costs the bridge the reading of it only, and the event loop every other device's requests and
Triton's answers run on stays free. Kept apart from the bridge so the budgets can be read and
tuned as one thing, not spread over the request path.
"""

from __future__ import annotations

from collections.abc import Callable

from edgewire.metrics import Meter
from edgewire.ratelimit import BucketsPerKey

#: Each device's budget of new requests unless the operator sets one (``edgewire bridge
#: --device-rate/--device-burst``): a device's own replay pace after an outage
#: (``outbox.replay_per_s``), so a device that keeps to its shipped settings is never refused.
DEVICE_RATE_PER_S = 500.0
DEVICE_BURST = 1000.0
#: How many ``rate limited`` refusals one device is sent, at once and per second; past these
#: its requests are dropped unanswered (its device sends them again on its resend schedule).
REFUSAL_BURST = 200.0
REFUSALS_PER_S = 100.0
#: Longest a device past both budgets is dropped on its topic alone before they are asked again.
SILENCE_MAX_S = 1.0


class Admission:
    def __init__(self, meter: Meter, device_rate_per_s: float, device_burst: float) -> None:
        """``device_rate_per_s``, ``device_burst``: each device's budget of new requests."""
        self.meter = meter
        self.budgets = BucketsPerKey(device_rate_per_s, device_burst)  # requests, per device
        self.refusals = BucketsPerKey(REFUSALS_PER_S, REFUSAL_BURST)  # answered refusals, per device
        self._silenced: dict[str, float] = {}  # device past both budgets -> until when (time.time())
        self._dropped = 0  # requests dropped so, not yet counted in the meter
        #: Called (on the loop) with the device and the time when it goes past both budgets
        #: (the flood shield shuts it out at the broker).
        self.on_flood: Callable[[str, float], None] | None = None

    def take(self, device_id: str) -> bool:
        """Whether the device's request fits its budget (a token is spent if so)."""
        return self.budgets.take(device_id)

    def drop_silenced(self, topic: str, now: float) -> bool:
        """Whether this request is dropped unread: its device is past both its budgets. Counted
        once per burst (``flush_dropped``): a flood's cost must be its reading only."""
        if not self._silenced or not self._silent(topic, now):
            return False
        self._dropped += 1
        return True

    def flush_dropped(self) -> None:
        """Count the requests dropped since the last call, in one step of the meter."""
        if self._dropped:
            self.meter.inc("requests_rate_limited_total", self._dropped, answered="no")
            self._dropped = 0

    def refuse(self, device_id: str, received: float) -> bool:
        """Whether a request past its device's budget is to be answered ``rate limited``: only
        while its refusals' budget lasts. Past it too the request is dropped unanswered, and
        the device silenced until the first of its buckets has a token again. A refusal left
        out costs its device nothing: it keeps the request owed and sends it again later."""
        if not self.refusals.take(device_id):
            self.meter.inc("requests_rate_limited_total", answered="no")
            buckets = (self.budgets.bucket(device_id), self.refusals.bucket(device_id))
            wait = min([SILENCE_MAX_S] + [(1 - b.tokens) / b.rate for b in buckets if b.rate > 0])
            if len(self._silenced) >= 4096:
                self._silenced.clear()
            self._silenced[device_id] = received + wait
            if self.on_flood is not None:
                self.on_flood(device_id, received)
            return False
        self.meter.inc("requests_rate_limited_total", answered="yes")
        return True

    def on_probation(self, device_id: str) -> None:
        """Empty both the device's buckets: a device let back after a flood starts with no burst
        and no refusals to spend, so flooding again silences it at once (cloud_bridge.flood_shield)."""
        now = self.budgets.clock()
        for buckets in (self.budgets, self.refusals):
            bucket = buckets.bucket(device_id)
            bucket.tokens, bucket.updated = 0.0, now

    def _silent(self, topic: str, now: float) -> bool:
        """Whether this request comes from a device past both its budgets, read from the topic
        alone (``req/<device>/...``)."""
        end = topic.find("/", 4)
        device_id = topic[4:end] if end > 4 and topic.startswith("req/") else ""
        until = self._silenced.get(device_id)
        if until is None:
            return False
        if now < until:
            return True
        del self._silenced[device_id]
        return False
