"""Envelopes round-trip, and garbage raises only the project's DecodeError."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgewire import envelopes as env
from edgewire.errors import DecodeError, PayloadTooLarge

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
floats = st.floats(allow_nan=False, allow_infinity=False)
predictions = st.builds(
    env.Prediction,
    label=st.text(max_size=8),
    class_index=st.integers(0, 1000),
    confidence=floats,
    margin=floats,
)

STRATEGIES = {
    env.Request: st.builds(
        env.Request,
        trace_id=ids,
        device_id=ids,
        created=floats,
        deadline=floats,
        model_hint=st.none() | ids,
        local=st.none() | predictions,
        reasons=st.lists(st.sampled_from(["low_confidence", "low_margin", "blurry"])),
        payload=st.binary(max_size=2048),
        content_type=st.just("image/jpeg"),
        reply_to=st.text(max_size=40),
    ),
    env.Result: st.builds(
        env.Result,
        trace_id=ids,
        device_id=ids,
        bridge_id=ids,
        status=st.sampled_from(["ok", "unavailable", "rejected", "expired"]),
        model=st.none() | ids,
        version=st.none() | ids,
        prediction=st.none() | predictions,
        timings=st.builds(env.Timings, queued_ms=floats, inference_ms=floats, total_ms=floats),
        reason=st.none() | st.text(max_size=30),
    ),
    env.LocalResults: st.builds(
        env.LocalResults,
        device_id=ids,
        results=st.lists(
            st.builds(
                env.LocalResult,
                trace_id=ids,
                device_id=ids,
                seq=st.integers(0, 2**40),
                source_ref=st.text(max_size=30),
                ts=floats,
                state=st.sampled_from(["COMPLETE", "PENDING_CLOUD", "TIMEOUT"]),
                answered_by=st.sampled_from(["edge", "cloud"]),
                prediction=predictions,
                reasons=st.lists(st.text(max_size=10), max_size=3),
                sharpness=st.none() | floats,
                model=ids,
                version=ids,
                degraded=st.booleans(),
                latency_ms=floats,
            ),
            max_size=4,
        ),
    ),
    env.Chunk: st.builds(
        env.Chunk,
        name=ids,
        version=ids,
        index=st.integers(0, 10**6),
        sha256=st.text(max_size=64),
        data=st.binary(max_size=4096),
    ),
    env.Telemetry: st.builds(
        env.Telemetry,
        client_id=ids,
        ts=floats,
        metrics=st.dictionaries(st.text(max_size=10), floats, max_size=5),
    ),
}


@pytest.mark.parametrize("kind", list(STRATEGIES), ids=lambda k: k.__name__)
def test_round_trip(kind: type[env.Envelope]) -> None:
    @settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
    @given(STRATEGIES[kind])
    def check(value: env.Envelope) -> None:
        assert env.decode(kind, env.encode(value)) == value

    check()


@pytest.mark.parametrize("kind", list(env.ENVELOPES.values()), ids=lambda k: k.__name__)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=512))
def test_random_bytes_raise_only_decode_error(kind: type[env.Envelope], data: bytes) -> None:
    try:
        env.decode(kind, data)
    except DecodeError:
        pass


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | floats
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@pytest.mark.parametrize("kind", list(env.ENVELOPES.values()), ids=lambda k: k.__name__)
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(doc=st.dictionaries(st.sampled_from(["v", "trace_id", "data", "ts", "x"]), msgpack_values))
def test_well_formed_but_wrong_documents_raise_only_decode_error(kind: type[env.Envelope], doc: dict) -> None:
    doc.setdefault("v", 1)
    try:
        env.decode(kind, msgpack.packb(doc, use_bin_type=True))
    except DecodeError:
        pass


def _result() -> env.Result:
    return env.Result(
        trace_id="t1",
        device_id="d1",
        bridge_id="b1",
        status="ok",
        timings=env.Timings(queued_ms=0.1, inference_ms=1.0, total_ms=1.5),
    )


def test_wrong_schema_version_is_named() -> None:
    doc = _result().model_dump()
    doc["v"] = 3
    with pytest.raises(DecodeError, match=r"schema version 3 is not supported \(this build reads v1, v2\)"):
        env.decode(env.Result, msgpack.packb(doc))
    doc["v"] = True  # msgpack true is not the int 1
    with pytest.raises(DecodeError, match="schema version True"):
        env.decode(env.Result, msgpack.packb(doc))


def test_a_v1_document_still_decodes_and_reads_as_classify() -> None:
    """Devices and bridges of the first release send v1 documents: they carry none of v2's
    optional fields and must still be read, as single-label classification."""
    v1 = {
        "v": 1,
        "trace_id": "t1",
        "device_id": "d1",
        "created": 1.0,
        "deadline": 2.0,
        "payload": b"x",
        "content_type": "image/jpeg",
        "reply_to": "result/d1",
    }
    req = env.decode(env.Request, msgpack.packb(v1, use_bin_type=True))
    assert (req.v, req.task, req.detections, req.crops) == (1, "classify", [], [])
    assert env.Request(**{**v1, "v": env.SCHEMA_VERSION}).v == 2


def test_unknown_field_is_named() -> None:
    doc = _result().model_dump()
    doc["surprise"] = 1
    with pytest.raises(DecodeError, match="surprise"):
        env.decode(env.Result, msgpack.packb(doc))


def test_oversize_is_refused_before_parsing() -> None:
    with pytest.raises(PayloadTooLarge, match="exceeds"):
        env.decode(env.Result, b"\x00" * (env.Result.MAX_BYTES + 1))


def test_payload_bytes_travel_as_bin_not_text() -> None:
    req = env.Request(
        trace_id="t",
        device_id="d",
        created=1.0,
        deadline=2.0,
        payload=b"\xff\xd8jpeg",
        content_type="image/jpeg",
        reply_to="result/d",
    )
    raw = msgpack.unpackb(env.encode(req), raw=True)
    assert raw[b"payload"] == b"\xff\xd8jpeg"
