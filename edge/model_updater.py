"""The device's side of model delivery: from a retained announce to a new model serving frames.

announce -> download (chunks streamed to the store; a quiet link triggers a fetch of only the
missing ranges) -> verify (sha256 + the fleet's Ed25519 signature) -> validate on a standby
session (loads, golden input gives the expected output shape, latency within the profile's
budget) -> swap (one reference; no frame sees half a model) -> probation (a regression in error
rate or latency rolls the device back on its own). Every step is reported on the retained
``model/status/<device>/<model>`` topic, so an operator and a canary rollout can follow it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgewire import envelopes as env
from edgewire import signing, topics
from edgewire.aio import spawn
from edgewire.config import DeliverySettings
from edgewire.delivery import targets_match
from edgewire.detection import decode_batch
from edgewire.errors import DecodeError, EdgewireError
from edgewire.metrics import Meter
from edgewire.profiles import DeviceProfile
from edgewire.session import MqttSession

from .active_model import ActiveModel
from .download import ChunkRejected, ChunksCorrupt, Download, StoreError, VerifyFailed
from .model_store import ModelStore
from .state import DeviceState

log = logging.getLogger(__name__)

#: Frames a version must serve before its error rate and latency are judged.
_MIN_FRAMES = 20
_GOLDEN_RUNS = 5


@dataclass
class _Usage:
    frames: int = 0
    failures: int = 0
    infer_s: float = 0.0

    @property
    def per_frame_ms(self) -> float:
        return 1000.0 * self.infer_s / self.frames if self.frames else 0.0

    @property
    def error_rate(self) -> float:
        total = self.frames + self.failures
        return self.failures / total if total else 0.0


@dataclass
class _Probation:
    version: str
    previous: ActiveModel
    previous_version: str | None
    baseline_ms: float
    started: float
    usage: _Usage


class ModelHost(Protocol):
    """What the updater needs of the device it updates, and nothing more."""

    @property
    def device_id(self) -> str: ...

    @property
    def fleet(self) -> str: ...

    @property
    def profile(self) -> DeviceProfile: ...

    @property
    def meter(self) -> Meter: ...

    @property
    def state(self) -> DeviceState: ...

    @property
    def session(self) -> MqttSession | None: ...

    @property
    def model(self) -> ActiveModel:
        """The model serving now."""
        ...

    def load_model(self, path: str | Path) -> ActiveModel:
        """Load a model ready to serve (blocking)."""
        ...

    def swap_model(self, new: ActiveModel) -> ActiveModel:
        """Serve ``new`` from the next batch on; returns the model it replaced."""
        ...


class ModelUpdater:
    def __init__(self, device: ModelHost, settings: DeliverySettings) -> None:
        self.device = device
        self.settings = settings
        key = None
        if settings.public_key is not None:
            try:
                key = signing.load_public(settings.public_key.read_text())
            except OSError as exc:
                raise StoreError(f"cannot read the fleet's public key {settings.public_key}: {exc}") from None
        self.store = ModelStore(
            settings.store,
            public_key=key,
            allow_unsigned=settings.allow_unsigned,
            keep_versions=settings.keep_versions,
            meter=device.meter,
            state=device.state,
        )
        self.meter = device.meter
        self.device_id = device.device_id
        self._session: MqttSession | None = None
        self._download: Download | None = None
        self._last_chunk = 0.0
        self._fetch_wait = settings.fetch_after_s
        self._last_status = 0.0
        self._reported = -1.0
        self._busy: asyncio.Task[None] | None = None
        self._probation: _Probation | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"chunks-{device.device_id}")
        self._background: set[asyncio.Future[None]] = set()
        # Per-frame inference time of the serving version, the baseline a new one is judged by.
        self._usage: dict[str, _Usage] = {}

    @property
    def name(self) -> str:
        return self.device.model.meta.name

    def installed_path(self, name: str) -> Path | None:
        """The model to boot with: the store's active version, unless it was marked failed."""
        version = self.store.active(name)
        if version is None or self.store.failed_reason(name, version) is not None:
            version = self.store.previous(name)
        return None if version is None else self.store.path_of(name, version)

    def subscriptions(self) -> list[tuple[str, int]]:
        return [
            (topics.MODEL_ANNOUNCE.build(model=self.name), topics.MODEL_ANNOUNCE.qos),
            (topics.MODEL_CHUNK.filter(model=self.name), topics.MODEL_CHUNK.qos),
            # What the distributor resends to this device alone, answering its fetches.
            (topics.MODEL_RESEND.filter(device_id=self.device_id, model=self.name), topics.MODEL_RESEND.qos),
        ]

    def wants(self, parsed: topics.ParsedTopic) -> bool:
        return parsed.spec in (topics.MODEL_ANNOUNCE, topics.MODEL_CHUNK, topics.MODEL_RESEND) and (
            parsed["model"] == self.name
        )

    # -- messages ----------------------------------------------------------------------------

    async def handle(self, parsed: topics.ParsedTopic, data: bytes | bytearray) -> None:
        if parsed.spec is topics.MODEL_CHUNK or parsed.spec is topics.MODEL_RESEND:
            await self._on_chunk(data)
        elif data:  # an empty retained announce is a withdrawn model: nothing to do
            await self._on_announce(data)

    async def _on_announce(self, data: bytes | bytearray) -> None:
        try:
            manifest = env.decode(env.Manifest, data)
        except DecodeError as exc:
            await self._status("unknown", "failed", reason=f"unreadable announce: {exc}")
            raise
        if manifest.name != self.name:
            await self._status(manifest.version, "failed", reason=f"announce names model {manifest.name!r}")
            return
        if not targets_match(manifest.targets, self.device_id, self.device.profile.name, self.device.fleet):
            self.meter.inc("model_announces_ignored_total", reason="not_targeted")
            return
        version = manifest.version
        if version == self.device.model.meta.version or (self._download and self._download.manifest == manifest):
            return
        if self.store.failed_reason(self.name, version) is not None:
            self.meter.inc("model_announces_ignored_total", reason="failed_before")
            return
        if self._busy is not None and not self._busy.done():
            await self._busy
        reason = self._refusal(manifest)
        if reason is not None:
            await self._status(version, "failed", reason=reason)
            return
        if self._download is not None and self._download.manifest.version != version:
            self.store.discard_partial(self.name, self._download.manifest.version)
            self._download = None
        if self.store.path_of(self.name, version) is not None:
            # Held already (a rollback to a kept version): no download, straight to validation.
            self._start(self._activate(manifest, self.store.path_of(self.name, version)))
            return
        try:
            self._download = await asyncio.to_thread(self.store.download, manifest)
        except StoreError as exc:
            await self._status(version, "failed", reason=str(exc))
            return
        self._last_chunk = time.monotonic()
        self._fetch_wait = self.settings.fetch_after_s
        log.info("%s: downloading %s %s (%d bytes)", self.device_id, self.name, version, manifest.size)
        self._status_soon(version, "downloading", progress=self._download.progress)
        if self._download.complete:  # everything was kept from an earlier run
            download, self._download = self._download, None
            self._start(self._finish(download))

    def _refusal(self, manifest: env.Manifest) -> str | None:
        """Why this device cannot run the announced artefact, checked before a byte is fetched."""
        profile = self.device.profile
        backend = {"onnx": "onnxruntime", "tensorrt-plan": "tensorrt"}.get(manifest.format)
        if backend is None:
            return f"unknown format {manifest.format!r} (known: onnx, tensorrt-plan)"
        if backend not in profile.backends:
            return f"format {manifest.format} needs {backend}, profile {profile.name} has {', '.join(profile.backends)}"
        if manifest.precision not in profile.precisions:
            runs = ", ".join(profile.precisions)
            return f"precision {manifest.precision} is not one profile {profile.name} runs ({runs})"
        return None

    async def _on_chunk(self, data: bytes | bytearray) -> None:
        chunk = env.decode(env.Chunk, data)
        download = self._download
        if download is None or download.complete or chunk.version != download.manifest.version:
            self.meter.inc("model_chunks_ignored_total")
            return
        self._last_chunk = time.monotonic()
        self._fetch_wait = self.settings.fetch_after_s
        # Written on one ordered thread without waiting here: decoding the next chunk overlaps
        # hashing and writing this one, and the store sees chunks in the order they came.
        written = asyncio.get_running_loop().run_in_executor(self._writer, download.write, chunk)
        written.add_done_callback(functools.partial(self._written, download))

    def _written(self, download: Download, written: asyncio.Future[bool]) -> None:
        exc = written.exception()
        if isinstance(exc, ChunkRejected):
            log.warning("%s: %s", self.device_id, exc)
            # Asked for again by the next fetch; the operator sees why the download slowed.
            self._status_soon(download.manifest.version, "downloading", progress=download.progress, reason=str(exc))
        elif exc is not None:
            log.error("%s: writing a chunk failed: %s", self.device_id, exc)
        elif download.complete and self._download is download:
            self._download = None
            self._start(self._finish(download))

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    def _start(self, coro: Any) -> None:
        self._busy = asyncio.ensure_future(coro)

    # -- verify, validate, swap ----------------------------------------------------------------

    async def _finish(self, download: Download) -> None:
        manifest = download.manifest
        self._status_soon(manifest.version, "verifying", progress=1.0)
        try:
            path = await asyncio.to_thread(self.store.verify_and_install, download)
        except ChunksCorrupt as exc:
            log.warning("%s: %s", self.device_id, exc)
            self._download = await asyncio.to_thread(self.store.download, manifest)
            self._last_chunk = time.monotonic()
            self._fetch_wait = self.settings.fetch_after_s
            await self._status(manifest.version, "downloading", progress=self._download.progress, reason=str(exc))
            return
        except (VerifyFailed, StoreError) as exc:
            await self._fail(manifest.version, str(exc))
            return
        await self._activate(manifest, path)

    async def _activate(self, manifest: env.Manifest, path: Path | None) -> None:
        version = manifest.version
        await self._status(version, "validating", progress=1.0)
        if path is None:
            await self._fail(version, "installed file is missing")
            return
        try:
            new = await asyncio.to_thread(self._validate, path, manifest)
        except EdgewireError as exc:
            await self._fail(version, str(exc))
            return
        current = self.device.model
        await asyncio.to_thread(self.store.activate, self.name, version)
        self.device.swap_model(new)
        baseline = self._usage.get(current.meta.version)
        self._probation = _Probation(
            version=version,
            previous=current,
            previous_version=current.meta.version,
            baseline_ms=baseline.per_frame_ms if baseline and baseline.frames >= _MIN_FRAMES else 0.0,
            started=time.monotonic(),
            usage=_Usage(),
        )
        self._usage[version] = self._probation.usage
        self.meter.inc("model_activations_total")
        await self._status(version, "active", progress=1.0)

    def _validate(self, path: Path, manifest: env.Manifest) -> ActiveModel:
        """Runs on a thread, beside the serving model: the new one must load, answer a golden
        input in the right shape, and fit the profile's latency budget before it serves."""
        model = self.device.load_model(path)
        meta = model.meta
        if meta.name != manifest.name:
            raise StoreError(f"the artefact's metadata names model {meta.name!r}, the manifest {manifest.name!r}")
        if meta.version != manifest.version:
            said = f"the artefact's metadata says version {meta.version!r}"
            raise StoreError(f"{said}, the manifest {manifest.version!r}")
        spec = meta.input
        shape = (spec.height, spec.width) if model.pre.gray else (spec.height, spec.width, 3)
        golden = np.full(shape, 128, np.uint8)
        timings = []
        out = None
        for _ in range(_GOLDEN_RUNS):
            t0 = time.perf_counter()
            out = model.engine.infer(model.pre.batch([golden]))
            timings.append((time.perf_counter() - t0) * 1000.0)
        if meta.detect is not None:
            # A detector's output must decode (its format was checked against the graph at load).
            if out is None or len(out) != 1:
                raise StoreError(f"golden input gave {None if out is None else len(out)} outputs, expected 1")
            decode_batch(out, meta.detect.format, [model.pre.geometry(golden)], model.decode, (spec.height, spec.width))
        else:
            expected = (1, len(meta.labels))
            if out is None or tuple(out.shape) != expected:
                got = None if out is None else tuple(out.shape)
                raise StoreError(f"golden input gave output shape {got}, expected {expected}")
        if not np.all(np.isfinite(out)):
            raise StoreError("golden input gave non-finite output")
        budget = self.device.profile.limits.latency_budget_ms
        latency = statistics.median(timings)
        if latency > budget:
            raise StoreError(f"golden input took {latency:.1f} ms, over the profile's {budget:.0f} ms budget")
        return model

    async def _fail(self, version: str, reason: str) -> None:
        log.warning("%s: %s %s failed: %s", self.device_id, self.name, version, reason)
        await asyncio.to_thread(self.store.mark_failed, self.name, version, reason)
        self.meter.inc("model_updates_failed_total")
        await self._status(version, "failed", reason=reason)

    # -- probation -----------------------------------------------------------------------------

    def observe(self, version: str, frames: int, failures: int, infer_s: float) -> None:
        """Called once per batch with the version that served it."""
        usage = self._usage.setdefault(version, _Usage())
        usage.frames += frames
        usage.failures += failures
        usage.infer_s += infer_s

    async def _judge_probation(self) -> None:
        p = self._probation
        if p is None:
            return
        usage = p.usage
        reason = None
        if usage.frames + usage.failures >= _MIN_FRAMES:
            if usage.error_rate > self.settings.max_error_rate:
                reason = f"error rate {usage.error_rate:.1%} over {self.settings.max_error_rate:.1%}"
            elif p.baseline_ms > 0 and usage.frames >= _MIN_FRAMES:
                ratio = usage.per_frame_ms / p.baseline_ms
                # Both bounds: a tiny model's per-frame time doubles with batch sizes alone.
                slower_ms = usage.per_frame_ms - p.baseline_ms
                if ratio > self.settings.max_latency_ratio and slower_ms > self.settings.min_latency_regression_ms:
                    reason = (
                        f"latency {usage.per_frame_ms:.2f} ms/frame is {ratio:.1f}x version "
                        f"{p.previous_version}'s {p.baseline_ms:.2f} ms (limit {self.settings.max_latency_ratio}x)"
                    )
        if reason is not None:
            await self._roll_back(p, reason)
        elif time.monotonic() - p.started >= self.settings.probation_s:
            self._probation = None
            log.info("%s: %s %s passed probation", self.device_id, self.name, p.version)

    async def _roll_back(self, p: _Probation, reason: str) -> None:
        self._probation = None
        self.device.swap_model(p.previous)
        await asyncio.to_thread(self.store.mark_failed, self.name, p.version, reason)
        previous = p.previous_version
        if previous is not None and self.store.path_of(self.name, previous) is not None:
            await asyncio.to_thread(self.store.activate, self.name, previous)
        self.meter.inc("model_rollbacks_total")
        log.warning("%s: rolled %s back from %s to %s: %s", self.device_id, self.name, p.version, previous, reason)
        await self._status(p.version, "rolled_back", progress=1.0, reason=f"{reason}; serving {previous} again")

    # -- the background loop -------------------------------------------------------------------

    async def run(self, session: MqttSession) -> None:
        """Ask for missing chunks when the link has gone quiet; judge probation."""
        self._session = session
        while True:
            await asyncio.sleep(0.2)
            await self._judge_probation()
            download = self._download
            if download is None or download.complete or not session.connected:
                continue
            if download.progress != self._reported and time.monotonic() - self._last_status > 0.5:
                await self._status(download.manifest.version, "downloading", progress=download.progress)
            if time.monotonic() - self._last_chunk < self._fetch_wait:
                continue
            ranges = download.missing_ranges()
            request = env.FetchRequest(
                device_id=self.device_id, name=self.name, version=download.manifest.version, ranges=ranges
            )
            topic = topics.MODEL_FETCH.build(device_id=self.device_id, model=self.name)
            await session.publish(topic, env.encode(request), qos=topics.MODEL_FETCH.qos, timeout=5)
            self.meter.inc("model_fetches_total")
            log.info("%s: asked for %d missing chunks of %s", self.device_id, len(download.missing()), self.name)
            self._last_chunk = time.monotonic()
            self._fetch_wait = min(self._fetch_wait * 2, 30.0)

    def _status_soon(self, version: str, state: str, *, progress: float = 0.0, reason: str | None = None) -> None:
        """Publish a status without waiting for the broker's acknowledgement (the work it reports
        goes on meanwhile); statuses still leave in the order they were made."""
        spawn(self._background, self._status(version, state, progress=progress, reason=reason))

    async def _status(self, version: str, state: str, *, progress: float = 0.0, reason: str | None = None) -> None:
        self._last_status = time.monotonic()
        self._reported = progress if state == "downloading" else -1.0
        session = self._session or self.device.session
        if session is None:
            return
        status = env.ModelStatus(
            device_id=self.device_id,
            name=self.name,
            version=version,
            state=state,  # type: ignore[arg-type]
            progress=round(progress, 4),
            reason=reason,
            ts=time.time(),
        )
        topic = topics.MODEL_STATUS.build(device_id=self.device_id, model=self.name)
        try:
            await session.publish(topic, env.encode(status), qos=topics.MODEL_STATUS.qos, retain=True, timeout=5)
        except EdgewireError as exc:
            log.info("%s: model status not published: %s", self.device_id, exc)
