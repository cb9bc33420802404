"""The distributor's store on disk: one folder per model version, written chunk by chunk.

Store layout, per model and version: ``<store>/<name>/<version>/`` holding ``artefact`` (written
chunk by chunk with pwrite), ``manifest.msgpack``, ``held`` (one byte per chunk, so a restart
resumes a half-received push) and ``complete`` (the verified sha256).

A push arrives in any order and may be cut off by a restart, so what is held is recorded per
chunk beside the bytes, and a version counts as complete only once its verified sha256 is
written down.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgewire import delivery, durable
from edgewire import envelopes as env
from edgewire.errors import DecodeError


@dataclass(frozen=True)
class StoreLimits:
    """What the store takes from an announce before it allocates or creates anything: the
    manifest is anyone's word until it is checked, and its numbers size the file, the per-chunk
    record and the memory behind them."""

    max_size: int = 2 * 1024 * env.MIB  # bytes of one artefact
    max_chunk_count: int = 65536  # chunks of one artefact (one byte each in ``held``)

    def __post_init__(self) -> None:
        if self.max_size <= 0 or self.max_chunk_count <= 0:
            raise ValueError(f"store limits must be positive: {self}")


def version_folder(store_dir: Path, name: str, version: str) -> Path:
    return store_dir / name / version


def artefact_file(store_dir: Path, name: str, version: str) -> Path:
    return version_folder(store_dir, name, version) / "artefact"


def stored_folders(store_dir: Path) -> list[Path]:
    """The version folders a previous run left, whole or half-received, in a stable order."""
    return sorted(f for f in store_dir.glob("*/*") if (f / "manifest.msgpack").exists())


class StoredArtefact:
    """One model version in the store: its manifest, its file and which chunks it holds."""

    def __init__(self, folder: Path, manifest: env.Manifest, held: bytearray, complete: bool) -> None:
        self.folder = folder
        self.manifest = manifest
        self.held = held
        self.complete = complete
        self.verifying = False
        self._fd: int | None = None
        self._held_fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / "artefact"

    @property
    def missing(self) -> int:
        return self.held.count(0)

    @classmethod
    def create(cls, store_dir: Path, manifest: env.Manifest) -> StoredArtefact:
        """An empty copy of ``manifest``'s artefact, replacing whatever that version held."""
        folder = version_folder(store_dir, manifest.name, manifest.version)
        made_name = not folder.parent.exists()
        folder.mkdir(parents=True, exist_ok=True)
        try:
            for name in ("complete", "held", "artefact"):
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()
            with open(folder / "artefact", "wb") as f:
                f.truncate(manifest.size)  # sparse: the space is taken as chunks land
            held = bytearray(manifest.chunk_count)
            (folder / "held").write_bytes(held)
            # Last: a folder without its manifest is not a stored version (see stored_folders).
            durable.atomic_write(folder / "manifest.msgpack", env.encode(manifest))
        except OSError:
            # No stray folder for a version that could not be made (a file the disk refuses).
            shutil.rmtree(folder.parent if made_name else folder, ignore_errors=True)
            raise
        return cls(folder, manifest, held, complete=False)

    @classmethod
    def load(cls, folder: Path) -> StoredArtefact:
        manifest = env.decode(env.Manifest, (folder / "manifest.msgpack").read_bytes())
        if (folder.parent.name, folder.name) != (manifest.name, manifest.version):
            raise DecodeError(f"manifest is for {manifest.name} {manifest.version}")
        try:
            marker = (folder / "complete").read_text().strip()
        except FileNotFoundError:
            marker = ""
        size = (folder / "artefact").stat().st_size
        if size != manifest.size:
            raise DecodeError(f"artefact is {size} bytes, manifest says {manifest.size}")
        if marker == manifest.sha256:
            return cls(folder, manifest, bytearray(b"\x01" * manifest.chunk_count), complete=True)
        try:
            held = bytearray((folder / "held").read_bytes())
        except FileNotFoundError:
            held = bytearray()
        if len(held) != manifest.chunk_count:
            held = bytearray(manifest.chunk_count)
        return cls(folder, manifest, held, complete=False)

    def _handle(self) -> int:
        """The artefact open for writing, held only while chunks are coming in: a distributor
        keeps every version ever pushed, so one descriptor per version would run out."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR)
        return self._fd

    def write(self, index: int, data: bytes) -> None:
        """The chunk's bytes first, then its mark in ``held``: a crash between the two costs a
        resend of that chunk, never a chunk marked held whose bytes are missing."""
        os.pwrite(self._handle(), data, index * self.manifest.chunk_size)
        if self._held_fd is None:
            self._held_fd = os.open(self.folder / "held", os.O_WRONLY)
        os.pwrite(self._held_fd, b"\x01", index)
        self.held[index] = 1

    def read(self, index: int) -> bytes:
        """Opened per chunk: a served version holds no descriptor between fetches (an open costs
        far less than the publish the chunk is read for)."""
        length = delivery.expected_chunk_length(self.manifest, index)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return os.pread(fd, length, index * self.manifest.chunk_size)
        finally:
            os.close(fd)

    def update_manifest(self, manifest: env.Manifest) -> None:
        """Same artefact, new announce (other targets, say): keep the bytes, remember the manifest."""
        if manifest != self.manifest:
            durable.atomic_write(self.folder / "manifest.msgpack", env.encode(manifest))
            self.manifest = manifest

    def mark_complete(self) -> None:
        """Written through to the disk, then recorded; nothing is written to a complete version
        again, so its descriptors are closed here."""
        os.fsync(self._handle())
        self.close()
        durable.atomic_write(self.folder / "complete", self.manifest.sha256.encode())
        self.complete = True

    def reset(self) -> None:
        self.held = bytearray(self.manifest.chunk_count)
        if self._held_fd is None:
            self._held_fd = os.open(self.folder / "held", os.O_WRONLY)
        os.pwrite(self._held_fd, bytes(self.held), 0)

    def close(self) -> None:
        for fd in (self._fd, self._held_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._held_fd = None


def manifest_problem(manifest: env.Manifest, limits: StoreLimits) -> tuple[str, str] | None:
    """Why the store must not take this manifest, as (reason label, explanation), or None."""
    try:
        delivery.check_model_ids(manifest.name, manifest.version)
    except delivery.DeliveryError as exc:
        return "manifest", str(exc)
    if not 0 < manifest.chunk_size <= delivery.MAX_CHUNK_SIZE:
        return "manifest", f"chunk_size {manifest.chunk_size} out of range (1 to {delivery.MAX_CHUNK_SIZE})"
    if not 0 < manifest.size <= limits.max_size:
        return "manifest_limits", f"size {manifest.size} out of range (1 to {limits.max_size} bytes)"
    if not 0 < manifest.chunk_count <= limits.max_chunk_count:
        return "manifest_limits", f"chunk_count {manifest.chunk_count} out of range (1 to {limits.max_chunk_count})"
    if manifest.chunk_count != -(-manifest.size // manifest.chunk_size):
        return (
            "manifest",
            f"size {manifest.size}, chunk_size {manifest.chunk_size} and chunk_count {manifest.chunk_count} disagree",
        )
    if not re.fullmatch(r"[0-9a-f]{64}", manifest.sha256):
        return "manifest", "sha256 is not 64 lowercase hex digits"
    return None
