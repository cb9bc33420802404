"""A batch's local results as wire-ready rows, encoded without a model object per frame.

Every frame the device answers becomes one LocalResult on its ``local`` topic. Validating and
dumping a pydantic model per frame costs more than decoding the frame's 8x8 input, so the frame
path makes each answer a row (:class:`Answer`, a msgspec Struct with LocalResult's fields) and
packs the rows itself on the inference thread; the envelope objects are made only for whoever
asks for them (an ``on_result`` hook, an escalation's note). Building and packing a batch's rows
holds the interpreter, and every microsecond of it is one the other worker may wait for: as
dicts packed by msgpack it took about 26 us for sixteen frames, as Structs packed by msgspec
about 12 us. A test pins the bytes to ``envelopes.encode`` of the same results.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import msgpack
import msgspec

from edgewire import envelopes as env
from edgewire.metrics import Counted, count_latencies

from .judge import Verdicts
from .sources import Frame


class _Prediction(msgspec.Struct):
    label: str
    class_index: int
    confidence: float
    margin: float


class Answer(msgspec.Struct):
    """A frame answered on the device at once, as its row: LocalResult's fields, in its order,
    so that it packs to the same bytes as the envelope's dump. Made in a fraction of the time
    of a dict with the same keys (no keys to hash, no validation)."""

    trace_id: str
    device_id: str
    seq: int
    source_ref: str
    ts: float
    state: str
    answered_by: str
    prediction: _Prediction
    detections: None
    reasons: list[str]
    sharpness: float | None
    model: str
    version: str
    degraded: bool
    latency_ms: float
    late: bool
    hops: None


if Answer.__struct_fields__ != tuple(env.LocalResult.model_fields):
    raise ImportError("edge.local_results.Answer must list LocalResult's fields in LocalResult's order")

#: A row in its wire form: ``LocalResult.model_dump(mode="python")``, or a frame answered here.
Row = dict[str, Any] | Answer


class LocalRows:
    """Outcomes of one batch in frame order, as rows; envelope objects are made on demand, and
    the rows' wire bytes once (:meth:`packed`, on a worker thread for the frame path)."""

    __slots__ = ("_objects", "_packed", "_sealed", "counted", "rows")

    def __init__(self, rows: list[Row] | None = None) -> None:
        self.rows: list[Row] = rows if rows is not None else []
        self._objects: dict[int, env.LocalResult] = {}
        self._packed: bytes | None = None
        #: How many rows there are, once :meth:`seal` has dropped them.
        self._sealed: int | None = None
        #: The rows' latencies counted per bucket where they were made (all answered here),
        #: until a row is replaced.
        self.counted: Counted | None = None

    @classmethod
    def of(cls, results: list[env.LocalResult]) -> LocalRows:
        rows = cls([result.model_dump(mode="python") for result in results])
        rows._objects = dict(enumerate(results))
        return rows

    def __len__(self) -> int:
        return len(self.rows) if self._sealed is None else self._sealed

    def seal(self) -> None:
        """Keep the rows as their wire bytes alone, for a batch whose rows nothing will change
        or ask for as objects: the worker that made them drops them while they are still in its
        cache, rather than the event loop a few batches later, when every one of them (a dozen
        objects a frame) is a cache miss. What reads rows after this decodes the bytes."""
        self.packed()
        self._sealed = len(self.rows)
        self.rows = []

    def _unsealed(self) -> list[Row]:
        if self._sealed is None:
            return self.rows
        assert self._packed is not None
        return msgspec.msgpack.decode(_array_header(self._sealed) + self._packed)  # type: ignore[no-any-return]

    def put(self, i: int, result: env.LocalResult) -> None:
        """Row ``i`` is this envelope instead (a frame that waits for the cloud)."""
        if self._sealed is not None:
            self.rows, self._sealed = self._unsealed(), None
        self._objects[i] = result
        self.rows[i] = result.model_dump(mode="python")
        self._packed = None
        self.counted = None

    def envelopes(self) -> Iterator[env.LocalResult]:
        for i, row in enumerate(self._unsealed()):
            result = self._objects.get(i)
            yield result if result is not None else _envelope(_plain(row))

    def completed_latencies(self) -> list[float]:
        """``latency_ms`` of the rows whose state is COMPLETE (every :class:`Answer` is), read
        in place: this runs on the event loop for a batch whose rows an escalation changed."""
        return [
            row.latency_ms if isinstance(row, Answer) else row["latency_ms"]
            for row in self._unsealed()
            if isinstance(row, Answer) or row["state"] == "COMPLETE"
        ]

    def dicts(self) -> list[dict[str, Any]]:
        """The rows as ``LocalResult.model_dump(mode="python")`` gives them."""
        return [_plain(row) for row in self._unsealed()]

    def packed(self) -> bytes:
        """The rows' wire bytes, one after the other (the items of the ``results`` array)."""
        if self._packed is None:
            whole = _encoder().encode(self.rows)
            self._packed = whole[len(_array_header(len(self.rows))) :]
        return self._packed

    def encode(self, device_id: str) -> bytes:
        """The LocalResults payload, byte for byte what ``envelopes.encode`` gives."""
        return encode_packed(device_id, [self.packed()], len(self))


