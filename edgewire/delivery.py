"""Model delivery, the parts every end shares: manifests, chunks, hashes and target selectors.

The operator's push (:mod:`edgewire.fleet`), the cloud's distributor and the device's receiver all
read and write the same artefacts, so how an artefact is cut into chunks, hashed, signed and
matched against a device lives here once. Nothing here talks MQTT or imports a component.

Artefacts are never read whole into memory: hashing streams the file, and a chunk is read with a
seek, so a multi-gigabyte TensorRT plan costs one chunk of memory at a time.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgewire import envelopes as env
from edgewire import signing, topics
from edgewire.errors import EdgewireError, TopicError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# Half a megabyte: large enough that per-message costs vanish, small enough that the sender, the
# broker and the device work on different chunks at once (bench/delivery.py: 512 KiB delivered a
# 64 MiB artefact over Mosquitto about 1.5x faster than 1 MiB and 2 MiB chunks on a 2-core host).
DEFAULT_CHUNK_SIZE = 512 * env.KIB
# The Chunk envelope allows 4 MiB + 4 KiB: the 4 KiB is for the envelope's own fields.
MAX_CHUNK_SIZE = 4 * env.MIB
FORMATS = {".onnx": "onnx", ".plan": "tensorrt-plan", ".engine": "tensorrt-plan"}
PRECISIONS = ("fp32", "fp16", "int8")
# Device entries of a target selector may be shell-style globs (``cam-*``), so they allow the
# glob characters on top of what an id allows.
_DEVICE_PATTERN = re.compile(r"^[A-Za-z0-9._\-*?\[\]!]{1,128}$")
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_READ_BLOCK = 1 * env.MIB


class DeliveryError(EdgewireError):
    """An artefact, key, target list or history entry that cannot be used; the message says which and why."""


# ---- manifests and chunks -------------------------------------------------------------------


def build_manifest(
    path: str | Path,
    *,
    name: str,
    version: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    targets: env.Targets | None = None,
    private_key: Ed25519PrivateKey | None = None,
    format: str | None = None,
    precision: str = "fp32",
) -> env.Manifest:
    """Describe an artefact for the wire; every check a device would make later is made here first,
    so a push that would be refused by the whole fleet is refused on the operator's machine."""
    path = Path(path)
    check_model_ids(name, version)
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise DeliveryError(f"chunk size {chunk_size} is out of range: 1 to {MAX_CHUNK_SIZE} bytes")
    fmt = format or FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DeliveryError(
            f"{path}: cannot tell the format from the suffix {path.suffix!r} "
            f"(known: {', '.join(sorted(FORMATS))}); give the format (onnx or tensorrt-plan)"
        )
    if precision not in PRECISIONS:
        raise DeliveryError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    digest, size, _ = _hash_artefact(path, chunk_size)
    if size == 0:
        raise DeliveryError(f"{path}: the file is empty")
    inputs, outputs = onnx_tensor_specs(path) if fmt == "onnx" else ([], [])
    return env.Manifest(
        name=name,
        version=version,
        format=fmt,
        precision=precision,
        size=size,
        sha256=digest.hex(),
        chunk_size=chunk_size,
        chunk_count=math.ceil(size / chunk_size),
        inputs=inputs,
        outputs=outputs,
        targets=targets or env.Targets(),
        signature=signing.sign(private_key, digest) if private_key is not None else None,
        created=time.time(),
    )


def check_model_ids(name: str, version: str) -> None:
    """Name and version become topic levels and folder names; refuse anything that cannot be either."""
    try:
        topics.MODEL_CHUNK.build(model=name, version=version, index=0)
    except TopicError as exc:
        raise DeliveryError(f"model name or version: {exc}") from None


#: Chunk checksums worked out while hashing an artefact for its manifest, reused when its chunks
#: are sent, so the push does not hash every byte a second time. Keyed by what identifies the
#: file's content (path, size, mtime) and the chunk size; a changed file misses the cache.
_CHUNK_DIGESTS: dict[tuple[str, int, int, int], list[str]] = {}


def _file_key(path: str | Path, chunk_size: int) -> tuple[str, int, int, int]:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, chunk_size)


def _hash_artefact(path: str | Path, chunk_size: int) -> tuple[bytes, int, list[str]]:
    """The whole file's SHA-256, its size and each chunk's SHA-256, in one read."""
    whole = hashlib.sha256()
    chunks: list[str] = []
    size = 0
    try:
        key = _file_key(path, chunk_size)
        with open(path, "rb") as f:
            while block := f.read(chunk_size):
                whole.update(block)
                chunks.append(hashlib.sha256(block).hexdigest())
                size += len(block)
    except OSError as exc:
        raise DeliveryError(f"{path}: cannot read the artefact ({exc.strerror or exc})") from None
    if len(_CHUNK_DIGESTS) >= 8:
        _CHUNK_DIGESTS.clear()
    _CHUNK_DIGESTS[key] = chunks
    return whole.digest(), size, chunks


def sha256_file(path: str | Path) -> tuple[bytes, int]:
    """The artefact's SHA-256 digest and size, streamed through one buffer: an artefact larger
    than memory is hashed like any other."""
    h = hashlib.sha256()
    buf = bytearray(_READ_BLOCK)
    size = 0
    try:
        with open(path, "rb", buffering=0) as f, memoryview(buf) as view:
            while n := f.readinto(buf):
                h.update(view[:n])
                size += n
    except OSError as exc:
        raise DeliveryError(f"{path}: cannot read the artefact ({exc.strerror or exc})") from None
    return h.digest(), size


