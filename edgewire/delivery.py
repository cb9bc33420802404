"""Model delivery over MQTT, the parts every end shares: manifests, chunks, targets, push, status.

The operator's CLI, the cloud's distributor and the device's receiver all read and write the same
artefacts, so how an artefact is cut into chunks, hashed, signed and matched against a device
lives here once. Nothing here imports the cloud or the device side.

Artefacts are never read whole into memory: hashing streams the file, and a chunk is read with a
seek, so a multi-gigabyte TensorRT plan costs one chunk of memory at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fnmatch
import hashlib
import math
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgewire import envelopes as env
from edgewire import signing, topics
from edgewire.aio import cancel_and_wait
from edgewire.errors import DecodeError, EdgewireError, TopicError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgewire.session import InboundMessage, MqttSession

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
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_READ_BLOCK = 1 * env.MIB

ProgressFn = Callable[[int, int], None]


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
        ("profiles", profiles, _ID),
        ("fleets", fleets, _ID),
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


# ---- push -----------------------------------------------------------------------------------


async def announce(session: MqttSession, manifest: env.Manifest, *, timeout: float = 30.0) -> None:
    """Make ``manifest`` the retained current version, so devices that connect later see it too."""
    topic = topics.MODEL_ANNOUNCE.build(model=manifest.name)
    await session.publish(topic, env.encode(manifest), qos=topics.MODEL_ANNOUNCE.qos, retain=True, timeout=timeout)


async def withdraw(session: MqttSession, name: str, *, timeout: float = 30.0) -> None:
    """Clear the retained announce (an empty retained payload deletes it at the broker)."""
    topic = topics.MODEL_ANNOUNCE.build(model=name)
    await session.publish(topic, b"", qos=topics.MODEL_ANNOUNCE.qos, retain=True, timeout=timeout)


async def publish_chunks(
    session: MqttSession,
    path: str | Path,
    manifest: env.Manifest,
    *,
    progress: ProgressFn | None = None,
    window: int = 16,
    timeout: float = 30.0,
    indices: Iterable[int] | None = None,
) -> int:
    """Publish chunks (all, or ``indices``) at QoS 1 with at most ``window`` unacknowledged.

    A window rather than one-at-a-time keeps the link busy across the broker round trip; a bound
    keeps a large artefact from queueing thousands of messages in the client at once.
    """
    if window < 1:
        raise DeliveryError("window must be at least 1")
    wanted = None if indices is None else sorted(set(indices))
    total = manifest.chunk_count if wanted is None else len(wanted)
    done = 0
    if progress is not None:
        progress(0, total)

    async def send(item: tuple[str, bytes]) -> None:
        nonlocal done
        await session.publish(item[0], item[1], qos=topics.MODEL_CHUNK.qos, timeout=timeout)
        done += 1
        if progress is not None:
            progress(done, total)

    source = iter_chunks(path, manifest) if wanted is None else (read_chunk(path, manifest, i) for i in wanted)

    def encoded() -> tuple[str, bytes] | None:
        chunk = next(source, None)
        if chunk is None:
            return None
        topic = topics.MODEL_CHUNK.build(model=chunk.name, version=chunk.version, index=chunk.index)
        return topic, env.encode(chunk)

    # Reading, hashing and encoding the next chunk runs on a thread (all three release the GIL)
    # while the event loop sends the ones before it, so the two overlap.
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chunks") as reader:

        async def chunks() -> AsyncIterator[tuple[str, bytes]]:
            ahead = loop.run_in_executor(reader, encoded)
            while (item := await ahead) is not None:
                ahead = loop.run_in_executor(reader, encoded)
                yield item

        await _send_windowed(chunks(), send, window)
    return done


async def _send_windowed(
    items: AsyncIterator[tuple[str, bytes]], send: Callable[[tuple[str, bytes]], Awaitable[None]], window: int
) -> None:
    in_flight: set[asyncio.Task[None]] = set()
    try:
        async for chunk in items:
            if len(in_flight) >= window:
                finished, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    task.result()  # the first failed publish ends the push
            in_flight.add(asyncio.create_task(send(chunk)))
        if in_flight:
            finished, in_flight = await asyncio.wait(in_flight)
            for task in finished:
                task.result()
    finally:
        await cancel_and_wait(*in_flight)


async def push(
    session: MqttSession,
    path: str | Path,
    manifest: env.Manifest,
    *,
    progress: ProgressFn | None = None,
    window: int = 16,
) -> int:
    """Announce first, then every chunk: a device must know the manifest (size, chunk size, hash)
    before a chunk is of any use to it, and the distributor stores chunks only for known versions."""
    await announce(session, manifest)
    return await publish_chunks(session, path, manifest, progress=progress, window=window)


# ---- reading what the fleet reports ---------------------------------------------------------


async def next_message(session: MqttSession, timeout: float) -> InboundMessage | None:
    """The next received message, or None after ``timeout`` seconds (nothing is lost on timeout)."""
    if timeout <= 0:
        return None
    stream = session.messages()
    try:
        return await asyncio.wait_for(stream.__anext__(), timeout)
    except asyncio.TimeoutError:
        return None
    finally:
        with contextlib.suppress(Exception):
            await stream.aclose()


async def collect_retained(
    session: MqttSession,
    spec: topics.TopicSpec,
    topic_filter: str,
    *,
    quiet_s: float = 0.5,
    timeout_s: float = 3.0,
) -> dict[str, env.Envelope]:
    """Retained messages of one family: subscribe, then read until the broker has been quiet for
    ``quiet_s`` (retained messages arrive in a burst right after the subscription) or ``timeout_s``.

    Messages of other families on the same session are skipped; malformed ones are skipped too, an
    operator's view must not fail because one device published garbage.
    """
    await session.wait_connected(max(timeout_s, 5.0))
    await session.subscribe(topic_filter, qos=1)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    found: dict[str, env.Envelope] = {}
    while True:
        message = await next_message(session, min(quiet_s, deadline - loop.time()))
        if message is None:
            return found
        topic = str(message.topic)
        if spec.match(topic) is None:
            continue
        payload = bytes(message.payload)
        if not payload:  # a cleared retained message
            found.pop(topic, None)
            continue
        try:
            found[topic] = env.decode(spec.payload, payload)
        except DecodeError:
            continue


async def collect_status(
    session: MqttSession, name: str | None, *, quiet_s: float = 0.5, timeout_s: float = 3.0
) -> dict[tuple[str, str], env.ModelStatus]:
    """The retained status of every device for one model (or all models), keyed (device, model)."""
    spec = topics.MODEL_STATUS
    flt = spec.filter(model=name) if name else spec.filter()
    found = await collect_retained(session, spec, flt, quiet_s=quiet_s, timeout_s=timeout_s)
    out: dict[tuple[str, str], env.ModelStatus] = {}
    for topic, status in found.items():
        levels = spec.match(topic) or {}
        assert isinstance(status, env.ModelStatus)
        if status.device_id == levels.get("device_id") and status.name == levels.get("model"):
            out[(status.device_id, status.name)] = status
    return out


async def collect_presence(
    session: MqttSession, *, quiet_s: float = 0.5, timeout_s: float = 3.0
) -> dict[str, env.Presence]:
    """Every retained presence, keyed by client id (online or not: the ``online`` field says)."""
    spec = topics.PRESENCE
    found = await collect_retained(session, spec, spec.filter(), quiet_s=quiet_s, timeout_s=timeout_s)
    out: dict[str, env.Presence] = {}
    for topic, presence in found.items():
        levels = spec.match(topic) or {}
        assert isinstance(presence, env.Presence)
        if presence.client_id == levels.get("client_id"):
            out[presence.client_id] = presence
    return out


async def current_manifest(
    session: MqttSession, name: str, *, quiet_s: float = 0.5, timeout_s: float = 3.0
) -> env.Manifest | None:
    """The retained announce of ``name`` at the broker, if any."""
    spec = topics.MODEL_ANNOUNCE
    topic = spec.build(model=name)
    found = await collect_retained(session, spec, topic, quiet_s=quiet_s, timeout_s=timeout_s)
    manifest = found.get(topic)
    return manifest if isinstance(manifest, env.Manifest) and manifest.name == name else None


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172_800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def status_rows(
    statuses: dict[tuple[str, str], env.ModelStatus],
    presences: dict[str, env.Presence] | None = None,
    *,
    now: float | None = None,
) -> list[dict[str, Any]]:
    """One row per device and model, sorted by model then device (the table's and --json's rows)."""
    now = time.time() if now is None else now
    rows = []
    for (device, model), s in sorted(statuses.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        row: dict[str, Any] = {
            "device": device,
            "model": model,
            "version": s.version,
            "state": s.state,
            "progress": round(s.progress * 100, 1),
            "reason": s.reason or "",
            "age_s": round(now - s.ts, 1),
        }
        if presences is not None:
            p = presences.get(device)
            row["online"] = None if p is None else p.online
        rows.append(row)
    return rows


def format_status_table(
    statuses: dict[tuple[str, str], env.ModelStatus],
    presences: dict[str, env.Presence] | None = None,
    *,
    now: float | None = None,
) -> str:
    """A plain-text table an operator can read in a terminal, a log or a CI transcript alike."""
    rows = status_rows(statuses, presences, now=now)
    if not rows:
        return "no model status reported"
    headers = ["device", "model", "version", "state", "progress", "reason", "age"]
    if presences is not None:
        headers.insert(1, "online")
    table = [headers]
    for r in rows:
        line = [
            r["device"],
            r["model"],
            r["version"],
            r["state"],
            f"{r['progress']:.0f}%",
            r["reason"],
            _age(r["age_s"]),
        ]
        if presences is not None:
            line.insert(1, {True: "yes", False: "no", None: "?"}[r["online"]])
        table.append(line)
    widths = [max(len(str(row[i])) for row in table) for i in range(len(headers))]
    return "\n".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table
    )


# ---- push history ---------------------------------------------------------------------------


def default_history_root() -> Path:
    """Where pushed manifests are remembered: $EDGEWIRE_HOME/models, else the XDG data folder."""
    home = os.environ.get("EDGEWIRE_HOME")
    if home:
        return Path(home).expanduser() / "models"
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "edgewire" / "models"


def atomic_write(path: Path, data: bytes) -> None:
    """Write a temp file, fsync and rename, so a crash leaves the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class History:
    """The manifests this operator pushed, so a rollback can re-announce an earlier version
    exactly as it was (same hash, same signature) without the artefact at hand.

    Layout: ``root/<name>/<version>.msgpack`` (the manifest's wire encoding) and, for a version
    that failed its canary or was rolled back, ``root/<name>/<version>.failed`` with the reason;
    ``latest`` and ``previous`` skip failed versions, ``get`` does not.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_history_root()

    def _path(self, name: str, version: str, suffix: str = ".msgpack") -> Path:
        check_model_ids(name, version)
        return self.root / name / f"{version}{suffix}"

    def save(self, manifest: env.Manifest) -> Path:
        path = self._path(manifest.name, manifest.version)
        atomic_write(path, env.encode(manifest))
        with contextlib.suppress(FileNotFoundError):
            self._path(manifest.name, manifest.version, ".failed").unlink()
        return path

    def get(self, name: str, version: str) -> env.Manifest:
        path = self._path(name, version)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            known = ", ".join(m.version for m in self.versions(name, include_failed=True)) or "none"
            raise DeliveryError(
                f"no version {version} of {name} in the push history {self.root} (known: {known})"
            ) from None
        except OSError as exc:
            raise DeliveryError(f"{path}: cannot read ({exc.strerror or exc})") from None
        try:
            return env.decode(env.Manifest, data)
        except DecodeError as exc:
            raise DeliveryError(f"{path}: not a stored manifest: {exc}") from None

    def versions(self, name: str, *, include_failed: bool = False) -> list[env.Manifest]:
        """Stored manifests of ``name``, oldest push first."""
        folder = self.root / name
        if not _ID.match(name) or not folder.is_dir():
            return []
        found = []
        for path in folder.glob("*.msgpack"):
            if not include_failed and path.with_suffix(".failed").exists():
                continue
            with contextlib.suppress(DeliveryError):
                found.append(self.get(name, path.stem))
        return sorted(found, key=lambda m: (m.created, m.version))

    def latest(self, name: str) -> env.Manifest | None:
        versions = self.versions(name)
        return versions[-1] if versions else None

    def previous(self, name: str, current: str) -> env.Manifest | None:
        """The newest good version pushed before ``current`` (or, when ``current`` is not in the
        history, the newest good version other than it)."""
        every = self.versions(name, include_failed=True)
        mine = next((m for m in every if m.version == current), None)
        candidates = [
            m for m in self.versions(name) if m.version != current and (mine is None or m.created < mine.created)
        ]
        return candidates[-1] if candidates else None

    def mark_failed(self, name: str, version: str, reason: str) -> None:
        atomic_write(self._path(name, version, ".failed"), reason.encode())

    def failed(self, name: str, version: str) -> str | None:
        try:
            return self._path(name, version, ".failed").read_text()
        except FileNotFoundError:
            return None
