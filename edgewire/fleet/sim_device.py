"""One simulated device: the real wire, no model.

What a thousand cameras cost a broker and a bridge is a question about the wire, not about ONNX:
so a simulated device runs no model. It keeps everything else a device does on MQTT: its own
connection and identity (credentials as ``edgewire flash`` renders them), the retained presence
and last will, telemetry at the configured period, hard frames escalated at a configured rate
and deadline (real demo frames, each with a recorded local result), answers matched by trace
id, and model announces followed through download, verification and a retained status.

Each device is an :class:`~edgewire.session.MqttSession`, the same session real devices run,
so reconnect storms exercise the real backoff.

A request is owed until its answer comes: one the broker did not take (link down) waits in the
device's queue, and after a reconnect every owed request is sent again at the paced replay
rate; the bridge's dedupe answers a repeat with the answer it already gave, byte for byte. So an
answer that repeats the first one is a redelivery, while one that differs means the request was
run twice: that is what ``duplicates`` counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import re
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from edgewire import delivery, topics
from edgewire import envelopes as env
from edgewire.aio import cancel_and_wait
from edgewire.errors import DecodeError
from edgewire.session import MqttSession, NotConnected, presence_factory

log = logging.getLogger(__name__)

_REASON_DETAILS = re.compile(r"[a-z]+://\S+|\d+(\.\d+)?")


@dataclass(frozen=True)
class SimFrame:
    """One demo frame and the local result a device recorded for it."""

    payload: bytes
    local: env.Prediction
    content_type: str = "image/jpeg"


@dataclass(frozen=True)
class Identity:
    """Who one simulated device is on the broker."""

    device_id: str
    username: str | None = None
    password: str | None = None
    fleet: str = "sim"
    profile: str = "x86-64-cpu"


@dataclass
class SimSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "3.1.1"
    # Hard frames each device escalates per second (0: none), and the deadline each carries.
    escalations_per_s: float = 0.1
    deadline_ms: int = 30_000
    model_hint: str | None = "digits"
    telemetry_interval_s: float = 5.0
    # Owed requests re-sent after a reconnect leave at most this fast per device.
    replay_per_s: float = 20.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0
    keepalive: int = 60
    # A request the broker took and no answer came for goes again after this long (doubling).
    resend_after_s: float = 10.0
    # After a reconnect, send again every owed request (what the device's forwarder does), or
    # only those the broker never acknowledged, leaving acknowledged ones to resend_after_s.
    replay: Literal["all", "unacknowledged"] = "all"
    # Ask the distributor for missing chunks after this long without one.
    fetch_after_s: float = 2.0
    # New connections opened per second at start (a fleet powering up is not one instant).
    connect_per_s: float = 500.0


@dataclass
class DeviceStats:
    sent: int = 0
    answered: int = 0
    redelivered: int = 0
    duplicates: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    # "<status>: <reason>" of every answer that was not ok, numbers and addresses blanked, so
    # a run that shows unavailable answers also says why (a circuit open, a call timed out...).
    not_ok: dict[str, int] = field(default_factory=dict)
    round_trip_ms: list[float] = field(default_factory=list)
    answered_by: dict[str, int] = field(default_factory=dict)
    duplicates_where: dict[str, int] = field(default_factory=dict)
    resent_overdue: int = 0
    telemetry: int = 0
    chunks: int = 0
    fetches: int = 0
    model_active: dict[str, str] = field(default_factory=dict)
    model_active_at: dict[str, float] = field(default_factory=dict)


class _Owed:
    """One escalation waiting for its answer."""

    __slots__ = ("created", "due", "request", "wait_s")

    def __init__(self, request: bytes, created: float, wait_s: float) -> None:
        self.request = request
        self.created = created
        self.wait_s = wait_s
        self.due = float("inf")  # not sent yet


class _Download:
    """One model version arriving chunk by chunk, verified whole."""

    def __init__(self, manifest: env.Manifest) -> None:
        self.manifest = manifest
        self.chunks: dict[int, bytes] = {}
        self.last_chunk = time.monotonic()

    def add(self, chunk: env.Chunk) -> None:
        if 0 <= chunk.index < self.manifest.chunk_count and chunk.index not in self.chunks:
            if hashlib.sha256(chunk.data).hexdigest() == chunk.sha256:
                self.chunks[chunk.index] = chunk.data
                self.last_chunk = time.monotonic()

    @property
    def complete(self) -> bool:
        return len(self.chunks) == self.manifest.chunk_count

    def verified(self) -> bool:
        digest = hashlib.sha256()
        for index in range(self.manifest.chunk_count):
            digest.update(self.chunks[index])
        return digest.hexdigest() == self.manifest.sha256

    def missing_ranges(self) -> list[list[int]]:
        ranges: list[list[int]] = []
        for index in range(self.manifest.chunk_count):
            if index in self.chunks:
                continue
            if ranges and ranges[-1][1] == index:
                ranges[-1][1] = index + 1
            else:
                ranges.append([index, index + 1])
        return ranges


class SimDevice:
    """One simulated device: a session, an escalation pacer, and the handlers of what arrives."""

    def __init__(self, identity: Identity, settings: SimSettings, frames: Sequence[SimFrame]) -> None:
        self.identity = identity
        self.device_id = identity.device_id
        self.settings = settings
        self.frames = frames
        self.stats = DeviceStats()
        self.models: dict[str, str] = {}
        self.session = MqttSession(
            self.device_id,
            settings.host,
            settings.port,
            username=identity.username,
            password=identity.password,
            keepalive=settings.keepalive,
            protocol=settings.protocol,  # type: ignore[arg-type]
            presence=presence_factory(
                self.device_id, "device", profile=identity.profile, fleet=identity.fleet, models=self.models
            ),
            persistent=True,
            reconnect_min_s=settings.reconnect_min_s,
            reconnect_max_s=settings.reconnect_max_s,
        )
        self.reply_to = topics.RESULT.build(device_id=self.device_id)
        # trace id -> what is owed an answer (its request, when made, when next due again).
        self.owed: dict[str, _Owed] = {}
        self.first_answer: dict[str, bytes] = {}
        self.queue: deque[str] = deque()
        self._wake = asyncio.Event()
        self._downloads: dict[str, _Download] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._seq = 0
        self._rng = random.Random(self.device_id)

    async def start(self) -> None:
        await self.session.__aenter__()
        await self.session.subscribe(self.reply_to, qos=1)
        await self.session.subscribe(topics.MODEL_ANNOUNCE.filter(), qos=1)
        await self.session.subscribe(topics.MODEL_RESEND.filter(device_id=self.device_id), qos=1)
        name = self.device_id
        self._tasks = [
            asyncio.create_task(self._receive(), name=f"{name}-rx"),
            asyncio.create_task(self._send(), name=f"{name}-tx"),
            asyncio.create_task(self._watch_link(), name=f"{name}-link"),
            asyncio.create_task(self._telemetry(), name=f"{name}-telemetry"),
        ]
        self.start_escalating()

    def start_escalating(self) -> None:
        if self.settings.escalations_per_s > 0:
            self._tasks.append(asyncio.create_task(self._escalate(), name=f"{self.device_id}-escalate"))

    async def stop_escalating(self) -> None:
        for task in self._tasks:
            if task.get_name().endswith("-escalate"):
                await cancel_and_wait(task)

    async def close(self) -> None:
        await cancel_and_wait(*self._tasks)
        await self.session.close()

    # -- escalations -------------------------------------------------------------------------

    def escalate_one(self) -> str:
        """Queue one hard frame's request; returns its trace id."""
        self._seq += 1
        frame = self.frames[(self._seq + hash(self.device_id)) % len(self.frames)]
        trace_id = f"{self._seq:x}-{secrets.token_hex(4)}"
        now = time.time()
        request = env.Request(
            trace_id=trace_id,
            device_id=self.device_id,
            fleet=self.identity.fleet,
            created=now,
            deadline=now + self.settings.deadline_ms / 1000,
            model_hint=self.settings.model_hint,
            local=frame.local,
            reasons=["low_confidence"],
            payload=frame.payload,
            content_type=frame.content_type,
            reply_to=self.reply_to,
        )
        self.owed[trace_id] = _Owed(env.encode(request), time.perf_counter(), self.settings.resend_after_s)
        self.queue.append(trace_id)
        self._wake.set()
        return trace_id

    async def _escalate(self) -> None:
        period = 1.0 / self.settings.escalations_per_s
        await asyncio.sleep(self._rng.uniform(0, period))  # devices out of phase, as in a fleet
        next_at = time.monotonic()
        while True:
            self.escalate_one()
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def _send(self) -> None:
        """Publish queued requests while the link is up; one the broker did not take goes back."""
        while True:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
            await self.session.wait_connected(None)
            trace_id = self.queue.popleft()
            owed = self.owed.get(trace_id)
            if owed is None:  # answered meanwhile
                continue
            topic = topics.REQUEST.build(device_id=self.device_id, trace_id=trace_id)
            try:
                await self.session.publish(topic, owed.request, qos=1, timeout=None)
                self.stats.sent += 1
                owed.due = time.perf_counter() + owed.wait_s
            except NotConnected:
                self.queue.appendleft(trace_id)
                await asyncio.sleep(0.05)

    async def _watch_link(self) -> None:
        """After each reconnect every owed request goes again, paced: the broker may or may not
        have taken the ones in flight when the link dropped; the bridge answers a repeat from its
        dedupe without running it again. One whose answer is overdue goes again too."""
        seen = 1
        while True:
            await asyncio.sleep(0.2)
            connects = self.session.connects
            if connects > seen and self.session.connected:
                seen = connects
                await self._replay([t for t, o in self.owed.items() if self._replays(o) and t not in self.queue])
            now = time.perf_counter()
            overdue = [t for t, o in self.owed.items() if o.due <= now]
            for trace_id in overdue:  # the answer was lost somewhere: ask again, less often each time
                owed = self.owed[trace_id]
                owed.wait_s *= 2
                owed.due = float("inf")
                self.stats.resent_overdue += 1
            if overdue:
                await self._replay(overdue)

    def _replays(self, owed: _Owed) -> bool:
        # An acknowledged request has a finite due time; one never acknowledged has none.
        return self.settings.replay == "all" or owed.due == float("inf")

    async def _replay(self, trace_ids: list[str]) -> None:
        gap = 1.0 / self.settings.replay_per_s
        for trace_id in trace_ids:
            if trace_id in self.owed:
                self.queue.append(trace_id)
                self._wake.set()
                await asyncio.sleep(gap)

    def _take_result(self, payload: bytes) -> None:
        result = env.decode(env.Result, payload)
        owed = self.owed.pop(result.trace_id, None)
        if owed is None:
            first = self.first_answer.get(result.trace_id)
            if first is None:
                return  # not ours (an answer to a request of an earlier run)
            if first == payload:
                self.stats.redelivered += 1
            else:
                self.stats.duplicates += 1
                earlier = env.decode(env.Result, first).bridge_id
                where = "by the same bridge" if earlier == result.bridge_id else "by two bridges"
                self.stats.duplicates_where[where] = self.stats.duplicates_where.get(where, 0) + 1
            return
        self.first_answer[result.trace_id] = payload
        self.stats.answered += 1
        self.stats.statuses[result.status] = self.stats.statuses.get(result.status, 0) + 1
        if result.status != "ok":
            why = f"{result.status}: {_REASON_DETAILS.sub('#', result.reason or 'no reason given')}"[:160]
            self.stats.not_ok[why] = self.stats.not_ok.get(why, 0) + 1
        self.stats.round_trip_ms.append((time.perf_counter() - owed.created) * 1000)
        self.stats.answered_by[result.bridge_id] = self.stats.answered_by.get(result.bridge_id, 0) + 1

    # -- what arrives ------------------------------------------------------------------------

    async def _receive(self) -> None:
        async for message in self.session.messages():
            try:
                topic = message.topic
                if topic.startswith("model/chunk/") and not self._wants_chunk(topic):
                    self.stats.chunks += 1  # a chunk of a push it holds already
                    continue
                payload = bytes(message.payload)
                if topic == self.reply_to:
                    self._take_result(payload)
                elif topic.startswith("model/announce/"):
                    if payload:
                        await self._announce(env.decode(env.Manifest, payload))
                elif topic.startswith(("model/chunk/", "model/resend/")):
                    await self._chunk(env.decode(env.Chunk, payload))
            except DecodeError as exc:
                log.warning("%s: dropped a malformed message on %s: %s", self.device_id, message.topic, exc)

    def _wants_chunk(self, topic: str) -> bool:
        """Whether a chunk is one this device still lacks, read from its topic alone: a resend
        for another device is dropped without copying or decoding its payload."""
        levels = topic.split("/")
        if len(levels) != 5:
            return False
        download = self._downloads.get(levels[2])
        return (
            download is not None
            and download.manifest.version == levels[3]
            and levels[4].isdigit()
            and int(levels[4]) not in download.chunks
        )

    async def _announce(self, manifest: env.Manifest) -> None:
        if not delivery.targets_match(manifest.targets, self.device_id, self.identity.profile, self.identity.fleet):
            return
        if self.models.get(manifest.name) == manifest.version:
            return
        current = self._downloads.get(manifest.name)
        if current is not None and current.manifest.version == manifest.version:
            return
        self._downloads[manifest.name] = _Download(manifest)
        chunk_filter = topics.MODEL_CHUNK.filter(model=manifest.name, version=manifest.version)
        await self.session.subscribe(chunk_filter, qos=1)
        await self._status(manifest, "downloading", 0.0)
        self._tasks.append(asyncio.create_task(self._fetch_missing(manifest.name), name=f"{self.device_id}-fetch"))

    async def _fetch_missing(self, name: str) -> None:
        """Ask the distributor for what has not come, whenever chunks stop coming."""
        while True:
            download = self._downloads.get(name)
            if download is None or download.complete:
                return
            idle = time.monotonic() - download.last_chunk
            if idle >= self.settings.fetch_after_s and self.session.connected:
                manifest = download.manifest
                request = env.FetchRequest(
                    device_id=self.device_id,
                    name=name,
                    version=manifest.version,
                    ranges=download.missing_ranges(),
                )
                self.stats.fetches += 1
                with contextlib.suppress(NotConnected):
                    await self.session.publish(
                        topics.MODEL_FETCH.build(device_id=self.device_id, model=name), env.encode(request), qos=1
                    )
                download.last_chunk = time.monotonic()
            await asyncio.sleep(max(0.05, self.settings.fetch_after_s - idle))

    async def _chunk(self, chunk: env.Chunk) -> None:
        self.stats.chunks += 1
        download = self._downloads.get(chunk.name)
        if download is None or download.manifest.version != chunk.version:
            return
        download.add(chunk)
        if not download.complete:
            return
        manifest = download.manifest
        del self._downloads[chunk.name]
        if not download.verified():
            await self._status(manifest, "failed", 1.0, "sha256 does not match the manifest")
            return
        self.models[manifest.name] = manifest.version
        self.stats.model_active[manifest.name] = manifest.version
        self.stats.model_active_at[f"{manifest.name}@{manifest.version}"] = time.time()
        await self._status(manifest, "active", 1.0)
        await self.session.refresh_presence()

    async def _status(self, manifest: env.Manifest, state: str, progress: float, reason: str | None = None) -> None:
        status = env.ModelStatus(
            device_id=self.device_id,
            name=manifest.name,
            version=manifest.version,
            state=state,  # type: ignore[arg-type]
            progress=progress,
            reason=reason,
            ts=time.time(),
        )
        with contextlib.suppress(NotConnected):
            await self.session.publish(
                topics.MODEL_STATUS.build(device_id=self.device_id, model=manifest.name),
                env.encode(status),
                qos=1,
                retain=True,
                timeout=30,
            )

    async def _telemetry(self) -> None:
        interval = self.settings.telemetry_interval_s
        await asyncio.sleep(self._rng.uniform(0, interval))
        topic = topics.TELEMETRY.build(client_id=self.device_id)
        while True:
            metrics = {
                "escalations_sent_total": float(self.stats.sent),
                "escalations_answered_total": float(self.stats.answered),
                "escalations_owed": float(len(self.owed)),
            }
            sample = env.Telemetry(client_id=self.device_id, ts=time.time(), metrics=metrics)
            if await self.session.publish(topic, env.encode(sample), qos=0):
                self.stats.telemetry += 1
            await asyncio.sleep(interval)
