"""The model distributor: keeps every pushed artefact and resends the chunks a device lacks.

An operator pushes a model once; devices that were offline, joined later or lost a chunk must
still get it. The distributor listens to the same announce and chunk topics the devices do,
stores each artefact as it streams past (its persistent session keeps chunks queued at the
broker while it restarts), and answers ``model/fetch/<device>/<model>`` with exactly the chunks
asked for, on that device's own ``model/resend/<device>/...`` topic, or once on the fleet's
chunk topic when many devices fetch the same version at once; which, and how fast (the fetch
budgets), is :mod:`.resends`'s.

Everything it receives is checked before it is believed: a chunk must agree with its topic, its
manifest and its own checksum; a version is served only after the whole artefact hashes to the
manifest's sha256; a fetch must come from the device its topic names. An announce's numbers are
bounded (``StoreLimits``) before anything is allocated or created for it, and fetches are paid
for from token buckets (``FetchLimits``: one per device and one for all of them together), so
a few small fetches cannot turn into hundreds of MiB re-broadcast. A bad message is logged
with its reason and counted (``messages_rejected_total{reason=...}``); it never stops the loop.
What is kept, and how, is :mod:`.artefact_store`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgewire import delivery, sdnotify, signing, topics
from edgewire import envelopes as env
from edgewire.aio import cancel_and_wait, spawn
from edgewire.config import BrokerSettings
from edgewire.errors import DecodeError, EdgewireError, TopicError
from edgewire.metrics import Meter
from edgewire.session import MqttSession, presence_factory

from .artefact_store import StoredArtefact, StoreLimits, artefact_file, manifest_problem, stored_folders
from .resends import FetchLimits, FleetResend, Resends

log = logging.getLogger(__name__)

SessionFactory = Callable[[], MqttSession]


def default_client_id() -> str:
    """``distributor-<host>``: stable across restarts, so the broker keeps its persistent session."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "host"
    return f"distributor-{host}"[:128]


