"""The bridge's merge policies for detect requests, on hand-made detections."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgewire.cloud_bridge import detect_merge
from edgewire.envelopes import Crop, Detection, Prediction, Request


def det(box: list[float], score: float, k: int, track: int | None = None) -> Detection:
    return Detection(box=box, score=score, class_index=k, label=str(k), track_id=track)


def req(detections: list[Detection], crops: list[Crop] | None = None, payload: bytes = b"") -> Request:
    return Request(
        trace_id="t",
        device_id="cam",
        created=0.0,
        deadline=1.0,
        payload=payload,
        content_type="image/png",
        reply_to="result/cam",
        task="detect",
        detections=detections,
        crops=crops or [],
    )


def test_union_suppresses_same_class_overlaps_and_keeps_the_rest() -> None:
    device = [det([0, 0, 10, 10], 0.4, 3, track=1), det([50, 50, 60, 60], 0.9, 5, track=2)]
    cloud = [det([1, 0, 11, 10], 0.8, 3), det([50, 50, 60, 60], 0.7, 6), det([90, 90, 99, 99], 0.6, 1)]
    merged = detect_merge.union(device, cloud)
    # The device's weaker "3" loses to the cloud's overlapping "3", which inherits its track.
    assert [(d.box, d.class_index, d.track_id) for d in merged] == [
        ([50, 50, 60, 60], 5, 2),
        ([1, 0, 11, 10], 3, 1),
        ([50, 50, 60, 60], 6, None),  # track 2 is taken by the device's own box
        ([90, 90, 99, 99], 1, None),
    ]


def test_replace_answers_the_cloud_boxes_with_the_device_tracks() -> None:
    device = [det([0, 0, 10, 10], 0.4, 3, track=7)]
    cloud = [det([0, 1, 10, 11], 0.8, 8), det([40, 40, 50, 50], 0.6, 1)]
    assert [(d.class_index, d.track_id) for d in detect_merge.replace(device, cloud)] == [(8, 7), (1, None)]


def test_relabel_puts_answers_in_place_and_suppresses_what_now_agrees() -> None:
    a, b, c = (
        det([0, 0, 10, 10], 0.5, 3, track=1),
        det([1, 0, 11, 10], 0.45, 8, track=2),
        det([40, 40, 50, 50], 0.95, 2),
    )
    answers = [Prediction(label="8", class_index=8, confidence=0.9, margin=0.5)]
    merged = detect_merge.relabel(req([a, b, c]), [a], answers)
    # a becomes an "8" at 0.9 and now suppresses b (the same object, same class); c is untouched.
    assert [(d.class_index, d.score, d.track_id) for d in merged] == [(2, 0.95, None), (8, 0.9, 1)]


def test_pieces_are_crops_cut_to_their_boxes_or_boxes_cut_from_the_frame() -> None:
    frame = np.zeros((60, 80), np.uint8)
    frame[20:30, 30:45] = 255
    ok, png = cv2.imencode(".png", frame)
    assert ok
    region = frame[14:36, 24:51]
    ok, crop_png = cv2.imencode(".png", region)
    d = det([30, 20, 45, 30], 0.4, 1, track=9)
    crop = Crop(box=d.box, region=[24, 14, 51, 36], payload=crop_png.tobytes(), track_id=9)
    pieces, boxes = detect_merge.pieces_to_classify(req([d], [crop]), gray=True)
    assert boxes == [d] and pieces[0].shape == (10, 15) and (pieces[0] == 255).all()
    pieces, boxes = detect_merge.pieces_to_classify(req([d], payload=png.tobytes()), gray=True)
    assert boxes == [d] and pieces[0].shape == (10, 15) and (pieces[0] == 255).all()
    with pytest.raises(detect_merge.Unanswerable, match="neither"):
        detect_merge.pieces_to_classify(req([]), gray=True)
