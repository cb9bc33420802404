"""One model version arriving chunk by chunk: resumable, on disk, and never trusted blindly.

A model arrives as many chunk messages, possibly over hours and through restarts and power cuts, and may be
larger than the device's free memory. So each chunk goes straight to its place in a file preallocated to the
full size, and a sidecar records the digest of every chunk held. Neither is fsynced per chunk (far too slow on
flash); instead a reopened download re-hashes every chunk the sidecar claims, so a record that reached the disk
before its data did is caught and that chunk is simply asked for again. The whole-file SHA-256 is fed as chunks
arrive in order, so verifying a complete download is not a second pass over the file.

A Download may be written from worker threads (hashing and pwrite release the GIL).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

from edgewire import durable
from edgewire import envelopes as env
from edgewire.errors import EdgewireError
from edgewire.metrics import Meter

DIGEST_BYTES = 32
#: Flush data and sidecar (in the background) after this many new bytes: bounds what a power cut can cost
#: without an fsync per chunk, and leaves little to flush once the last chunk is in.
SYNC_EVERY = 4 * env.MIB
#: A chunk must fit in one Chunk message; a manifest promising bigger ones can never complete.
MAX_CHUNK_SIZE = 4 * env.MIB
#: Keeps the sidecar (32 bytes a chunk) and the in-memory map small whatever a manifest claims.
MAX_CHUNK_COUNT = 1 << 20
_ZERO_DIGEST = bytes(DIGEST_BYTES)
#: Periodic flushes run here, so the thread writing chunks never waits for the disk.
_FLUSHER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model-flush")


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
            durable.pwrite_all(self._data, chunk.data, chunk.index * self.manifest.chunk_size)
            durable.pwrite_all(self._chunks, digest, chunk.index * DIGEST_BYTES)
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
                durable.pwrite_all(self._chunks, _ZERO_DIGEST, i * DIGEST_BYTES)
                self.invalidated_chunks.append(i)
                invalid += 1
        return invalid