class Distributor:
    """One per fleet (or per broker cluster): with several, each stores every push and every
    one answers each fetch, which costs bandwidth but never correctness (chunks carry checksums
    and devices ignore what they hold already)."""

    def __init__(
        self,
        broker: BrokerSettings | str,
        store_dir: str | Path,
        *,
        client_id: str | None = None,
        window: int = 16,
        pending_limit_bytes: int = 64 * env.MIB,
        telemetry_interval_s: float = 5.0,
        meter: Meter | None = None,
        session_factory: SessionFactory | None = None,
        limits: StoreLimits | None = None,
        fetch_limits: FetchLimits | None = None,
        fleet_resend: FleetResend | None = None,
        fleet_key: Ed25519PublicKey | None = None,
    ) -> None:
        """``fleet_key``: when given, only announces signed with the fleet's key are stored (as
        devices install only those); without it any announce within ``limits`` is."""
        self.broker = BrokerSettings(url=broker) if isinstance(broker, str) else broker
        self.store_dir = Path(store_dir)
        self.client_id = client_id or default_client_id()
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window
        self.meter = meter or Meter(self.client_id)
        self._session_factory = session_factory
        self.limits = limits or StoreLimits()
        self.fleet_key = fleet_key
        self._pending_limit = pending_limit_bytes
        self._telemetry_interval_s = telemetry_interval_s
        self._artefacts: dict[tuple[str, str], StoredArtefact] = {}
        self.resends = Resends(
            self.client_id, self.meter, self._artefacts, fetch_limits or FetchLimits(), fleet_resend or FleetResend()
        )
        # Chunks that arrived before their manifest (another client's order is not guaranteed
        # across topics); bounded, because an unannounced stream must not fill the memory.
        self._pending: dict[tuple[str, str], dict[int, env.Chunk]] = {}
        self._pending_bytes = 0
        self._jobs: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self.session: MqttSession | None = None
        self.ready = asyncio.Event()

    # -- what tests and operators ask -------------------------------------------------------

    def holds(self, name: str, version: str) -> bool:
        """Whether a verified copy of this version is stored and served."""
        art = self._artefacts.get((name, version))
        return art is not None and art.complete

    def manifest(self, name: str, version: str) -> env.Manifest | None:
        art = self._artefacts.get((name, version))
        return art.manifest if art is not None else None

    def artefact_path(self, name: str, version: str) -> Path:
        return artefact_file(self.store_dir, name, version)

    @property
    def chunks_served(self) -> int:
        return int(self.meter.total("distributor_chunks_served_total"))

    def rejected(self, reason: str) -> int:
        return int(self.meter.get("messages_rejected_total", reason=reason))

    # -- lifecycle --------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop taking messages, finish the chunk sends already queued, then disconnect."""
        self._stop.set()

    def _make_session(self) -> MqttSession:
        if self._session_factory is not None:
            return self._session_factory()
        return MqttSession.from_settings(
            self.client_id,
            self.broker,
            presence=presence_factory(self.client_id, "distributor"),
            meter=self.meter,
            persistent=True,  # chunks pushed while the distributor restarts wait at the broker
        )

    async def run(self) -> None:
        self._load_store()
        session = self._make_session()
        self.session = session
        async with session:
            await session.wait_connected(None)
            for spec in (topics.MODEL_ANNOUNCE, topics.MODEL_CHUNK, topics.MODEL_FETCH):
                await session.subscribe(spec.filter(), qos=spec.qos)
            held = sum(1 for a in self._artefacts.values() if a.complete)
            log.info("%s: serving %d stored version(s) from %s", self.client_id, held, self.store_dir)
            for art in self._artefacts.values():  # stopped between the last chunk and its verification
                if not art.complete and art.missing == 0:
                    art.verifying = True
                    self._spawn(self._verify(art))
            self.ready.set()
            sdnotify.notify(f"READY=1\nSTATUS=serving {held} model version(s) from {self.store_dir}")
            senders = [asyncio.create_task(self.resends.sender(session)) for _ in range(self.window)]
            listener = asyncio.create_task(self._listen(session))
            telemetry = asyncio.create_task(self._telemetry(session))
            watchdog = asyncio.create_task(sdnotify.watchdog(lambda: session.connected))
            try:
                await self._stop.wait()
            finally:
                await cancel_and_wait(listener)
                for message in session.drain_inbox():  # acknowledged to the broker already: handle them too
                    with contextlib.suppress(Exception):
                        self._on_message(str(message.topic), bytes(message.payload))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.resends.drain(), 10)
                if self._jobs:  # a verification under way is worth finishing: it saves a whole resend
                    await asyncio.wait(set(self._jobs), timeout=30)
                await cancel_and_wait(*senders, telemetry, watchdog, *self._jobs)
                with contextlib.suppress(Exception):
                    await self._publish_telemetry(session)
                for art in self._artefacts.values():
                    art.close()

    def _load_store(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        for folder in stored_folders(self.store_dir):
            try:
                art = StoredArtefact.load(folder)
            except (OSError, EdgewireError) as exc:
                log.warning("%s: ignoring %s in the store: %s", self.client_id, folder, exc)
                continue
            self._artefacts[(art.manifest.name, art.manifest.version)] = art
        self._gauge()

    def _gauge(self) -> None:
        self.meter.set("distributor_versions_held", sum(1 for a in self._artefacts.values() if a.complete))

    # -- receiving --------------------------------------------------------------------------

    async def _listen(self, session: MqttSession) -> None:
        async for message in session.messages():
            try:
                self._on_message(str(message.topic), bytes(message.payload))
            except Exception:  # a bug must cost one message, not the distributor
                self._reject("internal", f"{message.topic}: handling failed", exc_info=True)

    def _reject(self, reason: str, why: str, *, exc_info: bool = False) -> None:
        self.meter.inc("messages_rejected_total", reason=reason)
        log.warning("%s: rejected (%s): %s", self.client_id, reason, why, exc_info=exc_info)

    def _decoded(self, kind: type[env.E], payload: bytes, what: str) -> env.E | None:
        """The payload as ``kind``, or None once it is rejected as a bad ``what``."""
        try:
            return env.decode(kind, payload)
        except DecodeError as exc:
            self._reject("payload", f"{what}: {exc}")
            return None

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            parsed = topics.parse(topic)
        except TopicError as exc:
            self._reject("topic", str(exc))
            return
        if parsed.spec is topics.MODEL_ANNOUNCE:
            self._on_announce(parsed["model"], payload)
        elif parsed.spec is topics.MODEL_CHUNK:
            self._on_chunk(parsed, payload)
        elif parsed.spec is topics.MODEL_FETCH:
            self._on_fetch(parsed, payload)
        else:
            # Not subscribed to, but amqtt 0.12 hands a connecting client the retained messages of
            # every filter any client subscribed to: not bad input, just not ours.
            log.debug("%s: ignoring %s", self.client_id, topic)

    def _on_announce(self, model: str, payload: bytes) -> None:
        if not payload:  # the retained announce was withdrawn; what is stored stays servable
            return
        manifest = self._decoded(env.Manifest, payload, f"announce of {model}")
        if manifest is None:
            return
        if manifest.name != model:
            self._reject("manifest", f"announce on {model} names {manifest.name}")
            return
        problem = manifest_problem(manifest, self.limits)
        if problem is not None:
            reason, why = problem
            self._reject(reason, f"{model} {manifest.version}: {why}")
            return
        if self.fleet_key is not None:
            try:
                signing.verify(self.fleet_key, bytes.fromhex(manifest.sha256), manifest.signature or b"")
            except signing.SignatureError as exc:
                self._reject("manifest_signature", f"{model} {manifest.version}: {exc}")
                return
        key = (manifest.name, manifest.version)
        art = self._artefacts.get(key)
        if art is not None and delivery.same_artefact(art.manifest, manifest):
            art.update_manifest(manifest)
        else:
            if art is not None:
                log.warning(
                    "%s: %s %s announced again with another artefact (sha256 %s, was %s); storing the new one",
                    self.client_id,
                    *key,
                    manifest.sha256[:12],
                    art.manifest.sha256[:12],
                )
                art.close()
                self.resends.forget(*key)
            try:
                self._artefacts[key] = StoredArtefact.create(self.store_dir, manifest)
            except OSError as exc:
                self._artefacts.pop(key, None)
                self._reject("manifest_store", f"{model} {manifest.version}: cannot make room for it: {exc}")
                return
            self.meter.inc("distributor_versions_announced_total")
            log.info("%s: storing %s %s (%d chunks)", self.client_id, *key, manifest.chunk_count)
        for chunk in self._pending_pop(key).values():
            self._store_chunk(self._artefacts[key], chunk)
        self._gauge()

    def _on_chunk(self, parsed: topics.ParsedTopic, payload: bytes) -> None:
        key = (parsed["model"], parsed["version"])
        art = self._artefacts.get(key)
        if art is not None and (art.complete or art.verifying):
            # A version pushed again after it was stored: nothing to do.
            self.meter.inc("distributor_chunks_ignored_total")
            return
        chunk = self._decoded(env.Chunk, payload, f"chunk {'/'.join(key)}/{parsed['index']}")
        if chunk is None:
            return
        if (chunk.name, chunk.version, str(chunk.index)) != (*key, parsed["index"]):
            self._reject(
                "chunk_topic",
                f"chunk on {'/'.join(key)}/{parsed['index']} names {chunk.name} {chunk.version} {chunk.index}",
            )
            return
        if art is None:
            self._pending_add(key, chunk)
            return
        self._store_chunk(art, chunk)

    def _pending_add(self, key: tuple[str, str], chunk: env.Chunk) -> None:
        if self._pending_bytes + len(chunk.data) > self._pending_limit:
            self._reject("chunk_unannounced", f"chunk {chunk.index} of {key[0]} {key[1]}, whose manifest was not seen")
            return
        held = self._pending.setdefault(key, {})
        old = held.pop(chunk.index, None)
        self._pending_bytes += len(chunk.data) - (len(old.data) if old else 0)
        held[chunk.index] = chunk

    def _pending_pop(self, key: tuple[str, str]) -> dict[int, env.Chunk]:
        held = self._pending.pop(key, {})
        self._pending_bytes -= sum(len(c.data) for c in held.values())
        return held

    def _store_chunk(self, art: StoredArtefact, chunk: env.Chunk) -> None:
        m = art.manifest
        where = f"chunk {chunk.index} of {m.name} {m.version}"
        if not 0 <= chunk.index < m.chunk_count:
            self._reject("chunk_index", f"{where}: the manifest has {m.chunk_count} chunks")
            return
        expected = delivery.expected_chunk_length(m, chunk.index)
        if len(chunk.data) != expected:
            self._reject("chunk_size", f"{where}: {len(chunk.data)} bytes, expected {expected}")
            return
        if hashlib.sha256(chunk.data).hexdigest() != chunk.sha256:
            self._reject("chunk_checksum", f"{where}: data does not match its sha256")
            return
        art.write(chunk.index, chunk.data)
        self.meter.inc("distributor_chunks_stored_total")
        if art.missing == 0 and not art.verifying:
            art.verifying = True
            self._spawn(self._verify(art))

    async def _verify(self, art: StoredArtefact) -> None:
        """Hash the whole artefact off the event loop; only a match makes the version servable."""
        m = art.manifest
        try:
            digest, size = await asyncio.to_thread(delivery.sha256_file, art.path)
            if art is not self._artefacts.get((m.name, m.version)):
                return  # replaced by another announce meanwhile
            if digest.hex() != m.sha256 or size != m.size:
                self._reject(
                    "artefact_checksum",
                    f"{m.name} {m.version}: the assembled artefact does not match its sha256; receiving it again",
                )
                art.reset()
                return
            await asyncio.to_thread(art.mark_complete)
            self.meter.inc("distributor_versions_complete_total")
            log.info("%s: %s %s complete and verified (%d bytes)", self.client_id, m.name, m.version, m.size)
            self._gauge()
        finally:
            art.verifying = False

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        spawn(self._jobs, coro)

    # -- serving ----------------------------------------------------------------------------

    def _on_fetch(self, parsed: topics.ParsedTopic, payload: bytes) -> None:
        device, model = parsed["device_id"], parsed["model"]
        req = self._decoded(env.FetchRequest, payload, f"fetch from {device} for {model}")
        if req is None:
            return
        if req.device_id != device:
            self._reject("fetch_device_mismatch", f"fetch on {device}'s topic says it is from {req.device_id}")
            return
        if req.name != model:
            self._reject("fetch_model_mismatch", f"fetch on the {model} topic from {device} asks for {req.name}")
            return
        versions = [v for (n, v) in self._artefacts if n == model]
        if not versions:
            self._reject("fetch_unknown_model", f"{device} asks for {model}, which the distributor does not hold")
            return
        art = self._artefacts.get((model, req.version))
        if art is None:
            self._reject(
                "fetch_unknown_version", f"{device} asks for {model} {req.version}; held: {', '.join(sorted(versions))}"
            )
            return
        if not art.complete:
            self._reject(
                "fetch_incomplete", f"{device} asks for {model} {req.version}, still {art.missing} chunks short here"
            )
            return
        indices: set[int] = set()
        count = art.manifest.chunk_count
        for r in req.ranges:
            if len(r) != 2 or not 0 <= r[0] < r[1] <= count:
                self._reject(
                    "fetch_bad_ranges",
                    f"{device} asks for {model} {req.version} chunks {r!r}; valid: [start, end) within 0..{count}",
                )
                return
            indices.update(range(r[0], r[1]))
        self.meter.inc("distributor_fetches_total")
        queued = self.resends.queue(device, art.manifest, indices)
        if queued.refused:
            self._reject(
                "fetch_rate_limited",
                f"{device} asks for {len(indices)} chunk(s) of {model} {req.version}; "
                f"{queued.queued} queued, the rest is over the fetch budget (it may ask again later)",
            )
        log.info(
            "%s: %s fetches %d chunk(s) of %s %s (%d queued for %s)",
            self.client_id,
            device,
            len(indices),
            model,
            req.version,
            queued.queued,
            "the fleet" if queued.to_fleet else "it alone",
        )

    # -- telemetry --------------------------------------------------------------------------

    async def _telemetry(self, session: MqttSession) -> None:
        while True:
            await asyncio.sleep(self._telemetry_interval_s)
            await self._publish_telemetry(session)

    async def _publish_telemetry(self, session: MqttSession) -> None:
        self.meter.set("distributor_sends_queued", self.resends.waiting)
        payload = env.encode(env.Telemetry(client_id=self.client_id, ts=time.time(), metrics=self.meter.snapshot()))
        with contextlib.suppress(EdgewireError):
            await session.publish(topics.TELEMETRY.build(client_id=self.client_id), payload, qos=0)
