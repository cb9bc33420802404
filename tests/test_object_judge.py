"""The judge per object: which boxes are uncertain and why, when a frame escalates, the crops."""

from __future__ import annotations

import cv2
import numpy as np

from edgewire.config import ClassRule, DetectEscalation, ObjectJudgeSettings
from edgewire.detection import Detections
from edgewire.edge.object_judge import (
    BLURRY_BOX,
    ESCALATED_CLASS,
    SMALL_BOX,
    UNCERTAIN_SCORE,
    UNKNOWN_CLASS,
    ObjectJudge,
    crops_of,
)

LABELS = ("person", "car", "dog")


def dets(rows: list[tuple[float, float, float, float, float, int]]) -> Detections:
    a = np.array(rows, np.float32).reshape(-1, 6)
    return Detections(a[:, :4], a[:, 4], a[:, 5].astype(np.int64))


def test_each_policy_marks_its_boxes_and_names_its_reason() -> None:
    judge = ObjectJudge(
        ObjectJudgeSettings(
            floor=0.3,
            ceiling=0.6,
            escalate_labels=["dog"],
            min_box_px=10,
            classes={"car": ClassRule(floor=0.5, ceiling=0.95)},
        ),
        LABELS,
    )
    found = dets(
        [
            (0, 0, 50, 50, 0.9, 0),  # sure person
            (0, 0, 50, 50, 0.4, 0),  # person in the band
            (0, 0, 50, 50, 0.9, 1),  # car: its own band reaches 0.95
            (0, 0, 50, 50, 0.99, 2),  # dog: always escalated
            (0, 0, 50, 50, 0.99, 7),  # a class the labels do not name
            (0, 0, 5, 50, 0.99, 0),  # too narrow
        ]
    )
    frame = judge.judge_frame(found, None)
    assert frame.uncertain.tolist() == [False, True, True, True, True, True]
    assert frame.reasons == (UNCERTAIN_SCORE, ESCALATED_CLASS, UNKNOWN_CLASS, SMALL_BOX)
    assert frame.hard


def test_a_frame_of_sure_boxes_or_too_few_uncertain_ones_stays_local() -> None:
    judge = ObjectJudge(ObjectJudgeSettings(floor=0.3, ceiling=0.6, min_uncertain=2), LABELS)
    verdicts = judge.judge_batch([dets([(0, 0, 9, 9, 0.9, 0)]), dets([(0, 0, 9, 9, 0.4, 0)]), Detections.empty()])
    assert verdicts.hard == []
    assert [f.reasons for f in verdicts.frames] == [(), (UNCERTAIN_SCORE,), ()]
    two = judge.judge_batch([dets([(0, 0, 9, 9, 0.4, 0), (20, 20, 29, 29, 0.5, 1)])])
    assert two.hard == [0]


def test_a_blurred_box_is_uncertain_when_sharpness_is_asked_for() -> None:
    image = np.zeros((100, 200), np.uint8)
    rng = np.random.default_rng(0)
    image[:, :100] = rng.integers(0, 255, (100, 100))  # sharp texture on the left
    image[:, 100:] = cv2.GaussianBlur(rng.integers(0, 255, (100, 100)).astype(np.uint8), (31, 31), 10)
    judge = ObjectJudge(ObjectJudgeSettings(min_sharpness=100.0), LABELS)
    frame = judge.judge_frame(dets([(10, 10, 90, 90, 0.9, 0), (110, 10, 190, 90, 0.9, 0)]), image)
    assert frame.uncertain.tolist() == [False, True] and frame.reasons == (BLURRY_BOX,)


def test_crops_hold_the_uncertain_boxes_with_their_margin_clipped_to_the_image() -> None:
    image = np.full((100, 200, 3), 200, np.uint8)
    judge = ObjectJudge(ObjectJudgeSettings(floor=0.3, ceiling=0.6), LABELS)
    frame = judge.judge_frame(
        dets([(10, 10, 50, 30, 0.4, 0), (60, 60, 80, 80, 0.9, 1), (180, 80, 200, 100, 0.5, 2)]), image
    )
    crops = crops_of(image, frame, DetectEscalation(send="crops", crop_margin=0.5))
    assert [c.box for c in crops] == [[10, 10, 50, 30], [180, 80, 200, 100]]
    assert [c.region for c in crops] == [[0, 0, 70, 40], [170, 70, 200, 100]]
    decoded = cv2.imdecode(np.frombuffer(crops[0].payload, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (40, 70, 3)