def onnx_tensor_specs(path: str | Path) -> tuple[list[env.TensorSpec], list[env.TensorSpec]]:
    """Inputs and outputs of an ONNX graph, so a device can refuse a model its pipeline cannot feed
    before downloading it; empty when onnxruntime is absent or cannot load the file."""
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception:  # not ONNX after all, or no runtime here: the manifest just says less
        return [], []

    def spec(arg: Any) -> env.TensorSpec:
        shape = [d if isinstance(d, int) else -1 for d in (arg.shape or [])]
        return env.TensorSpec(name=arg.name, dtype=_dtype(arg.type), shape=shape)

    return [spec(a) for a in session.get_inputs()], [spec(a) for a in session.get_outputs()]


def _dtype(ort_type: str) -> str:
    inner = ort_type.removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64"}.get(inner, inner)


def _chunk(manifest: env.Manifest, index: int, data: bytes, sha256: str | None = None) -> env.Chunk:
    """One chunk; ``sha256`` when its checksum is known already, else it is worked out here."""
    return env.Chunk(
        name=manifest.name,
        version=manifest.version,
        index=index,
        sha256=sha256 if sha256 is not None else hashlib.sha256(data).hexdigest(),
        data=data,
    )


def _check_same_size(path: Path, f: Any, manifest: env.Manifest) -> None:
    size = os.fstat(f.fileno()).st_size
    if size != manifest.size:
        raise DeliveryError(f"{path}: {size} bytes, but the manifest says {manifest.size}; was it changed since?")


def same_artefact(a: env.Manifest, b: env.Manifest) -> bool:
    """Whether two manifests describe the same bytes chunked the same way (a re-announce with
    other targets or a new signature is the same artefact: what is stored or half-received of
    it stays good)."""
    return (a.sha256.lower(), a.size, a.chunk_size, a.chunk_count) == (
        b.sha256.lower(),
        b.size,
        b.chunk_size,
        b.chunk_count,
    )


def expected_chunk_length(manifest: env.Manifest, index: int) -> int:
    """Bytes in chunk ``index``: the chunk size, except for a shorter last one."""
    return min(manifest.chunk_size, manifest.size - index * manifest.chunk_size)


def iter_chunks(path: str | Path, manifest: env.Manifest) -> Iterator[env.Chunk]:
    """Every chunk in index order, one chunk in memory at a time."""
    path = Path(path)
    try:
        known = _CHUNK_DIGESTS.get(_file_key(path, manifest.chunk_size))
        if known is not None and len(known) != manifest.chunk_count:
            known = None
        with open(path, "rb") as f:
            _check_same_size(path, f, manifest)
            for index in range(manifest.chunk_count):
                f.seek(index * manifest.chunk_size)
                yield _chunk(manifest, index, f.read(manifest.chunk_size), known[index] if known else None)
    except OSError as exc:
        raise DeliveryError(f"{path}: cannot read the artefact ({exc.strerror or exc})") from None


def read_chunk(path: str | Path, manifest: env.Manifest, index: int) -> env.Chunk:
    """One chunk, read with a seek (what a fetch answer needs)."""
    path = Path(path)
    if not 0 <= index < manifest.chunk_count:
        raise DeliveryError(f"chunk {index} is out of range for {manifest.chunk_count} chunks")
    try:
        with open(path, "rb") as f:
            _check_same_size(path, f, manifest)
            f.seek(index * manifest.chunk_size)
            return _chunk(manifest, index, f.read(manifest.chunk_size))
    except OSError as exc:
        raise DeliveryError(f"{path}: cannot read the artefact ({exc.strerror or exc})") from None


# ---- targets --------------------------------------------------------------------------------


def _split(value: str | Sequence[str] | None) -> list[str]:
    items = [value] if isinstance(value, str) else list(value or [])
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def parse_targets(
    devices: str | Sequence[str] | None = None,
    profiles: str | Sequence[str] | None = None,
    fleets: str | Sequence[str] | None = None,
) -> env.Targets:
    """A target selector from the comma lists an operator types; a typo is refused here rather
    than producing a selector that silently matches no device."""
    out: dict[str, list[str]] = {}
    for key, value, rule in (
        ("devices", devices, _DEVICE_PATTERN),
        ("profiles", profiles, MODEL_ID),
        ("fleets", fleets, MODEL_ID),
    ):
        items = _split(value)
        bad = [item for item in items if not rule.match(item)]
        if bad:
            raise DeliveryError(f"targets {key}: {', '.join(map(repr, bad))} not valid (allowed: {rule.pattern})")
        out[key] = list(dict.fromkeys(items))
    return env.Targets(**out)


def targets_match(targets: env.Targets, device_id: str, profile: str | None, fleet: str | None) -> bool:
    """Whether a device is selected: every non-empty list must match; device entries may be globs."""
    if targets.devices and not any(fnmatch.fnmatchcase(device_id, p) for p in targets.devices):
        return False
    if targets.profiles and profile not in targets.profiles:
        return False
    return not (targets.fleets and fleet not in targets.fleets)


def describe_targets(targets: env.Targets) -> str:
    parts = [f"{k}={','.join(v)}" for k, v in targets.model_dump().items() if v]
    return " ".join(parts) or "all devices"
