"""Every MQTT payload edgewire sends, as a versioned msgpack envelope.

One module owns the payload schemas so that the wire is defined once (topics.md mirrors it,
and a test pins the two together). Decoding never trusts the sender: size is checked before
parsing, the schema version before validation, and every failure surfaces as
:class:`~edgewire.errors.DecodeError`, so a receive loop has exactly one error to count.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgewire.errors import DecodeError, PayloadTooLarge

SCHEMA_VERSION = 2
#: Versions this build decodes. v2 only added optional fields (detections, crops, the task), so a
#: v1 document is a valid v2 one; anything else is refused with the versions it could read.
READABLE_VERSIONS = frozenset({1, 2})
KIB = 1024
MIB = 1024 * KIB

TaskState = Literal["COMPLETE", "PENDING_CLOUD", "TIMEOUT"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Envelope(_Strict):
    """Base of every top-level payload: carries the schema version ``v``."""

    #: Largest encoded payload accepted for this kind, in bytes.
    MAX_BYTES: ClassVar[int] = 64 * KIB
    v: int = SCHEMA_VERSION


#: ``Result.reason`` of a request the bridge refused because its device sent past its budget
#: there: "not now", not "no" -- the device keeps a queued request owed and asks again later.
RATE_LIMITED = "rate limited"

# ---- nested parts -------------------------------------------------------------------------


class Prediction(_Strict):
    label: str
    class_index: int
    confidence: float
    margin: float


class Timings(_Strict):
    queued_ms: float
    inference_ms: float
    total_ms: float


class Detection(_Strict):
    """One object a detector found: box corners in source-image pixels (letterbox undone)."""

    box: list[float]
    score: float
    class_index: int
    label: str
    track_id: int | None = None


class Crop(_Strict):
    """An uncertain object cut out of the frame: the region sent (box plus margin) and its box."""

    box: list[float]
    region: list[int]
    payload: bytes
    track_id: int | None = None


class TensorSpec(_Strict):
    name: str
    dtype: str
    shape: list[int]


class Targets(_Strict):
    """Which devices a model is for; an empty list matches everything."""

    devices: list[str] = Field(default_factory=list)
    profiles: list[str] = Field(default_factory=list)
    fleets: list[str] = Field(default_factory=list)


# ---- inference ----------------------------------------------------------------------------


class Request(Envelope):
    MAX_BYTES: ClassVar[int] = 4 * MIB
    trace_id: str
    device_id: str
    fleet: str | None = None
    created: float
    deadline: float
    model_hint: str | None = None
    local: Prediction | None = None
    reasons: list[str] = Field(default_factory=list)
    payload: bytes
    content_type: str
    reply_to: str
    task: Literal["classify", "detect"] = "classify"
    detections: list[Detection] = Field(default_factory=list)
    crops: list[Crop] = Field(default_factory=list)


class Result(Envelope):
    trace_id: str
    device_id: str
    bridge_id: str
    status: Literal["ok", "unavailable", "rejected", "expired"]
    model: str | None = None
    version: str | None = None
    prediction: Prediction | None = None
    detections: list[Detection] | None = None
    timings: Timings
    reason: str | None = None
    #: The bridge's hop stamps (epoch seconds, see edgewire.hops); empty when it stamps none.
    hops: dict[str, float] = Field(default_factory=dict)
    #: The tier whose model answered: ``site`` (a site's edge server) or ``cloud``; None from a
    #: bridge that names none (an older one: the cloud).
    tier: Literal["site", "cloud"] | None = None


class LocalResult(_Strict):
    """One frame's outcome on the device (an item of LocalResults)."""

    trace_id: str
    device_id: str
    seq: int
    source_ref: str
    ts: float
    state: TaskState
    answered_by: Literal["edge", "cloud"]
    prediction: Prediction | None = None
    detections: list[Detection] | None = None
    reasons: list[str] = Field(default_factory=list)
    sharpness: float | None = None
    model: str
    version: str
    degraded: bool
    latency_ms: float
    #: A second outcome for a frame answered before: the cloud's answer to a request queued
    #: while degraded, or the end of an escalation a restart interrupted.
    late: bool = False
    #: An escalated frame's final outcome: every hop's stamp (epoch seconds, see edgewire.hops),
    #: the device's and the bridge's; the steps between them add up to ``latency_ms``.
    hops: dict[str, float] | None = None


