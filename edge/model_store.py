"""Models pushed over MQTT, kept on the device's disk: the installed versions and which one runs.

A download (:mod:`.download`) becomes an installed version only as a whole file whose size, SHA-256 and
Ed25519 signature match the manifest, by rename, next to the manifest it was checked against. Which version
is active, which ran before it (the rollback target), which are installed and which failed are the model's
record in the device's state (:mod:`.state`), replaced whole on every change.

Layout under the root::

    state.json                               the device's state, unless it is kept elsewhere
    <name>/<version>/model.onnx | model.plan an installed artefact
    <name>/<version>/manifest.msgpack        the manifest it was verified against
    <name>/.partial/<version>/data           a download in progress, preallocated to the full size
    <name>/.partial/<version>/chunks         32 bytes per chunk: its SHA-256 once held, zeros until then
    <name>/.partial/<version>/manifest.msgpack   written last: without it a partial is not resumable

A ``<name>/state.json`` an earlier release kept is taken into the device's state the first time the model
is looked at, and removed. One process owns a root; the store's own methods are meant for one thread.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgewire import delivery, durable, signing
from edgewire import envelopes as env
from edgewire.errors import DecodeError
from edgewire.metrics import Meter

from .download import (
    DIGEST_BYTES,
    MAX_CHUNK_COUNT,
    MAX_CHUNK_SIZE,
    ChunksCorrupt,
    Download,
    StoreError,
    VerifyFailed,
)
from .state import DeviceState

log = logging.getLogger(__name__)
FORMAT_SUFFIX = {"onnx": ".onnx", "tensorrt-plan": ".plan"}
_HISTORY = 16
_PARTIAL = ".partial"
_STATE = "state.json"


class ModelStore:
    """Every model version on this device: downloads in progress, installed versions, the active one."""

    def __init__(
        self,
        root: str | Path,
        *,
        public_key: Ed25519PublicKey | None,
        allow_unsigned: bool = False,
        keep_versions: int = 3,
        meter: Meter | None = None,
        state: DeviceState | None = None,
    ) -> None:
        """``state``: where the versions' records are kept (default: ``state.json`` under ``root``)."""
        if keep_versions < 1:
            raise StoreError(f"keep_versions must be at least 1, got {keep_versions}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.public_key = public_key
        self.allow_unsigned = allow_unsigned
        self.keep_versions = keep_versions
        self.meter = meter or Meter("model_store")
        self._open: dict[tuple[str, str], Download] = {}
        self.state = state if state is not None else DeviceState(self.root / _STATE)
        self._state_lock = threading.Lock()

    # ---- downloads -----------------------------------------------------------------------------

    def download(self, manifest: env.Manifest) -> Download:
        """Open the download of ``manifest``, resuming what an earlier run kept of the same artefact."""
        name = _component(manifest.name, "model name")
        version = _component(manifest.version, "version")
        _check_manifest(manifest)
        key = (name, version)
        current = self._open.pop(key, None)
        if current is not None and not current.closed:
            if delivery.same_artefact(current.manifest, manifest):
                if current.manifest != manifest:
                    durable.atomic_write(current.directory / "manifest.msgpack", env.encode(manifest))
                    current.manifest = manifest
                self._open[key] = current
                return current
            current.close()

        partial = self.root / name / _PARTIAL / version
        if partial.parent.is_dir():
            durable.sweep(partial.parent)
        kept = _read_manifest(partial / "manifest.msgpack")
        resume = kept is not None and delivery.same_artefact(kept, manifest) and (partial / "data").is_file()
        if not resume and partial.exists():
            log.info("%s %s: discarding a partial download of another artefact", name, version)
            durable.discard(partial)

        needed = manifest.size + manifest.chunk_count * DIGEST_BYTES - (_allocated(partial) if resume else 0)
        free = shutil.disk_usage(self.root).free
        if needed > free:
            raise StoreError(
                f"{name} {version} needs {needed} more bytes of disk, only {free} are free under {self.root}"
            )

        if resume:
            download = Download(partial, manifest, self.meter)
            if kept != manifest:
                durable.atomic_write(partial / "manifest.msgpack", env.encode(manifest))
            self.meter.inc("model_downloads_resumed_total")
            log.info(
                "%s %s: resuming with %d of %d chunks (%d lost since the last flush)",
                name,
                version,
                download.received,
                manifest.chunk_count,
                download.invalidated,
            )
        else:

            def make_resumable() -> None:
                # The manifest goes last: a partial without one is discarded, never resumed half-made.
                durable.atomic_write(partial / "manifest.msgpack", env.encode(manifest))
                durable.fsync_dir(partial.parent)
                durable.fsync_dir(partial.parent.parent)

            # Made resumable with its first chunk, on the thread that writes chunks: opening a
            # download waits for no disk flush, so the chunks already arriving are not held up.
            download = Download(partial, manifest, self.meter, before_first_write=make_resumable)
        self._open[key] = download
        return download

    def discard_partial(self, name: str, version: str) -> None:
        """Drop a download that will not be finished (a newer version was announced): it may hold gigabytes."""
        key = (_component(name, "model name"), _component(version, "version"))
        current = self._open.pop(key, None)
        if current is not None:
            current.close()
        durable.discard(self.root / name / _PARTIAL / version)

    def verify_and_install(self, download: Download) -> Path:
        """Check the whole file against its manifest and signature, then make it an installed version."""
        m = download.manifest
        if not download.complete:
            raise StoreError(
                f"{m.name} {m.version} is not complete: {download.received} of {m.chunk_count} chunks held"
            )
        streamed = download.streamed_digest()
        download.close()
        try:
            on_disk = download.data_path.stat().st_size
            if streamed is not None and on_disk != m.size:
                raise VerifyFailed(f"size mismatch: the downloaded file has {on_disk} bytes, the manifest {m.size}")
            digest = streamed if streamed is not None else _hash_file(download.data_path, m.size)
            if digest.hex() != m.sha256.lower():
                self._find_corrupt(download)
                raise VerifyFailed(
                    f"sha256 mismatch: the downloaded file hashes to {digest.hex()}, the manifest says {m.sha256}"
                )
            self._check_signature(m, digest)
        except VerifyFailed as exc:
            self.meter.inc("model_verify_failed_total")
            log.warning("%s %s: verification failed, download discarded: %s", m.name, m.version, exc)
            self._forget(download)
            durable.discard(download.directory)
            raise
        return self._install(download)

    def _find_corrupt(self, download: Download) -> None:
        """Reopen the download: chunks whose bytes do not match their checksums are dropped. If
        any were, raise ChunksCorrupt (the download stays to fetch them); if none, return, and the
        mismatch is the artefact's own."""
        m = download.manifest
        self._forget(download)
        again = self.download(m)
        if not again.invalidated_chunks:
            again.close()
            self._forget(again)
            return
        for _ in again.invalidated_chunks:
            self.meter.inc("model_chunks_rejected_total", reason="checksum")
        shown = ", ".join(str(i) for i in again.invalidated_chunks[:10])
        raise ChunksCorrupt(
            f"chunk {shown} {'is' if len(again.invalidated_chunks) == 1 else 'are'} corrupt (the data does not "
            "match the chunk's checksum); fetching again",
            again.invalidated_chunks,
        )

    def _check_signature(self, m: env.Manifest, digest: bytes) -> None:
        if m.signature is None:
            if self.allow_unsigned:
                log.warning("%s %s is unsigned; installing it because unsigned models are allowed", m.name, m.version)
                return
            raise VerifyFailed("the manifest carries no signature and this device installs only signed models")
        if self.public_key is None:
            if self.allow_unsigned:
                # Accepting it unchecked is no weaker than accepting it with the signature stripped.
                log.warning("%s %s is signed but no fleet key is configured; installing unchecked", m.name, m.version)
                return
            raise VerifyFailed("the manifest is signed but this device has no fleet public key to check it")
        try:
            signing.verify(self.public_key, digest, m.signature)
        except signing.SignatureError as exc:
            raise VerifyFailed(f"bad signature: {exc}") from None

    def _install(self, download: Download) -> Path:
        m = download.manifest
        target = self.root / m.name / m.version
        model = target / f"model{FORMAT_SUFFIX[m.format]}"
        target.mkdir(parents=True, exist_ok=True)
        durable.atomic_write(target / "manifest.msgpack", env.encode(m))
        os.replace(download.data_path, model)
        for stale in target.glob("model.*"):
            if stale != model:
                stale.unlink(missing_ok=True)
        durable.fsync_dir(target)
        durable.fsync_dir(target.parent)
        self._forget(download)
        durable.discard(download.directory)
        with self._state_lock:
            state = self._load_state(m.name)
            state["installed"] = [v for v in state["installed"] if v != m.version] + [m.version]
            self._save_state(m.name, state)
        self.meter.inc("model_installs_total")
        log.info("%s %s installed at %s", m.name, m.version, model)
        return model

    def _forget(self, download: Download) -> None:
        key = (download.manifest.name, download.manifest.version)
        if self._open.get(key) is download:
            del self._open[key]

    # ---- installed versions --------------------------------------------------------------------

    def installed(self, name: str) -> list[str]:
        """Installed versions, oldest install first (the order pruning follows)."""
        base = self.root / _component(name, "model name")
        if not base.is_dir():
            return []
        durable.sweep(base)
        on_disk: dict[str, int] = {}
        for entry in base.iterdir():
            if entry.name.startswith(".") or not entry.is_dir() or self._installed_path(name, entry.name) is None:
                continue
            on_disk[entry.name] = entry.stat().st_mtime_ns
        known = [v for v in self._load_state(name)["installed"] if v in on_disk]
        # Installed but unrecorded: a crash between the rename and the state write. Order those by time.
        strays = sorted(set(on_disk) - set(known), key=lambda v: (on_disk[v], v))
        return known + strays

    def path_of(self, name: str, version: str) -> Path | None:
        return self._installed_path(_component(name, "model name"), _component(version, "version"))

    def manifest_of(self, name: str, version: str) -> env.Manifest | None:
        """The manifest an installed version was verified against; None when it is not installed."""
        if self.path_of(name, version) is None:
            return None
        return _read_manifest(self.root / name / version / "manifest.msgpack")

    def _installed_path(self, name: str, version: str) -> Path | None:
        manifest = _read_manifest(self.root / name / version / "manifest.msgpack")
        if manifest is None or manifest.format not in FORMAT_SUFFIX:
            return None
        model = self.root / name / version / f"model{FORMAT_SUFFIX[manifest.format]}"
        return model if model.is_file() else None

    # ---- active version ------------------------------------------------------------------------

    def active(self, name: str) -> str | None:
        version = self._load_state(_component(name, "model name"))["active"]
        return version if version is not None and self._installed_path(name, version) is not None else None

    def previous(self, name: str) -> str | None:
        """The rollback target: the latest version active before the current one that is still installed
        and not marked failed (rolling back onto a version already known to fail would help no one)."""
        state = self._load_state(_component(name, "model name"))
        for version in reversed(state["history"]):
            if version == state["active"] or version in state["failed"]:
                continue
            if self._installed_path(name, version) is not None:
                return version
        return None

    def activate(self, name: str, version: str) -> None:
        """Record ``version`` as the one to run, then prune old versions beyond keep_versions."""
        _component(name, "model name")
        _component(version, "version")
        if self._installed_path(name, version) is None:
            raise StoreError(f"cannot activate {name} {version}: it is not installed")
        with self._state_lock:
            state = self._load_state(name)
            current = state["active"]
            if current != version:
                history = [v for v in state["history"] if v not in (current, version)]
                if current is not None:
                    history.append(current)
                state["history"] = history[-_HISTORY:]
                state["active"] = version
                self._save_state(name, state)
        log.info("%s %s active (was %s)", name, version, current)
        self._prune(name)

    def _prune(self, name: str) -> None:
        installed = self.installed(name)
        excess = len(installed) - self.keep_versions
        if excess <= 0:
            return
        keep = {self.active(name), self.previous(name)}
        failed = self._load_state(name)["failed"]
        candidates = [v for v in installed if v not in keep]
        # Versions known to fail go first, then the oldest installs.
        candidates.sort(key=lambda v: v not in failed)
        doomed = candidates[:excess]
        for version in doomed:
            durable.discard(self.root / name / version)
            log.info("%s %s pruned (keeping %d versions)", name, version, self.keep_versions)
        with self._state_lock:
            state = self._load_state(name)
            state["installed"] = [v for v in state["installed"] if v not in doomed]
            self._save_state(name, state)

    # ---- failures ------------------------------------------------------------------------------

    def mark_failed(self, name: str, version: str, reason: str) -> None:
        """Remember that ``version`` failed, across restarts, so the retained announce does not retrigger it."""
        with self._state_lock:
            state = self._load_state(_component(name, "model name"))
            state["failed"][_component(version, "version")] = reason
            self._save_state(name, state)

    def failed_reason(self, name: str, version: str) -> str | None:
        return self._load_state(_component(name, "model name"))["failed"].get(version)

    def clear_failed(self, name: str, version: str) -> None:
        with self._state_lock:
            state = self._load_state(_component(name, "model name"))
            if state["failed"].pop(version, None) is not None:
                self._save_state(name, state)

    # ---- the model's record -------------------------------------------------------------------

    def _load_state(self, name: str) -> dict[str, Any]:
        state: dict[str, Any] = {"active": None, "history": [], "installed": [], "failed": {}}
        loaded = self.state.model(name)
        if loaded is None:
            loaded = self._take_in_legacy(name)
            if loaded is None:
                return state
        if isinstance(loaded.get("active"), str):
            state["active"] = loaded["active"]
        for key in ("history", "installed"):
            if isinstance(loaded.get(key), list):
                state[key] = [v for v in loaded[key] if isinstance(v, str)]
        if isinstance(loaded.get("failed"), dict):
            state["failed"] = {str(k): str(v) for k, v in loaded["failed"].items()}
        return state

    def _save_state(self, name: str, state: dict[str, Any]) -> None:
        self.state.save_model(name, state)

    def _take_in_legacy(self, name: str) -> dict[str, Any] | None:
        """The record an earlier release kept as ``<name>/state.json``: taken in once, then removed."""
        path = self.root / name / _STATE
        try:
            loaded = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("%s is unreadable (%s); starting from no active version", path, exc)
            return None
        if not isinstance(loaded, dict):
            return None
        self.state.save_model(name, loaded)
        path.unlink(missing_ok=True)
        log.info("the record of %s in %s is now kept in %s", name, path, self.state.where)
        return loaded


# ---- helpers ---------------------------------------------------------------------------------------


def _component(value: str, what: str) -> str:
    """Names and versions from the wire become directory names; none may climb out of the store."""
    if not value or len(value) > 200 or value.startswith(".") or value == _STATE or any(c in value for c in "/\\\0"):
        raise StoreError(f"{what} {value!r} cannot be stored: empty, too long, leading dot, slash or NUL")
    return value


def _check_manifest(m: env.Manifest) -> None:
    if m.format not in FORMAT_SUFFIX:
        raise StoreError(f"unknown format {m.format!r} (known: {', '.join(FORMAT_SUFFIX)})")
    if m.size <= 0:
        raise StoreError(f"{m.name} {m.version}: size {m.size} is not a positive number of bytes")
    if not 0 < m.chunk_size <= MAX_CHUNK_SIZE:
        raise StoreError(f"{m.name} {m.version}: chunk_size {m.chunk_size} is not within 1..{MAX_CHUNK_SIZE}")
    expected = -(-m.size // m.chunk_size)
    if m.chunk_count != expected:
        raise StoreError(
            f"{m.name} {m.version}: chunk_count {m.chunk_count} does not match size {m.size} in chunks of "
            f"{m.chunk_size} bytes ({expected})"
        )
    if m.chunk_count > MAX_CHUNK_COUNT:
        raise StoreError(f"{m.name} {m.version}: {m.chunk_count} chunks is more than {MAX_CHUNK_COUNT}")
    if len(m.sha256) != 64 or any(c not in "0123456789abcdef" for c in m.sha256.lower()):
        raise StoreError(f"{m.name} {m.version}: sha256 {m.sha256!r} is not 64 hex digits")


def _read_manifest(path: Path) -> env.Manifest | None:
    try:
        return env.decode(env.Manifest, path.read_bytes())
    except (OSError, DecodeError):
        return None


def _hash_file(path: Path, size: int) -> bytes:
    """SHA-256 of a downloaded file that must hold ``size`` bytes."""
    try:
        digest, actual = delivery.sha256_file(path)
    except delivery.DeliveryError as exc:
        raise VerifyFailed(f"the downloaded file cannot be read: {exc}") from None
    if actual != size:
        raise VerifyFailed(f"size mismatch: the downloaded file has {actual} bytes, the manifest says {size}")
    return digest


def _allocated(directory: Path) -> int:
    total = 0
    for part in ("data", "chunks"):
        try:
            total += os.stat(directory / part).st_blocks * 512
        except OSError:
            pass
    return total
