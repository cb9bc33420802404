"""The distributor's answers to fetches: which chunks go out, to whom, and how fast.

A fetch the distributor has checked (:mod:`.distributor`) names chunks of a version it holds.
Each is published on the asking device's own ``model/resend/<device>/...`` topic: only that
device receives it, so a straggler's resend costs one copy, not one per device subscribed to the
model. When many devices lack the same version at once (a canary promoted: the rest of the fleet
fetches the whole artefact within seconds), one copy each would queue the fleet behind the
overall fetch budget; so once fetches for one version come from ``FleetResend.min_devices``
distinct devices within ``FleetResend.window_s``, the chunks asked for are published once on the
fleet's ``model/chunk/...`` topic instead, which every device downloading that version reads
(each chunk at most once per window). Only distinct devices count, so no device can make the
distributor broadcast on its own.

Resends are paid for from token buckets (``FetchLimits``: one per device and one for all of
them together), so a few small fetches cannot turn into hundreds of MiB re-broadcast; a chunk
already on its way is not queued twice. A fixed number of senders publish the queue, so at most
that many chunks wait for the broker's acknowledgement at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from edgewire import delivery, topics
from edgewire import envelopes as env
from edgewire.metrics import Meter
from edgewire.ratelimit import BucketsPerKey, TokenBucket
from edgewire.session import MqttSession, NotConnected

from .artefact_store import StoredArtefact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchLimits:
    """How many chunk bytes fetches may make the distributor resend: per device, and for all
    devices together (which also bounds what made-up device ids can ask for). A fetch beyond
    them is served as far as the buckets allow and refused for the rest; the device asks again
    for what it still lacks when its link goes quiet."""

    device_bytes_per_s: float = 2 * env.MIB
    device_burst_bytes: float = 32 * env.MIB
    total_bytes_per_s: float = 16 * env.MIB
    total_burst_bytes: float = 128 * env.MIB

    def __post_init__(self) -> None:
        for name in ("device_bytes_per_s", "total_bytes_per_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be 0 or more (bytes a second), got {getattr(self, name)}")
        for name in ("device_burst_bytes", "total_burst_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be more than 0 (bytes), got {getattr(self, name)}")


@dataclass(frozen=True)
class FleetResend:
    """When fetches turn into one broadcast: fetches for one version from at least
    ``min_devices`` distinct devices within ``window_s`` seconds are answered on the fleet's
    chunk topic, each chunk at most once per ``window_s``. The broadcast is paid from the
    overall fetch budget once per chunk (and from the asker's own budget), however many devices
    it reaches. A ``min_devices`` the fleet never reaches keeps every resend per device."""

    min_devices: int = 3
    window_s: float = 1.0

    def __post_init__(self) -> None:
        if self.min_devices < 2:
            raise ValueError("min_devices must be at least 2: one device alone must not make a broadcast")
        if self.window_s <= 0:
            raise ValueError("window_s must be positive")


@dataclass(frozen=True)
class _Send:
    device: str | None  # None: the fleet's chunk topic, for every device downloading the version
    name: str
    version: str
    index: int


@dataclass(frozen=True)
class QueuedFetch:
    """What one fetch made of the chunks it asked for."""

    queued: int  # chunks put on the send queue
    refused: int  # chunks over the fetch budget, not sent
    to_fleet: bool  # whether they go to the fleet's topic rather than to the asker's own


class Resends:
    """The send queue of one distributor, its budgets and what it remembers to coalesce
    fetches: who fetched each version lately, and when each chunk last went to the fleet."""

    def __init__(
        self,
        client_id: str,
        meter: Meter,
        artefacts: Mapping[tuple[str, str], StoredArtefact],
        limits: FetchLimits,
        fleet_resend: FleetResend,
    ) -> None:
        """``artefacts`` is the distributor's store, read when a chunk is sent: a version
        replaced or gone by then is not sent."""
        self.client_id = client_id
        self.meter = meter
        self._artefacts = artefacts
        self.limits = limits
        self.fleet_resend = fleet_resend
        self._device_budget = BucketsPerKey(limits.device_bytes_per_s, limits.device_burst_bytes)
        self._total_budget = TokenBucket.full(limits.total_bytes_per_s, limits.total_burst_bytes, time.monotonic())
        # Per version: when each device last fetched it (only the last window's are kept).
        self._askers: dict[tuple[str, str], dict[str, float]] = {}
        # Per chunk of a version: when it was last queued for the fleet's topic.
        self._broadcast_at: dict[tuple[str, str, int], float] = {}
        self._sends: asyncio.Queue[_Send] = asyncio.Queue()
        self._queued: set[_Send] = set()

    @property
    def waiting(self) -> int:
        """Chunks queued and not yet taken by a sender."""
        return self._sends.qsize()

    @property
    def idle(self) -> bool:
        """Whether no chunk waits to go out."""
        return self._sends.qsize() == 0 and not self._queued

    def queue(self, device: str, manifest: env.Manifest, indices: set[int]) -> QueuedFetch:
        """Queue the chunks ``indices`` of a complete version that ``device`` fetched, as far as
        the budgets allow: to the device, or to the fleet once enough devices ask for it."""
        model, version = manifest.name, manifest.version
        queued = refused = 0
        now = time.monotonic()
        to_fleet = self._asked_by_many(model, version, device, now)
        budget = self._device_budget.bucket(device)
        for index in sorted(indices):
            if self._on_its_way(device, model, version, index, now, to_fleet=to_fleet):
                self.meter.inc("distributor_chunks_coalesced_total")
                continue
            length = delivery.expected_chunk_length(manifest, index)
            if refused or budget.available(now) < length or not self._total_budget.take(length, now):
                refused += 1  # over budget: this chunk and every later one of this fetch
                continue
            budget.take(length, now)
            send = _Send(None if to_fleet else device, model, version, index)
            if to_fleet:
                self._broadcast_at[(model, version, index)] = now
            self._queued.add(send)
            self._sends.put_nowait(send)
            queued += 1
        if refused:
            self.meter.inc("distributor_fetch_chunks_refused_total", refused)
        return QueuedFetch(queued, refused, to_fleet)

    def _asked_by_many(self, name: str, version: str, device: str, now: float) -> bool:
        """Record ``device``'s fetch of this version; whether enough distinct devices fetched it
        within the window for the answer to go to the fleet's topic."""
        rule = self.fleet_resend
        askers = self._askers.setdefault((name, version), {})
        askers[device] = now
        for other, when in list(askers.items()):
            if now - when > rule.window_s:
                del askers[other]
        return len(askers) >= rule.min_devices

    def _on_its_way(self, device: str, name: str, version: str, index: int, now: float, *, to_fleet: bool) -> bool:
        """Whether this chunk will reach ``device`` without queuing it again: it waits to go to
        the fleet's topic (which the device reads while downloading), or to the device itself,
        or (when answering the fleet) it went to the fleet's topic within the window."""
        if _Send(None, name, version, index) in self._queued:
            return True
        if to_fleet:
            last = self._broadcast_at.get((name, version, index))
            return last is not None and now - last < self.fleet_resend.window_s
        return _Send(device, name, version, index) in self._queued

    def forget(self, name: str, version: str) -> None:
        """Drop what is remembered of a version replaced by another artefact; its queued sends
        find the new artefact incomplete and are skipped."""
        self._queued = {s for s in self._queued if (s.name, s.version) != (name, version)}
        self._askers.pop((name, version), None)
        self._broadcast_at = {k: t for k, t in self._broadcast_at.items() if k[:2] != (name, version)}

    async def drain(self) -> None:
        """Return once every queued chunk has been sent (or given up on)."""
        await self._sends.join()

    async def sender(self, session: MqttSession) -> None:
        """One of the distributor's ``window`` workers: at most that many chunk publishes wait
        for their ack at once."""
        while True:
            send = await self._sends.get()
            try:
                self._queued.discard(send)
                art = self._artefacts.get((send.name, send.version))
                if art is None or not art.complete:
                    continue
                data = art.read(send.index)
                chunk = env.Chunk(
                    name=send.name,
                    version=send.version,
                    index=send.index,
                    sha256=hashlib.sha256(data).hexdigest(),
                    data=data,
                )
                if send.device is None:
                    topic = topics.MODEL_CHUNK.build(model=send.name, version=send.version, index=send.index)
                else:
                    topic = topics.MODEL_RESEND.build(
                        device_id=send.device, model=send.name, version=send.version, index=send.index
                    )
                try:
                    await session.publish(topic, env.encode(chunk), qos=topics.MODEL_CHUNK.qos, timeout=30)
                except NotConnected as exc:
                    self.meter.inc("distributor_chunks_unsent_total")
                    log.warning("%s: chunk not sent to %s: %s", self.client_id, topic, exc)
                    continue
                to = "fleet" if send.device is None else "device"
                self.meter.inc("distributor_chunks_served_total", to=to)
                self.meter.inc("distributor_bytes_served_total", len(data), to=to)
            except Exception as exc:  # an unreadable chunk costs that chunk, not a sender
                self.meter.inc("distributor_chunks_unsent_total")
                log.error(
                    "%s: cannot send chunk %d of %s %s: %r", self.client_id, send.index, send.name, send.version, exc
                )
            finally:
                self._sends.task_done()
