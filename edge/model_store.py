"""Models pushed over MQTT, kept on the device's disk: resumable chunked downloads, verification, versions.

A model arrives as many chunk messages, possibly over hours and through restarts and power cuts, and may be
larger than the device's free memory. So each chunk goes straight to its place in a file preallocated to the
full size, and a sidecar records the digest of every chunk held. Neither is fsynced per chunk (far too slow on
flash); instead a reopened download re-hashes every chunk the sidecar claims, so a record that reached the disk
before its data did is caught and that chunk is simply asked for again. Only a whole file whose size, SHA-256
and Ed25519 signature match the manifest is installed, by rename, next to the manifest it was checked against.
Which version is active, which ran before it (the rollback target) and which failed live in one small JSON file
per model that is only ever replaced whole.

Layout under the root::

    <name>/state.json                        {"active", "history", "installed", "failed"}
    <name>/<version>/model.onnx | model.plan an installed artefact
    <name>/<version>/manifest.msgpack        the manifest it was verified against
    <name>/.partial/<version>/data           a download in progress, preallocated to the full size
    <name>/.partial/<version>/chunks         32 bytes per chunk: its SHA-256 once held, zeros until then
    <name>/.partial/<version>/manifest.msgpack   written last: without it a partial is not resumable

One process owns a root. A Download may be written from worker threads (hashing and pwrite release the GIL);
the store's own methods are meant for one thread.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgewire import delivery, signing
from edgewire import envelopes as env
from edgewire.errors import DecodeError, EdgewireError
from edgewire.metrics import Meter

log = logging.getLogger(__name__)

FORMAT_SUFFIX = {"onnx": ".onnx", "tensorrt-plan": ".plan"}

DIGEST_BYTES = 32
#: Flush data and sidecar (in the background) after this many new bytes: bounds what a power cut can cost
#: without an fsync per chunk, and leaves little to flush once the last chunk is in.
SYNC_EVERY = 4 * env.MIB
#: A chunk must fit in one Chunk message; a manifest promising bigger ones can never complete.
MAX_CHUNK_SIZE = 4 * env.MIB
#: Keeps the sidecar (32 bytes a chunk) and the in-memory map small whatever a manifest claims.
MAX_CHUNK_COUNT = 1 << 20
_HISTORY = 16
_ZERO_DIGEST = bytes(DIGEST_BYTES)
#: Periodic flushes run here, so the thread writing chunks never waits for the disk.
_FLUSHER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model-flush")
_PARTIAL = ".partial"
_STATE = "state.json"


class StoreError(EdgewireError):
    """A model the store cannot take or a state change it refuses; str() is the reason shown to operators."""


class ChunkRejected(StoreError):
    """A chunk that is corrupt, out of range, of the wrong size or for another download; nothing was written."""


class ChunksCorrupt(StoreError):
    """The whole file did not verify because some chunks do not match their own checksums: the
    download stays, without those chunks, to fetch them again."""

    def __init__(self, message: str, indices: list[int]) -> None:
        super().__init__(message)
        self.indices = indices


class VerifyFailed(StoreError):
    """A complete download whose size, SHA-256 or signature does not match; its partial state is gone."""


class Download:
    """One model version arriving chunk by chunk. Its file descriptors stay open until close()."""

    def __init__(
        self,
        directory: Path,
        manifest: env.Manifest,
        meter: Meter,
        *,
        before_first_write: Callable[[], None] | None = None,
    ) -> None:
        self.manifest = manifest
        self._before_first_write = before_first_write
        self.directory = directory
        self._meter = meter
        self._lock = threading.Lock()
        self._count = manifest.chunk_count
        self._held = bytearray(self._count)
        self._received = 0
        self._unsynced = 0
        self._flush: concurrent.futures.Future[None] | None = None
        self._closed = False
        # The whole-file hash, fed in chunk order as chunks arrive, so that verifying a complete
        # download is not a second pass over the file after the last chunk (it overlaps the network).
        self._stream = hashlib.sha256()
        self._streamed = 0
        directory.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        self._data = os.open(directory / "data", flags, 0o644)
        try:
            self._chunks = os.open(directory / "chunks", flags, 0o644)
        except BaseException:
            os.close(self._data)
            raise
        try:
            if os.fstat(self._data).st_size != manifest.size:
                os.ftruncate(self._data, manifest.size)
            if os.fstat(self._chunks).st_size != self._count * DIGEST_BYTES:
                os.ftruncate(self._chunks, self._count * DIGEST_BYTES)
            #: Chunks the sidecar claimed but whose bytes on disk did not hash to the claim (lost in a
            #: power cut, or corrupt on arrival).
            self.invalidated_chunks: list[int] = []
            self.invalidated = self._load()
            if self._count and self._held[0]:
                self._streamed = 0
                self._stream_held()
        except BaseException:
            os.close(self._data)
            os.close(self._chunks)
            raise

    # ---- state ---------------------------------------------------------------------------------

    @property
    def received(self) -> int:
        return self._received

    @property
    def complete(self) -> bool:
        return self._received == self._count

    @property
    def progress(self) -> float:
        return self._received / self._count

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def data_path(self) -> Path:
        return self.directory / "data"

    def missing(self) -> list[int]:
        held = self._held
        return [i for i in range(self._count) if not held[i]]

    def missing_ranges(self) -> list[list[int]]:
        """Half-open [start, end) runs of missing chunks: what a fetch request asks for."""
        ranges: list[list[int]] = []
        for i in self.missing():
            if ranges and ranges[-1][1] == i:
                ranges[-1][1] = i + 1
            else:
                ranges.append([i, i + 1])
        return ranges

    # ---- writing -------------------------------------------------------------------------------

    def write(self, chunk: env.Chunk) -> bool:
        """Store one chunk; False when it was already held (redelivery is normal over MQTT QoS 1)."""
        if self._closed:
            raise StoreError(f"download of {self.manifest.name} {self.manifest.version} is closed")
        digest = self._check(chunk)
        with self._lock:
            if self._closed:
                raise StoreError(f"download of {self.manifest.name} {self.manifest.version} is closed")
            if self._held[chunk.index]:
                self._meter.inc("model_chunks_duplicate_total")
                return False
            if self._before_first_write is not None:
                prepare, self._before_first_write = self._before_first_write, None
                prepare()
            # Data first, then its record: a record without its data is caught by re-hashing on reopen.
            _pwrite_all(self._data, chunk.data, chunk.index * self.manifest.chunk_size)
            _pwrite_all(self._chunks, digest, chunk.index * DIGEST_BYTES)
            self._held[chunk.index] = 1
            self._received += 1
            self._advance_stream(chunk.index, chunk.data)
            self._unsynced += len(chunk.data)
            if self._unsynced >= SYNC_EVERY and (self._flush is None or self._flush.done()):
                self._unsynced = 0
                self._flush = _FLUSHER.submit(self._sync)
            self._meter.inc("model_chunks_received_total")
        return True

    def _advance_stream(self, index: int, data: bytes) -> None:
        """Feed the whole-file hash as far as chunks are held in order; a chunk that arrived
        early (or was held from an earlier run) is read back from the page cache when its turn comes."""
        if index != self._streamed:
            return
        self._stream.update(data)
        self._streamed += 1
        self._stream_held()

    def _stream_held(self) -> None:
        while self._streamed < self._count and self._held[self._streamed]:
            i = self._streamed
            self._stream.update(os.pread(self._data, self._length(i), i * self.manifest.chunk_size))
            self._streamed += 1

    def streamed_digest(self) -> bytes | None:
        """SHA-256 of the whole artefact as written, once every chunk is in; None before."""
        return self._stream.digest() if self._streamed == self._count else None

    def close(self) -> None:
        """Flush what was written and release the files; the download stays resumable."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._flush is not None:
                    self._flush.result()  # a flush that failed fails the close, as an inline one would
                self._sync()
            finally:
                os.close(self._data)
                os.close(self._chunks)

    def __enter__(self) -> Download:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, chunk: env.Chunk) -> bytes:
        m = self.manifest
        i = chunk.index
        if chunk.name != m.name or chunk.version != m.version:
            raise self._reject(
                "foreign", f"chunk {i} is for {chunk.name} {chunk.version}, this download is {m.name} {m.version}"
            )
        if not 0 <= i < self._count:
            raise self._reject(
                "index", f"chunk {i} is out of range: {m.name} {m.version} has chunks 0..{self._count - 1}"
            )
        expected = self._length(i)
        if len(chunk.data) != expected:
            raise self._reject("size", f"chunk {i} has {len(chunk.data)} bytes, expected {expected}")
        # The data is held to this checksum when the whole file is verified: one pass over the bytes
        # instead of two. A whole-file mismatch then finds the corrupt chunks by their checksums.
        try:
            claim = bytes.fromhex(chunk.sha256)
        except ValueError:
            claim = b""
        if len(claim) != DIGEST_BYTES or claim == _ZERO_DIGEST:
            raise self._reject("checksum", f"chunk {i} carries no valid checksum ({chunk.sha256!r})")
        return claim

    def _reject(self, reason: str, message: str) -> ChunkRejected:
        self._meter.inc("model_chunks_rejected_total", reason=reason)
        return ChunkRejected(message)

    def _length(self, index: int) -> int:
        m = self.manifest
        return m.size - (self._count - 1) * m.chunk_size if index == self._count - 1 else m.chunk_size

    def _sync(self) -> None:
        os.fdatasync(self._data)
        os.fdatasync(self._chunks)

    def _load(self) -> int:
        """Take back the chunks the sidecar records, trusting only those whose bytes still hash to the record."""
        table = os.pread(self._chunks, self._count * DIGEST_BYTES, 0)
        buf = bytearray(self.manifest.chunk_size)
        view = memoryview(buf)
        invalid = 0
        for i in range(self._count):
            want = table[i * DIGEST_BYTES : (i + 1) * DIGEST_BYTES]
            if want == _ZERO_DIGEST or len(want) < DIGEST_BYTES:
                continue
            length = self._length(i)
            n = os.preadv(self._data, [view[:length]], i * self.manifest.chunk_size)
            if n == length and hashlib.sha256(view[:length]).digest() == want:
                self._held[i] = 1
                self._received += 1
            else:
                _pwrite_all(self._chunks, _ZERO_DIGEST, i * DIGEST_BYTES)
                self.invalidated_chunks.append(i)
                invalid += 1
        return invalid


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
    ) -> None:
        if keep_versions < 1:
            raise StoreError(f"keep_versions must be at least 1, got {keep_versions}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.public_key = public_key
        self.allow_unsigned = allow_unsigned
        self.keep_versions = keep_versions
        self.meter = meter or Meter("model_store")
        self._open: dict[tuple[str, str], Download] = {}
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
            if _same_artefact(current.manifest, manifest):
                if current.manifest != manifest:
                    _atomic_write(current.directory / "manifest.msgpack", env.encode(manifest))
                    current.manifest = manifest
                self._open[key] = current
                return current
            current.close()

        partial = self.root / name / _PARTIAL / version
        if partial.parent.is_dir():
            _sweep(partial.parent)
        kept = _read_manifest(partial / "manifest.msgpack")
        resume = kept is not None and _same_artefact(kept, manifest) and (partial / "data").is_file()
        if not resume and partial.exists():
            log.info("%s %s: discarding a partial download of another artefact", name, version)
            _discard(partial)

        needed = manifest.size + manifest.chunk_count * DIGEST_BYTES - (_allocated(partial) if resume else 0)
        free = shutil.disk_usage(self.root).free
        if needed > free:
            raise StoreError(
                f"{name} {version} needs {needed} more bytes of disk, only {free} are free under {self.root}"
            )

        if resume:
            download = Download(partial, manifest, self.meter)
            if kept != manifest:
                _atomic_write(partial / "manifest.msgpack", env.encode(manifest))
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
                _atomic_write(partial / "manifest.msgpack", env.encode(manifest))
                _fsync_dir(partial.parent)
                _fsync_dir(partial.parent.parent)

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
        _discard(self.root / name / _PARTIAL / version)

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
            _discard(download.directory)
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
        _atomic_write(target / "manifest.msgpack", env.encode(m))
        os.replace(download.data_path, model)
        for stale in target.glob("model.*"):
            if stale != model:
                stale.unlink(missing_ok=True)
        _fsync_dir(target)
        _fsync_dir(target.parent)
        self._forget(download)
        _discard(download.directory)
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
        _sweep(base)
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
            _discard(self.root / name / version)
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

    # ---- state file ----------------------------------------------------------------------------

    def _load_state(self, name: str) -> dict[str, Any]:
        path = self.root / name / _STATE
        state: dict[str, Any] = {"active": None, "history": [], "installed": [], "failed": {}}
        try:
            loaded = json.loads(path.read_bytes())
        except FileNotFoundError:
            return state
        except (OSError, ValueError) as exc:
            # Only ever replaced whole, so this is damage from outside; the versions on disk still count.
            log.error("%s is unreadable (%s); starting from no active version", path, exc)
            return state
        if isinstance(loaded, dict):
            if isinstance(loaded.get("active"), str):
                state["active"] = loaded["active"]
            for key in ("history", "installed"):
                if isinstance(loaded.get(key), list):
                    state[key] = [v for v in loaded[key] if isinstance(v, str)]
            if isinstance(loaded.get("failed"), dict):
                state["failed"] = {str(k): str(v) for k, v in loaded["failed"].items()}
        return state

    def _save_state(self, name: str, state: dict[str, Any]) -> None:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        _atomic_write(self.root / name / _STATE, json.dumps(state, indent=1, sort_keys=True).encode())


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


def _same_artefact(a: env.Manifest, b: env.Manifest) -> bool:
    return (a.sha256.lower(), a.size, a.chunk_size, a.chunk_count) == (
        b.sha256.lower(),
        b.size,
        b.chunk_size,
        b.chunk_count,
    )


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


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    n = os.pwrite(fd, data, offset)
    if n == len(data):
        return
    view = memoryview(data)
    while n < len(view):
        n += os.pwrite(fd, view[n:], offset + n)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` whole: after a crash it holds the old bytes or the new ones, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _pwrite_all(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _discard(path: Path) -> None:
    """Rename, then delete: a crash halfway through never leaves something that looks installed or resumable."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{uuid.uuid4().hex}")
    os.replace(path, trash)
    _fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _sweep(directory: Path) -> None:
    """Finish deletions and temp files a crash interrupted."""
    for entry in directory.glob(".trash-*"):
        shutil.rmtree(entry, ignore_errors=True)
    mine = f".tmp-{os.getpid()}-"
    for entry in directory.glob(".*.tmp-*"):
        if mine not in entry.name:  # this process's own may be being written right now
            entry.unlink(missing_ok=True)
