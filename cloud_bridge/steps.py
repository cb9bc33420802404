"""The bridge's share of a trace: its hop stamps and the step histograms made from them.

Kept apart from the bridge's request handling so that what a request's time is split into is
decided in one place, for the Result's ``hops`` and for ``edgewire_bridge_step_ms`` alike.
"""

from __future__ import annotations

from edgewire.metrics import Meter


def record_steps(
    meter: Meter, received: float, dispatched: float | None, answered: float | None, sent: float
) -> dict[str, float]:
    """Observe the request's steps (ms) and return its hop stamps. ``queued``: receipt to the
    Triton call (checks, decode, waiting for a slot); ``triton``: the call, batching included;
    ``reply``: building the answer; ``total``: receipt to answer. A step that did not happen
    (no dispatch for a rejected request) is neither observed nor stamped."""
    hops = {"bridge_received": received}
    if dispatched is not None:
        hops["dispatched"] = dispatched
        meter.observe("bridge_step_ms", (dispatched - received) * 1000.0, step="queued")
        if answered is not None:
            hops["answered"] = answered
            meter.observe("bridge_step_ms", (answered - dispatched) * 1000.0, step="triton")
            meter.observe("bridge_step_ms", (sent - answered) * 1000.0, step="reply")
    meter.observe("bridge_step_ms", (sent - received) * 1000.0, step="total")
    hops["bridge_sent"] = sent
    return hops