class LocalResults(Envelope):
    """Outcomes of one micro-batch, or of the batches finished within the device's
    ``publish.local_min_interval_ms``: a paced camera sends one batch per message; a device
    working through a backlog sends many per message instead of flooding the broker."""

    MAX_BYTES: ClassVar[int] = 1 * MIB
    device_id: str
    results: list[LocalResult]


class Frame(Envelope):
    MAX_BYTES: ClassVar[int] = 4 * MIB
    frame_id: str
    ts: float
    content_type: str
    data: bytes


# ---- model delivery -----------------------------------------------------------------------


class Manifest(Envelope):
    name: str
    version: str
    # Free text on the wire so a device can refuse a format it does not know with a reason on
    # its status topic, rather than drop the announce as undecodable.
    format: str
    precision: str
    size: int
    sha256: str
    chunk_size: int
    chunk_count: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    targets: Targets = Field(default_factory=Targets)
    signature: bytes | None = None
    created: float


class Chunk(Envelope):
    MAX_BYTES: ClassVar[int] = 4 * MIB + 4 * KIB
    name: str
    version: str
    index: int
    sha256: str
    data: bytes


class FetchRequest(Envelope):
    device_id: str
    name: str
    version: str
    ranges: list[list[int]]


class ModelStatus(Envelope):
    device_id: str
    name: str
    version: str
    state: Literal["downloading", "verifying", "validating", "active", "failed", "rolled_back"]
    progress: float
    reason: str | None = None
    ts: float


# ---- fleet --------------------------------------------------------------------------------


class Presence(Envelope):
    client_id: str
    kind: Literal["device", "bridge", "distributor", "broker", "operator"]
    online: bool
    ts: float
    software: str
    profile: str | None = None
    fleet: str | None = None
    models: dict[str, str] = Field(default_factory=dict)
    state: str | None = None


class Telemetry(Envelope):
    client_id: str
    ts: float
    metrics: dict[str, float]


class DesiredConfig(Envelope):
    revision: int
    config: dict[str, Any]
    ts: float


class ReportedConfig(Envelope):
    device_id: str
    revision: int
    status: Literal["applied", "pending_restart", "rejected"]
    config: dict[str, Any]
    reason: str | None = None
    ts: float


ENVELOPES: dict[str, type[Envelope]] = {
    cls.__name__: cls
    for cls in (
        Request,
        Result,
        LocalResults,
        Frame,
        Manifest,
        Chunk,
        FetchRequest,
        ModelStatus,
        Presence,
        Telemetry,
        DesiredConfig,
        ReportedConfig,
    )
}

E = TypeVar("E", bound=Envelope)


def encode(envelope: Envelope) -> bytes:
    """Serialise an envelope; bytes fields travel as msgpack bin, never base64."""
    return msgpack.packb(envelope.model_dump(mode="python"), use_bin_type=True)


def decode(kind: type[E], data: bytes | bytearray, *, max_bytes: int | None = None) -> E:
    """Parse and validate one payload of ``kind``; raise DecodeError and only that."""
    limit = kind.MAX_BYTES if max_bytes is None else max_bytes
    if len(data) > limit:
        raise PayloadTooLarge(f"{kind.__name__} payload of {len(data)} bytes exceeds the {limit}-byte limit")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a zoo of types for garbage input
        raise DecodeError(f"{kind.__name__}: not a msgpack document ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise DecodeError(f"{kind.__name__}: expected a map, got {type(obj).__name__}")
    version = obj.get("v")
    if type(version) is not int or version not in READABLE_VERSIONS:
        readable = ", ".join(f"v{n}" for n in sorted(READABLE_VERSIONS))
        raise DecodeError(f"{kind.__name__}: schema version {version!r} is not supported (this build reads {readable})")
    try:
        return kind.model_validate(obj)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise DecodeError(f"{kind.__name__}: {problems}") from None
    except Exception as exc:  # pydantic can still trip on exotic msgpack values
        raise DecodeError(f"{kind.__name__}: invalid document ({type(exc).__name__})") from None
