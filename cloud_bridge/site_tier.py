"""A site's bridge serving a request: its own models first, the cloud tier for the rest.

The site's routes end in ``tier:cloud`` (cloud_bridge.rules). What the site's models take with
a sure answer is answered here; what they are unsure of, what finds the site busy (the device's
budget spent, ``max_local_queue`` requests at the site, a breaker open) and what finds it down
(Triton unreachable) is handed up (cloud_bridge.upstream), and the device gets one answer: the
cloud's, or the site's own when the cloud could not do better in time.

Kept apart from the bridge because it is a decision of its own -- serve here or hand up, and
which of two answers goes down -- while the bridge around it stays the same for every tier:
admission, dedupe, answer, publish. It gets the bridge's serving and answer building as
callables, so a site's answer is served, metered and stamped as any other bridge's.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from edgewire import envelopes as env
from edgewire.errors import EdgewireError
from edgewire.session import MqttSession

from .detect_path import ResultFactory
from .rules import Route
from .upstream import HandedUp, Upstream

#: The bridge's own serving (``Bridge._serve``): a request run on this tier's Triton models.
Serve = Callable[[env.Request, Route, float], Awaitable[env.Result]]


class SiteTier:
    def __init__(self, upstream: Upstream, serve: Serve, result: ResultFactory, *, hop_stamps: bool) -> None:
        """``serve``: how the bridge runs a request on its own models; ``result``: how it builds
        an answer; ``hop_stamps``: whether the cloud's answer gets this site's hop stamps."""
        self.upstream = upstream
        self._serve = serve
        self._result = result
        self.hop_stamps = hop_stamps
        self._at_site = 0  # requests being served by this tier's models right now

    async def serve(
        self, session: MqttSession, req: env.Request, data: bytes, route: Route, received: float, over_budget: bool
    ) -> env.Result | HandedUp:
        """This tier's models first; up to the cloud tier when they are unsure, busy or down."""
        here = route.at_this_tier()
        site_answer: env.Result | None = None
        if over_budget:
            why = "busy"
        elif here is None:
            why = "routed"
        elif self._at_site >= self.upstream.settings.max_local_queue:
            why = "busy"
        else:
            self._at_site += 1
            try:
                site = await self._serve(req, here, received)
            finally:
                self._at_site -= 1
            if site.status == "unavailable":
                why = "busy" if "circuit open" in (site.reason or "") else "down"
            elif site.status == "ok" and route.unsure(site.prediction):
                why, site_answer = "unsure", site
            else:
                return site  # sure, or a request no tier would answer otherwise (rejected, expired)
        if time.time() >= req.deadline:
            return site_answer or self._result(
                req.device_id, req.trace_id, received, "expired", reason="deadline passed before handing up"
            )
        try:
            return await self.upstream.hand_up(session, req, data, received=received, why=why, site_answer=site_answer)
        except EdgewireError as exc:
            return site_answer or self._result(
                req.device_id, req.trace_id, received, "unavailable", reason=f"cannot hand up ({why}): {exc}"
            )

    async def settle(self, handed: HandedUp) -> env.Result:
        """The one answer to a request handed up: the cloud's (with this site's stamps), else
        the site's own unsure one, else ``unavailable`` (the device asks again later)."""
        cloud = await self.upstream.settle(handed)
        now = time.time()
        if cloud is not None and (cloud.status == "ok" or handed.site_answer is None):
            hops = {**cloud.hops, "site_received": handed.received, "handed_up": handed.handed_up, "site_relayed": now}
            return cloud.model_copy(
                update={"hops": hops if self.hop_stamps else cloud.hops, "tier": cloud.tier or "cloud"}
            )
        if handed.site_answer is not None:
            site = handed.site_answer
            return site.model_copy(update={"hops": {**site.hops, "bridge_sent": now} if site.hops else {}})
        req = handed.request
        held = self.upstream.settings.hold_s
        reason = f"handed up ({handed.why}); no answer came down from the cloud (held up to {held:g} s)"
        return self._result(req.device_id, req.trace_id, handed.received, "unavailable", reason=reason)
