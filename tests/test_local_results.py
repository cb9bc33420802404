"""A batch's local results as rows: the same bytes and the same objects as the envelopes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgewire import envelopes as env
from edgewire.config import JudgeSettings
from edgewire.edge.judge import Judge
from edgewire.edge.local_results import LocalRows, answered_here, encode_packed
from edgewire.edge.sources import Frame

LABELS = ("cat", "dog", "bird", "other")


def batch() -> tuple[list[Frame], Judge, np.ndarray]:
    frames = [Frame(seq=10 + i, ref=f"f{i}.jpg", ts=1000.0 + i, path=Path(f"/x/f{i}.jpg")) for i in range(4)]
    probs = np.array(
        [
            [0.625, 0.25, 0.125, 0.0],  # sure
            [0.375, 0.3125, 0.3125, 0.0],  # low confidence
            [0.0, 0.0, 0.125, 0.875],  # an unknown class
            [0.25, 0.25, 0.25, 0.25],  # low confidence and no margin
        ],
        dtype=np.float32,
    )
    return frames, Judge(JudgeSettings(min_confidence=0.5, min_margin=0.1, unknown_labels=["other"]), LABELS), probs


def expected(
    frames: list[Frame], judge: Judge, probs: np.ndarray, sharp: list[float | None] | None, now: float
) -> list[env.LocalResult]:
    """The results as the envelopes would be built one by one, validated."""
    out = []
    for frame, verdict in zip(frames, judge.judge(probs, sharp), strict=True):
        out.append(
            env.LocalResult(
                trace_id=f"run-{frame.seq}",  # the ids handed to answered_here below
                device_id="cam-01",
                seq=frame.seq,
                source_ref=frame.ref,
                ts=frame.ts,
                state="COMPLETE",
                answered_by="edge",
                prediction=verdict.prediction,
                reasons=list(verdict.reasons),
                sharpness=verdict.sharpness,
                model="digits",
                version="1.0",
                degraded=verdict.hard,
                latency_ms=(now - frame.ts) * 1000.0,
            )
        )
    return out


def rows_for(
    frames: list[Frame], judge: Judge, probs: np.ndarray, sharp: list[float | None] | None, now: float
) -> LocalRows:
    verdicts = judge.judge_batch(probs, sharp)
    return answered_here(
        frames,
        verdicts,
        device_id="cam-01",
        trace_ids=[f"run-{f.seq}" for f in frames],
        model="digits",
        version="1.0",
        now=now,
    )


def test_rows_encode_to_the_bytes_of_the_envelope() -> None:
    frames, judge, probs = batch()
    for sharp in (None, [10.0, 0.5, 200.0, None]):
        want = expected(frames, judge, probs, sharp, now=2000.0)
        rows = rows_for(frames, judge, probs, sharp, now=2000.0)
        assert rows.encode("cam-01") == env.encode(env.LocalResults(device_id="cam-01", results=want))
        assert list(rows.envelopes()) == want
        assert [r.degraded for r in want] == [False, True, True, True]


def test_envelopes_put_in_place_of_a_row_keep_frame_order_and_travel_as_they_are() -> None:
    frames, judge, probs = batch()
    want = expected(frames, judge, probs, None, now=2000.0)
    waiting = want[1].model_copy(update={"state": "PENDING_CLOUD", "degraded": False})
    want[1] = waiting
    rows = rows_for(frames, judge, probs, None, now=2000.0)
    rows.put(1, waiting)
    envelopes = list(rows.envelopes())
    assert envelopes[1] is waiting
    assert envelopes == want
    assert rows.encode("cam-01") == env.encode(env.LocalResults(device_id="cam-01", results=want))
    # Latencies count the rows complete here, not the one waiting for the cloud.
    assert rows.counted is None
    assert rows.completed_latencies() == [r.latency_ms for r in want if r.state == "COMPLETE"]
    assert len(rows.completed_latencies()) == 3


def test_rows_of_envelopes_encode_as_the_envelope_and_give_them_back() -> None:
    frames, judge, probs = batch()
    want = expected(frames, judge, probs, None, now=2000.0)[:2]
    rows = LocalRows.of(want)
    assert len(rows) == 2
    assert rows.encode("cam-01") == env.encode(env.LocalResults(device_id="cam-01", results=want))
    assert all(a is b for a, b in zip(rows.envelopes(), want, strict=True))
    decoded = env.decode(env.LocalResults, rows.encode("cam-01"))
    assert decoded.results == want


def test_a_detectors_rows_come_back_as_the_same_envelopes() -> None:
    det = env.Detection(box=[1.0, 2.0, 30.0, 40.0], score=0.5, class_index=1, label="dog")
    result = env.LocalResult(
        trace_id="run-0",
        device_id="cam-01",
        seq=0,
        source_ref="f0.jpg",
        ts=1.0,
        state="COMPLETE",
        answered_by="edge",
        detections=[det],
        reasons=["uncertain_score"],
        model="pets",
        version="1",
        degraded=True,
        latency_ms=3.0,
    )
    rows = LocalRows.of([result])
    assert list(LocalRows(rows.rows).envelopes()) == [result]
    assert rows.encode("cam-01") == env.encode(env.LocalResults(device_id="cam-01", results=[result]))


def test_batches_packed_apart_join_into_the_bytes_of_one_envelope() -> None:
    """The stream packs each batch once and joins them; any count of rows (array headers of
    one byte and of three) gives the bytes of one LocalResults of all of them."""
    frames, judge, probs = batch()
    want = expected(frames, judge, probs, None, now=2000.0)
    for batches in (1, 4, 5, 70):
        parts = [rows_for(frames, judge, probs, None, now=2000.0) for _ in range(batches)]
        all_rows = [r for _ in range(batches) for r in want]
        joined = encode_packed("cam-01", [p.packed() for p in parts], 4 * batches)
        assert joined == env.encode(env.LocalResults(device_id="cam-01", results=all_rows))
    rows = rows_for(frames, judge, probs, None, now=2000.0)
    rows.packed()
    waiting = want[1].model_copy(update={"state": "PENDING_CLOUD", "degraded": False})
    rows.put(1, waiting)  # packed again after a row is replaced
    assert rows.encode("cam-01") == env.encode(
        env.LocalResults(device_id="cam-01", results=[want[0], waiting, *want[2:]])
    )


def test_sealed_rows_keep_their_bytes_and_give_the_same_answers_back() -> None:
    """A batch whose rows nothing changes drops them on the worker and keeps the wire bytes:
    everything read afterwards (count, bytes, envelopes, latencies, a late put) is the same."""
    frames, judge, probs = batch()
    for sharp in (None, [10.0, 0.5, 200.0, None]):
        want = expected(frames, judge, probs, sharp, now=2000.0)
        sealed = rows_for(frames, judge, probs, sharp, now=2000.0)
        sealed.seal()
        assert sealed.rows == [] and len(sealed) == 4 and sealed.counted is not None
        assert sealed.encode("cam-01") == env.encode(env.LocalResults(device_id="cam-01", results=want))
        assert list(sealed.envelopes()) == want
        assert sealed.completed_latencies() == [r.latency_ms for r in want]
    waiting = want[2].model_copy(update={"state": "PENDING_CLOUD", "degraded": False})
    sealed.put(2, waiting)
    want[2] = waiting
    assert list(sealed.envelopes()) == want
    assert sealed.encode("cam-01") == env.encode(env.LocalResults(device_id="cam-01", results=want))
    assert sealed.completed_latencies() == [r.latency_ms for r in want if r.state == "COMPLETE"]
