"""A site's bridge handing a request up to the cloud tier, and the cloud's answer back down.

A site may run its own bridge and Triton between its devices and the cloud (the edge-server
tier). Its routes end in ``tier:cloud`` (cloud_bridge.rules): when the site's model is unsure,
busy or down, the site's bridge hands the request up, and it alone answers the device.

How a request travels, so that nothing runs twice and the device gets exactly one answer:

- A device's own request (``req/<device>/<trace>``) never crosses the uplink: the site broker's
  uplink carries ``<prefix>req/#`` up, as ``req/#`` at the central broker (Mosquitto's bridge
  topic prefixes, rendered by ``edgewire flash``). The site bridge republishes the request's
  bytes there unchanged, so the central bridge sees the device's own request (ids, reply_to,
  deadline) and serves and dedupes it like any other.
- The central bridge answers on ``result/<device>``; the uplink brings that down as
  ``<prefix>result/<device>``, never as ``result/<device>``, and only the site bridge reads it.
- The site bridge matches the answer to the request it handed up by (device, trace id) and
  publishes the one answer on ``result/<device>``: the cloud's, with the site's hop stamps
  added; or the site's own (unsure) answer when the cloud failed or did not answer in time.
  Until then the request is in flight at the site bridge, so a device's resend is not run
  again; afterwards its answer is kept, so a later resend gets the same answer again.

An answer from the cloud that matches nothing waiting (the site bridge restarted meanwhile, or
already answered with its own) is dropped and counted: the device asks again and the central
bridge's dedupe answers that from its cache, without running it twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from edgewire import envelopes as env
from edgewire import topics
from edgewire.errors import DecodeError, EdgewireError, TopicError
from edgewire.metrics import Meter
from edgewire.session import InboundMessage, MqttSession

from .rules import UpstreamSettings

log = logging.getLogger(__name__)

#: With an (unsure) answer of its own, the site waits for the cloud's for this share of the time
#: the request has left, then answers with its own, before the device stops waiting.
WAIT_SHARE = 0.9


@dataclass
class HandedUp:
    """A request on its way to the cloud tier: what the site bridge waits for."""

    request: env.Request
    received: float  # when the site bridge took it
    handed_up: float  # when it published it upward
    why: str  # unsure, busy or down
    site_answer: env.Result | None  # the site's own answer, when it had one (unsure)
    #: The cloud's answer; None: stop waiting (the bridge is stopping).
    answer: asyncio.Future[env.Result | None] = field(
        repr=False, default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Upstream:
    """The requests a site bridge has handed up and not yet answered, by (device, trace id)."""

    def __init__(self, settings: UpstreamSettings, meter: Meter) -> None:
        self.settings = settings
        self.meter = meter
        self._waiting: dict[tuple[str, str], HandedUp] = {}
        self._stopping = False

    @property
    def prefix(self) -> str:
        return self.settings.prefix

    def answer_filter(self) -> str:
        """Where the cloud's answers come down at the site broker."""
        return self.prefix + topics.RESULT.filter()

    def owns(self, topic: str) -> bool:
        return topic.startswith(self.prefix)

    async def hand_up(
        self,
        session: MqttSession,
        request: env.Request,
        data: bytes,
        *,
        received: float,
        why: str,
        site_answer: env.Result | None,
    ) -> HandedUp:
        """Republish the request's bytes on the uplinked prefix (QoS 1: the site broker keeps
        it through an uplink cut) and note what to wait for."""
        if self._stopping:
            raise EdgewireError("the bridge is stopping: no answer could come down any more")
        key = (request.device_id, request.trace_id)
        handed = HandedUp(request, received, time.time(), why, site_answer)
        self._waiting[key] = handed
        topic = self.prefix + topics.REQUEST.build(device_id=request.device_id, trace_id=request.trace_id)
        try:
            await session.publish(topic, data, qos=topics.REQUEST.qos, timeout=30)
        except BaseException:
            self._waiting.pop(key, None)
            raise
        self.meter.inc("requests_handed_up_total", why=why)
        return handed

    def take(self, message: InboundMessage) -> None:
        """A cloud answer come down the uplink: settle the request it answers."""
        topic = str(message.topic)
        try:
            parsed = topics.parse(topic[len(self.prefix) :])
            if parsed.spec is not topics.RESULT:
                raise TopicError(f"{topic}: only results come down under {self.prefix}")
            answer = env.decode(env.Result, bytes(message.payload))
        except (TopicError, DecodeError) as exc:
            self.meter.inc("upstream_answers_rejected_total")
            log.warning("upstream answer refused: %s", exc)
            return
        handed = self._waiting.pop((answer.device_id, answer.trace_id), None)
        if answer.device_id != parsed["device_id"] or handed is None or handed.answer.done():
            self.meter.inc("upstream_answers_unmatched_total")
            return
        handed.answer.set_result(answer)

    async def settle(self, handed: HandedUp) -> env.Result | None:
        """The cloud's answer, or None when it did not come in time: with a site answer in hand,
        by ``WAIT_SHARE`` of the time the request had left; else within ``hold_s``."""
        now = time.time()
        if handed.site_answer is not None:
            wait = max(0.0, (handed.request.deadline - now) * WAIT_SHARE)
        else:
            wait = self.settings.hold_s
        try:
            answer = await asyncio.wait_for(asyncio.shield(handed.answer), wait)
        except asyncio.TimeoutError:
            answer = None
        finally:
            key = (handed.request.device_id, handed.request.trace_id)
            if self._waiting.get(key) is handed:
                del self._waiting[key]
        if answer is None:
            self.meter.inc("upstream_answers_missed_total")
        return answer

    def abandon(self) -> None:
        """Stop waiting (the bridge is stopping): every request still waiting is answered now,
        with the site's own answer or ``unavailable`` (the device asks again later), and nothing
        more is handed up."""
        self._stopping = True
        for handed in self._waiting.values():
            if not handed.answer.done():
                handed.answer.set_result(None)
        self._waiting.clear()
