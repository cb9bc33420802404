"""The bridge: escalation requests in, Triton in the middle, results out to each device.

Each request is validated before anything is spent on it: the topic and payload must agree on
who sent it, the answer may only go to that device's own result topic, an expired request is
not dispatched, an unroutable one is answered ``rejected``. Requests are deduplicated by
(device_id, trace_id): a redelivery (QoS 1 after a reconnect, or a device resending) is not run
again, its cached answer is published again -- except ``unavailable``, which only says no model
could serve it then: a device resends such a request later and it is run then. A trace id is
only unique within its device, so a device that sends another device's trace id gets its own
request answered, never the other's.
Bridges that share the request stream on one host may share their dedupe too (``shared``, a
SQLite file: see cloud_bridge.shared_dedupe): a request is then claimed there before it runs, so
a redelivery that lands on another bridge of the group gets the kept answer, not a second run.
Each device's requests are paid from its own budget (``device_rate_per_s``, ``device_burst``):
past it a request is answered ``rejected`` (reason ``rate limited``) without being decoded or
dispatched, so one device cannot starve the others; a device flooding past its refusals' budget
too is not answered at all (cloud_bridge.admission). A ``task: detect`` request takes a path of
its own between routing and answer (cloud_bridge.detect_path).

A bridge whose rules have an ``upstream`` is a site's bridge (the edge-server tier, results say
``tier: site``): a route ending in ``tier:cloud`` serves a request with the site's models first
and hands it up to the cloud tier when the site's answer is unsure, the site is busy (the
device's budget spent, ``max_local_queue`` requests at the site, a breaker open) or down
(Triton unreachable); the one answer the device gets then is the cloud's (``tier: cloud``), or
the site's own when the cloud could not do better in time (cloud_bridge.site_tier, whose
hand-up and wait for the cloud's answer are cloud_bridge.upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any

from edgewire import envelopes as env
from edgewire import logs, sdnotify, topics
from edgewire.aio import cancel_and_wait, spawn
from edgewire.config import BrokerSettings
from edgewire.errors import DecodeError, EdgewireError, TopicError
from edgewire.metrics import Meter
from edgewire.session import InboundMessage, MqttSession, NotConnected, presence_factory

from .admission import DEVICE_BURST, DEVICE_RATE_PER_S, Admission
from .decoder import NOT_AN_IMAGE, DecodePool, DecoderUnavailable, NotDecodable
from .detect_path import DetectPath
from .dispatch import Dispatcher, Unavailable, failed_status
from .flood_shield import FloodShield
from .group_claims import GroupClaims
from .model_inputs import ModelInputs
from .rules import Route, RuleSet
from .shared_dedupe import SharedDedupe
from .site_tier import SiteTier
from .steps import record_steps
from .upstream import HandedUp, Upstream

log = logging.getLogger(__name__)


class Bridge:
    def __init__(
        self,
        bridge_id: str,
        broker: BrokerSettings,
        dispatcher: Dispatcher,
        rules: RuleSet,
        *,
        group: str = "bridges",
        max_inflight: int = 256,
        dedupe_size: int = 100_000,
        telemetry_interval_s: float = 5.0,
        meter: Meter | None = None,
        decode_workers: int = 0,
        hop_stamps: bool = True,
        device_rate_per_s: float = DEVICE_RATE_PER_S,
        device_burst: float = DEVICE_BURST,
        shared: SharedDedupe | None = None,
        flood_shield: bool = True,
    ) -> None:
        """``decode_workers``: child processes that decode and preprocess request images, a
        burst per pass of the event loop (see cloud_bridge.decoder); 0 decodes on the loop.
        ``hop_stamps``: put this bridge's hop times in each Result (edgewire.hops).
        ``device_rate_per_s``, ``device_burst``: each device's budget of new requests. The
        defaults are a device's own replay pace after an outage (``outbox.replay_per_s``), so a
        device that keeps to its shipped settings is never refused; a fleet whose cameras and
        Triton capacity are known sets them lower.
        ``shared``: the claims and answers of every bridge of the group on this host; without
        it this bridge's dedupe knows only what it ran itself.
        ``flood_shield``: shut a device flooding past its refusals' budget out at the broker
        (cloud_bridge.flood_shield) rather than read and drop its flood here."""
        self.hop_stamps = hop_stamps
        self.bridge_id = bridge_id
        self.broker = broker
        self.dispatcher = dispatcher
        self.rules = rules
        self.group = group
        self.meter = meter or Meter(bridge_id)
        dispatcher.meter = self.meter
        self._slots = asyncio.Semaphore(max_inflight)
        self._dedupe_size = dedupe_size
        self._answered: OrderedDict[tuple[str, str], bytes] = OrderedDict()  # (device, trace) -> answer
        self._inflight: set[tuple[str, str]] = set()
        self.shared = shared
        self.claims = GroupClaims(shared, self.meter, bridge_id) if shared is not None else None
        self.admission = Admission(self.meter, device_rate_per_s, device_burst)
        self.shield: FloodShield | None = None
        if flood_shield:
            self.shield = FloodShield(self.meter, self.request_filter, probation=self.admission.on_probation)
        self._jobs: set[asyncio.Task[None]] = set()
        self._unacked: set[asyncio.Future[None]] = set()  # results sent, not yet acknowledged
        self._stop = asyncio.Event()
        self._telemetry_interval_s = telemetry_interval_s
        self.inputs = ModelInputs()  # each model's preprocessor, shared by every request path
        self.decode_workers = decode_workers
        # With this few requests in flight the loop has time to spare: a request is decoded on
        # it, sooner than by a round trip to a worker (two more process wake-ups). Under load
        # the workers take the decoding, a burst per pass of the loop.
        self.inline_decode_max_inflight = 2
        self.decoder: DecodePool | None = None
        self._reply_topics: dict[str, str] = {}  # device_id -> its result topic, built once
        self._detect_path = DetectPath(dispatcher, self.inputs.preprocessor, self._result)
        self.session: MqttSession | None = None
        self.ready = asyncio.Event()
        # A site's bridge: requests its routes hand up to the cloud tier, and their answers.
        self.upstream = Upstream(rules.upstream, self.meter) if rules.upstream is not None else None
        self.site: SiteTier | None = None  # what this tier serves, and what it hands up
        if self.upstream is not None:
            self.site = SiteTier(self.upstream, self._serve, self._result, hop_stamps=hop_stamps)
        self.tier = "site" if self.upstream is not None else "cloud"

    def stop(self) -> None:
        """Stop taking requests, answer those already taken, then disconnect."""
        self._stop.set()

    async def run(self) -> None:
        if self.decode_workers > 0:
            self.decoder = DecodePool(self.decode_workers)
            await self.decoder.start()
        try:
            await self._run()
        finally:
            if self.decoder is not None:
                await self.decoder.close()
            if self.shared is not None:
                self.shared.close()

    async def _run(self) -> None:
        session = MqttSession.from_settings(
            self.bridge_id,
            self.broker,
            presence=presence_factory(self.bridge_id, "bridge"),
            meter=self.meter,
            persistent=True,  # requests sent while the bridge restarts wait at the broker
        )
        self.session = session
        async with session:
            await session.wait_connected(None)
            await session.subscribe(self.request_filter(None), qos=topics.REQUEST.qos)
            if self.shield is not None:  # which devices are online, to read while one floods
                await session.subscribe(topics.PRESENCE.filter(), qos=0)
            if self.upstream is not None:  # the cloud's answers to what this site handed up
                await session.subscribe(self.upstream.answer_filter(), qos=topics.RESULT.qos)
            log.info("%s: serving %s over MQTT %s", self.bridge_id, topics.REQUEST.filter(), session.protocol)
            for (endpoint, model), ok in (await self._check_health()).items():
                if not ok:
                    log.warning(
                        "%s: %s on %s is not ready; its requests fail until it is", self.bridge_id, model, endpoint
                    )
            self.ready.set()
            sdnotify.notify(f"READY=1\nSTATUS=serving {topics.REQUEST.filter()} over MQTT {session.protocol}")
            listener = asyncio.create_task(self._listen(session))
            telemetry = asyncio.create_task(self._telemetry(session))
            watchdog = asyncio.create_task(sdnotify.watchdog(lambda: session.connected))
            # Without a group there are no claims to renew: the task ends at once.
            renewing = self.claims.keep_renewed(self._inflight) if self.claims is not None else asyncio.sleep(0)
            claims = asyncio.create_task(renewing)
            if self.shield is not None:  # a device past both its budgets is shut out at once
                self.admission.on_flood = self.shield.flooded
            shielding = self.shield.keep(session) if self.shield else asyncio.sleep(0)
            shield = asyncio.create_task(shielding)
            await self._stop.wait()
            # From here on nothing new is acknowledged: the broker keeps it for the next bridge
            # with this id (or another of the group); what was acknowledged is answered below.
            session.hold_acks()
            await cancel_and_wait(listener, shield)
            if self.shield is not None and self.shield.shielded:
                with contextlib.suppress(NotConnected):
                    await self.shield.release(session)
            for message in session.drain_inbox():  # taken from the broker already: answer them too
                self._on_request(session, message)
            self.admission.flush_dropped()
            if self.upstream is not None:  # no more answers come down: settle what waits for one
                self.upstream.abandon()
            if self._jobs:
                await asyncio.gather(*self._jobs, return_exceptions=True)
            if self._unacked:
                await asyncio.wait(set(self._unacked), timeout=10)
            await cancel_and_wait(telemetry, watchdog, claims)
            await self._publish_telemetry(session)

    async def _listen(self, session: MqttSession) -> None:
        async for message in session.messages():
            self._on_request(session, message)
            # Take the rest of what one read from the broker delivered in the same pass, so the
            # requests of a burst reach the batcher together instead of one loop pass each.
            for more in session.drain_inbox():
                self._on_request(session, more)
            self.admission.flush_dropped()

    def request_filter(self, device_id: str | None) -> str:
        """The requests this bridge reads: every device's (None) or one device's. MQTT 5 brokers
        spread them over every bridge in the group; 3.1.1 has one bridge."""
        assert self.session is not None
        values = {} if device_id is None else {"device_id": device_id}
        if self.session.protocol == "5":
            return topics.REQUEST.shared_filter(self.group, **values)
        return topics.REQUEST.filter(**values)

    def _reply_topic(self, device_id: str) -> str:
        topic = self._reply_topics.get(device_id)
        if topic is None:
            if len(self._reply_topics) >= 4096:
                self._reply_topics.clear()
            topic = self._reply_topics[device_id] = topics.RESULT.build(device_id=device_id)
        return topic

    def _on_request(self, session: MqttSession, message: InboundMessage) -> None:
        received = time.time()
        topic = str(message.topic)
        if self.upstream is not None and self.upstream.owns(topic):
            self.upstream.take(message)
            return
        if self.admission.drop_silenced(topic, received):
            return
        if self.shield is not None and topic.startswith("presence/") and topics.PRESENCE.match(topic) is not None:
            self.shield.presence(bytes(message.payload), received)
            return
        try:
            parsed = topics.parse(topic)
            if parsed.spec is not topics.REQUEST:
                raise TopicError(f"{topic}: the bridge consumes only request topics")
        except TopicError as exc:
            self.meter.inc("requests_rejected_total", reason="topic")
            log.warning("%s: %s", self.bridge_id, exc)
            return
        device_id, trace_id = parsed["device_id"], parsed["trace_id"]
        if self.shield is not None:
            self.shield.heard(device_id, received)
        key = (device_id, trace_id)
        if key in self._inflight:
            self.meter.inc("requests_duplicate_total", state="inflight")
            return
        # Checked before the cache: a resent duplicate costs a publish too, so a device cannot
        # flood past its budget by repeating one trace id.
        over_budget = not self.admission.take(device_id)
        if over_budget and self.upstream is None:
            self._refuse(session, device_id, trace_id, received)
            return
        cached = self._answered.get(key)
        if cached is not None:
            # Already answered: publish the same answer again, do not run it twice.
            self.meter.inc("requests_duplicate_total", state="answered")
            self._spawn(self._publish(session, self._reply_topic(device_id), cached))
            return
        if self.claims is not None:
            claim = self.claims.claim(key)
            if isinstance(claim, bytes):  # answered by a bridge of the group: the same answer again
                self._remember(key, claim)
                self._spawn(self._publish(session, self._reply_topic(device_id), claim))
            if claim is not True:
                return
        # A site's bridge decides after routing: over budget is busy where the route hands up.
        self._inflight.add(key)
        self._spawn(self._handle(session, device_id, trace_id, bytes(message.payload), received, over_budget))

    def _refuse(self, session: MqttSession, device_id: str, trace_id: str, received: float) -> None:
        """Answer a request past its device's budget ``rejected: rate limited``, while its
        refusals' budget lasts (cloud_bridge.admission), at QoS 0 and without a task of its own:
        a flood's refusals must cost the bridge little, and must not fill the queue of QoS 1
        answers every other device's results wait in."""
        if not self.admission.refuse(device_id, received):
            return
        # Counted, not logged one by one: a flood would fill the log at the bridge's expense.
        refusal = self._result(device_id, trace_id, received, "rejected", reason=env.RATE_LIMITED, quiet=True)
        try:
            session.publish_soon(self._reply_topic(device_id), env.encode(refusal), qos=0)
        except NotConnected:
            self.meter.inc("results_unsent_total")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        spawn(self._jobs, coro)

    async def _handle(
        self, session: MqttSession, device_id: str, trace_id: str, data: bytes, received: float, over_budget: bool
    ) -> None:
        logs.bind(bridge_id=self.bridge_id, device_id=device_id, trace_id=trace_id)  # this request's task only
        try:
            async with self._slots:
                outcome = await self._answer_request(device_id, trace_id, data, received, over_budget)
            # Handed up: the wait for the cloud holds no slot (an uplink cut must not stall the site).
            if isinstance(outcome, HandedUp):
                assert self.site is not None  # only a site's bridge hands up
                outcome = await self.site.settle(outcome)
            result = outcome
        except Exception as exc:  # a bug must cost one answer, not the bridge
            log.exception("%s: request %s failed", self.bridge_id, trace_id)
            result = self._result(device_id, trace_id, received, "rejected", reason=f"internal error: {exc!r}")
        payload = env.encode(result)
        if result.status != "unavailable":  # a passing state: a resend is served afresh
            self._remember((device_id, trace_id), payload)
            if self.claims is not None:
                self.claims.keep((device_id, trace_id), payload)
        elif self.claims is not None:
            self.claims.release((device_id, trace_id))
        self._inflight.discard((device_id, trace_id))
        self.meter.inc("requests_total", status=result.status)
        topic = self._reply_topic(device_id)
        try:
            # Queued now; the broker's acknowledgement is watched, not waited for, so this
            # request's task ends here (a stopping bridge waits for them all, see _run).
            acked = session.publish_soon(topic, payload, qos=topics.RESULT.qos)
        except NotConnected:
            await self._publish(session, topic, payload)  # waits for the link to come back
            return
        self._unacked.add(acked)
        acked.add_done_callback(self._result_acked)

    def _result_acked(self, acked: asyncio.Future[None]) -> None:
        self._unacked.discard(acked)
        if not acked.cancelled() and acked.exception() is not None:
            self.meter.inc("results_unsent_total")
            log.warning("%s: a result was not acknowledged by the broker: %s", self.bridge_id, acked.exception())

    async def _answer_request(
        self, device_id: str, trace_id: str, data: bytes, received: float, over_budget: bool = False
    ) -> env.Result | HandedUp:
        try:
            req = env.decode(env.Request, data)
        except DecodeError as exc:
            return self._result(device_id, trace_id, received, "rejected", reason=f"malformed request: {exc}")
        if req.device_id != device_id or req.trace_id != trace_id:
            return self._result(device_id, trace_id, received, "rejected", reason="topic and payload disagree on ids")
        if req.reply_to != self._reply_topic(device_id):
            return self._result(device_id, trace_id, received, "rejected", reason="reply_to is not the sender's topic")
        if not math.isfinite(req.deadline):
            return self._result(device_id, trace_id, received, "rejected", reason="deadline is not a finite time")
        if time.time() >= req.deadline:
            return self._result(device_id, trace_id, received, "expired", reason="deadline passed before dispatch")
        route = self.rules.route(req)
        if route is None:
            return self._result(device_id, trace_id, received, "rejected", reason=f"no route for {req.model_hint!r}")
        if route.hands_up and self.site is not None:
            assert self.session is not None
            return await self.site.serve(self.session, req, data, route, received, over_budget)
        if over_budget:
            self.meter.inc("requests_rate_limited_total")
            return self._result(device_id, trace_id, received, "rejected", reason="rate limited")
        return await self._serve(req, route, received)

    async def _serve(self, req: env.Request, route: Route, received: float) -> env.Result:
        """Serve with this bridge's own Triton models."""
        device_id, trace_id = req.device_id, req.trace_id
        try:
            metas = {m: await self.dispatcher.model_meta(m) for m in route.route_to}
        except (Unavailable, EdgewireError) as exc:
            return self._result(device_id, trace_id, received, "unavailable", reason=str(exc))
        if req.task == "detect":
            return await self._detect_path.answer(req, route, metas, received)
        if self.decoder is None or len(self._inflight) <= self.inline_decode_max_inflight:
            tensors = self.inputs.tensors(req.payload, metas)
            if tensors is None:
                return self._result(device_id, trace_id, received, "rejected", reason=NOT_AN_IMAGE)
        else:
            try:
                tensors = await self.inputs.decoded(self.decoder, req.payload, metas)
            except NotDecodable as exc:
                return self._result(device_id, trace_id, received, "rejected", reason=str(exc))
            except DecoderUnavailable as exc:
                return self._result(device_id, trace_id, received, "unavailable", reason=str(exc))
        dispatched = time.time()
        try:
            answer = await self.dispatcher.run(route, tensors, req.deadline)
        except Unavailable as exc:
            status = failed_status(req.deadline)
            return self._result(device_id, trace_id, received, status, reason=str(exc), dispatched=dispatched)
        answered = time.time()
        self.meter.observe("triton_latency_ms", answer.inference_ms, model=answer.model)
        return self._result(
            device_id,
            trace_id,
            received,
            "ok",
            dispatched=dispatched,
            answered=answered,
            inference_ms=answer.inference_ms,
            model=answer.model,
            version=answer.version,
            prediction=answer.prediction,
        )

    def _result(
        self,
        device_id: str,
        trace_id: str,
        received: float,
        status: str,
        *,
        reason: str | None = None,
        dispatched: float | None = None,
        answered: float | None = None,
        inference_ms: float = 0.0,
        model: str | None = None,
        version: str | None = None,
        prediction: env.Prediction | None = None,
        detections: list[env.Detection] | None = None,
        quiet: bool = False,
    ) -> env.Result:
        now = time.time()
        if status != "ok":
            self.meter.inc("requests_failed_total", status=status)
        if status != "ok" and not quiet:
            log.info("%s: %s %s: %s", self.bridge_id, trace_id, status, reason)
        hops = record_steps(self.meter, received, dispatched, answered, now)
        return env.Result(
            trace_id=trace_id,
            device_id=device_id,
            bridge_id=self.bridge_id,
            status=status,
            model=model,
            version=version,
            prediction=prediction,
            detections=detections,
            timings=env.Timings(
                queued_ms=((dispatched or now) - received) * 1000,
                inference_ms=inference_ms,
                total_ms=(now - received) * 1000,
            ),
            reason=reason,
            hops=hops if self.hop_stamps else {},
            tier=self.tier,
        )

    def _remember(self, key: tuple[str, str], payload: bytes) -> None:
        self._answered[key] = payload
        while len(self._answered) > self._dedupe_size:
            self._answered.popitem(last=False)

    async def _publish(self, session: MqttSession, topic: str, payload: bytes) -> None:
        try:
            await session.publish(topic, payload, qos=topics.RESULT.qos, timeout=30)
        except NotConnected as exc:
            self.meter.inc("results_unsent_total")
            log.warning("%s: result not sent to %s: %s", self.bridge_id, topic, exc)

    async def _telemetry(self, session: MqttSession) -> None:
        while True:
            await asyncio.sleep(self._telemetry_interval_s)
            await self._publish_telemetry(session)

    async def _check_health(self) -> dict[tuple[str, str], bool]:
        health = await self.dispatcher.health(self.rules.models())
        for (endpoint, model), ok in health.items():
            self.meter.set("triton_model_ready", 1.0 if ok else 0.0, endpoint=endpoint, model=model)
        return health

    async def _publish_telemetry(self, session: MqttSession) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._check_health(), 2.0)
        states = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
        for (endpoint, model), state in self.dispatcher.breakers.states().items():
            self.meter.set("breaker_state", states[state], endpoint=endpoint, model=model)
        self.meter.set("requests_inflight", len(self._inflight))
        metrics = self.meter.snapshot()
        payload = env.encode(env.Telemetry(client_id=self.bridge_id, ts=time.time(), metrics=metrics))
        with contextlib.suppress(EdgewireError):
            await session.publish(topics.TELEMETRY.build(client_id=self.bridge_id), payload, qos=0)
