"""The bridge's side of the group's shared dedupe (cloud_bridge.shared_dedupe).

A request is claimed before it runs, the answer kept for the group before it is published, a
claim let go when the answer is only ``unavailable`` and the open claims renewed while their
calls run. Every failure of the shared file is counted and logged, never raised: a request run
twice beats a request lost, so a broken file degrades the group to each bridge's own dedupe.
Kept apart from the bridge so its request path reads the same with or without a group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Collection

from edgewire.metrics import Meter

from .shared_dedupe import Answered, Claimed, HeldElsewhere, SharedDedupe

log = logging.getLogger("edgewire.cloud_bridge.bridge")  # the bridge's lines, under its logger


class GroupClaims:
    def __init__(self, shared: SharedDedupe, meter: Meter, bridge_id: str) -> None:
        self.shared = shared
        self.meter = meter
        self.bridge_id = bridge_id

    def claim(self, key: tuple[str, str]) -> bool | bytes:
        """Whether this bridge is to run the request (``True``: claimed, or the shared dedupe
        failed), leave it to the bridge of the group that holds it (``False``), or publish
        again the answer the group kept (its payload)."""
        try:
            claim = self.shared.claim(*key)
        except sqlite3.Error as exc:  # a request run twice beats a request lost
            self.meter.inc("shared_dedupe_errors_total")
            log.warning("%s: the shared dedupe failed (%s); running %s unclaimed", self.bridge_id, exc, key[1])
            return True
        if isinstance(claim, Answered):
            self.meter.inc("requests_duplicate_total", state="answered_in_group")
            return claim.payload
        if isinstance(claim, HeldElsewhere):
            self.meter.inc("requests_duplicate_total", state="inflight_in_group")
            return False
        assert isinstance(claim, Claimed)
        if claim.taken_from is not None:
            self.meter.inc("shared_claims_taken_over_total")
            log.info("%s: %s taken over from %s, whose lease ran out", self.bridge_id, key[1], claim.taken_from)
        return True

    def keep(self, key: tuple[str, str], payload: bytes) -> None:
        """The answer kept for the group before it is published, so a copy of the request on
        another bridge is answered with it even if this bridge dies right after."""
        try:
            self.shared.answer(*key, payload)
        except sqlite3.Error as exc:
            self.meter.inc("shared_dedupe_errors_total")
            log.warning("%s: keeping the answer to %s in the shared dedupe failed: %s", self.bridge_id, key[1], exc)

    def release(self, key: tuple[str, str]) -> None:
        """Let the claim go: a resend is to be run afresh, by whichever bridge of the group."""
        with contextlib.suppress(sqlite3.Error):
            self.shared.release(*key)

    async def keep_renewed(self, inflight: Collection[tuple[str, str]]) -> None:
        """Renew this bridge's open claims (so they outlive slow calls, not the bridge) and
        forget old answers."""
        while True:
            await asyncio.sleep(self.shared.lease_s / 3)
            try:
                self.shared.renew(list(inflight))
                self.shared.prune()
            except sqlite3.Error as exc:
                self.meter.inc("shared_dedupe_errors_total")
                log.warning("%s: renewing claims in the shared dedupe failed: %s", self.bridge_id, exc)