_ENCODERS = threading.local()


def _encoder() -> msgspec.msgpack.Encoder:
    """This thread's encoder. The rows (:class:`Answer` Structs, or an envelope's dump) hold
    str, int, float, bool and None values, which msgspec packs to the same bytes as msgpack
    (smallest integer and string forms, 64-bit floats) in a fraction of the time: on a worker
    that holds the interpreter while it packs, that time is taken from the other worker too."""
    encoder: msgspec.msgpack.Encoder | None = getattr(_ENCODERS, "encoder", None)
    if encoder is None:
        encoder = _ENCODERS.encoder = msgspec.msgpack.Encoder()
    return encoder


def encode_packed(device_id: str, parts: list[bytes], count: int) -> bytes:
    """The LocalResults payload of ``count`` rows already packed (:meth:`LocalRows.packed`, in
    order): the bytes ``envelopes.encode`` gives for those rows."""
    # The message's map with an empty results array, which packs as its last byte.
    empty = msgpack.packb({"v": env.SCHEMA_VERSION, "device_id": device_id, "results": []}, use_bin_type=True)
    return b"".join([empty[:-1], _array_header(count), *parts])


def _array_header(count: int) -> bytes:
    """msgpack's header of an array of ``count`` items."""
    if count < 16:
        return bytes((0x90 | count,))
    if count <= 0xFFFF:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def _plain(row: Row) -> dict[str, Any]:
    if isinstance(row, dict):
        return row
    plain = msgspec.structs.asdict(row)
    plain["prediction"] = msgspec.structs.asdict(row.prediction)
    return plain


def _envelope(row: dict[str, Any]) -> env.LocalResult:
    """Rows are built by the device from its own values, so they are not validated again."""
    prediction = row.get("prediction")
    detections = row.get("detections")
    return env.LocalResult.model_construct(
        **{
            **row,
            "prediction": env.Prediction.model_construct(**prediction) if prediction is not None else None,
            "detections": [env.Detection.model_construct(**d) for d in detections] if detections is not None else None,
        }
    )


def answered_here(
    frames: list[Frame],
    verdicts: Verdicts,
    *,
    device_id: str,
    trace_ids: list[str],
    model: str,
    version: str,
    now: float,
) -> LocalRows:
    """Rows for frames answered on the device at ``now``, complete at once; a hard one is
    flagged degraded (it had no cloud to go to). ``frames[i]`` was judged ``verdicts[i]`` and
    is known by ``trace_ids[i]``."""
    v = verdicts
    latencies = [(now - frame.ts) * 1000.0 for frame in frames]
    rows = LocalRows(
        [
            Answer(
                trace_id,
                device_id,
                frame.seq,
                frame.ref,
                frame.ts,
                "COMPLETE",
                "edge",
                _Prediction(label, index, conf, margin),
                None,
                list(reasons),
                sharp,
                model,
                version,
                bool(reasons),
                latency,
                False,
                None,
            )
            for frame, trace_id, label, index, conf, margin, reasons, sharp, latency in zip(
                frames,
                trace_ids,
                v.labels,
                v.class_index,
                v.confidence,
                v.margin,
                v.reasons,
                v.sharpness,
                latencies,
                strict=True,
            )
        ]
    )
    rows.counted = count_latencies(latencies)
    return rows
