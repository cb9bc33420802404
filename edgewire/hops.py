"""Where an escalation spent its time: the hop stamps every component adds, and the steps between.

Each hop stamps the wall-clock time (``time.time()``) at which it did its part into a message it
sends anyway: the bridge into its ``Result`` (and a site's bridge that handed the request up to
the cloud, its own stamps around the cloud bridge's), the device into the final ``LocalResult`` of the
frame (with the bridge's stamps copied in). A step is the time between two consecutive stamps
that are present, so the steps of one trace always add up to the device's own measure of the
frame's latency (capture to final answer): both are the same two stamps apart.

Stamps made on one machine are on one clock. Steps that cross machines (device to bridge, bridge
to device) are only as true as the clocks are synchronised (chrony or PTP); every step that can be
measured on one clock is.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

#: Every stamp, in the order an escalation passes them, and what the step *ending* at it is.
HOPS: tuple[tuple[str, str], ...] = (
    ("captured", ""),
    ("judged", "device: decode, infer, judge"),
    ("queued", "device: outbox write"),
    ("sent", "device: outbox to broker"),
    ("site_received", "broker: device to site bridge"),
    ("handed_up", "site bridge: site model tried"),
    ("bridge_received", "broker: device to bridge"),
    ("dispatched", "bridge: checks, decode"),
    ("answered", "triton: inference"),
    ("bridge_sent", "bridge: result out"),
    ("site_relayed", "uplink: cloud bridge to site bridge"),
    ("answer_received", "broker: bridge to device"),
    ("final", "device: merge, publish"),
)
ORDER = {name: i for i, (name, _) in enumerate(HOPS)}
STEP_OF = dict(HOPS)
#: The stamps the bridge that answers makes.
BRIDGE_HOPS = ("bridge_received", "dispatched", "answered", "bridge_sent")
#: The stamps a site's bridge adds to a request it handed up to the cloud tier: when it took the
#: request, when it handed it up, when it sent the cloud's answer down (cloud_bridge.upstream).
RELAY_HOPS = ("site_received", "handed_up", "site_relayed")
#: What the device copies, and only these, from a Result.
ANSWER_HOPS = BRIDGE_HOPS + RELAY_HOPS


@dataclass(frozen=True)
class Step:
    hop: str
    what: str
    start: float
    end: float

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000.0


def steps(hops: dict[str, float]) -> list[Step]:
    """The steps between consecutive stamps present in ``hops`` (unknown names ignored)."""
    known = sorted((ORDER[k], k, t) for k, t in hops.items() if k in ORDER)
    out = []
    for (_, prev, t0), (_, name, t1) in itertools.pairwise(known):
        out.append(Step(hop=name, what=STEP_OF[name] or prev, start=t0, end=t1))
    return out


def total_ms(hops: dict[str, float]) -> float:
    return sum(s.ms for s in steps(hops))
