"""Track ids across frames, and escalating an uncertain object once per track."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from edgewire.demo.scenes import scene_sequence
from edgewire.edge.track_escalation import CloudLabel, OncePerTrack
from edgewire.edge.tracker import IouTracker


def _jittered(boxes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boxes as a detector reports them: a pixel or two off the truth, in a shuffled order."""
    noisy = boxes + rng.uniform(-2, 2, size=boxes.shape).astype(np.float32)
    return noisy[rng.permutation(len(noisy))]


def test_track_ids_are_stable_across_a_drifting_sequence() -> None:
    tracker = IouTracker()
    rng = np.random.default_rng(0)
    seq = scene_sequence(seed=12, frames=20, drift_px=3.0)
    id_of_object: dict[int, int] = {}
    for scene in seq:
        order = rng.permutation(len(scene.boxes))
        boxes = scene.boxes[order] + rng.uniform(-2, 2, size=scene.boxes.shape).astype(np.float32)
        update = tracker.update(boxes)
        assert len(set(update.ids.tolist())) == len(boxes)  # one track per object
        for obj, tid in zip(scene.object_ids[order], update.ids, strict=True):
            assert id_of_object.setdefault(int(obj), int(tid)) == int(tid)
    assert len(id_of_object) == len(seq[0].boxes)
    assert tracker.live == len(seq[0].boxes)


def test_a_track_ends_after_max_missed_frames_and_a_newcomer_gets_a_new_id() -> None:
    tracker = IouTracker(max_missed=2)
    a = np.array([[10, 10, 40, 40]], np.float32)
    b = np.array([[200, 100, 240, 140]], np.float32)
    first = tracker.update(a).ids[0]
    assert tracker.update(np.zeros((0, 4))).ended == ()
    assert tracker.update(np.zeros((0, 4))).ended == ()
    gone = tracker.update(b)
    assert gone.ended == (int(first),)
    assert gone.ids[0] != first
    assert tracker.update(a).ids[0] not in (first, gone.ids[0])  # the old track does not come back


def test_tracking_escalates_each_uncertain_object_once_across_a_sequence() -> None:
    tracker, once = IouTracker(), OncePerTrack()
    rng = np.random.default_rng(1)
    seq = scene_sequence(seed=4, frames=30, drift_px=2.0)
    objects = len(seq[0].boxes)
    sent_per_track: dict[int, int] = {}
    for scene in seq:
        boxes = _jittered(scene.boxes, rng)
        update = tracker.update(boxes)
        for tid, box in zip(update.ids, boxes, strict=True):
            # Every box is uncertain here, with a score wobbling a little frame to frame.
            if once.should_escalate(int(tid), box, 0.5 + float(rng.uniform(-0.05, 0.05))):
                sent_per_track[int(tid)] = sent_per_track.get(int(tid), 0) + 1
        once.forget(update.ended)
    assert sent_per_track and all(n == 1 for n in sent_per_track.values())
    assert once.escalated == objects
    assert once.saved == objects * (len(seq) - 1)


def test_a_track_is_asked_again_when_its_box_or_score_changes_beyond_the_threshold() -> None:
    once = OncePerTrack(min_box_iou=0.5, score_delta=0.2)
    box = np.array([100, 100, 140, 140], np.float32)
    assert once.should_escalate(7, box, 0.5)
    assert not once.should_escalate(7, box + 2, 0.55)  # small wobble: saved
    assert not once.should_escalate(7, box + 90, 0.5)  # drifted far, same shape: still saved
    assert once.should_escalate(7, box, 0.8)  # score moved by 0.3
    assert once.should_escalate(7, box + np.array([0, 0, 60, 60], np.float32), 0.8)  # grew: IoU 0.16
    assert not once.should_escalate(7, box + np.array([0, 0, 62, 58], np.float32), 0.75)
    assert (once.escalated, once.saved) == (3, 3)


def test_the_cloud_answer_sticks_to_the_track_until_it_ends() -> None:
    tracker, once = IouTracker(max_missed=0), OncePerTrack()
    box = np.array([[50, 50, 90, 90]], np.float32)
    tid = int(tracker.update(box).ids[0])
    assert once.should_escalate(tid, box[0], 0.4)
    assert once.sticky(tid) is None  # asked, not yet answered
    once.answered(tid, CloudLabel("7", 7, 0.97))
    for step in range(1, 4):
        moved = box + step
        assert int(tracker.update(moved).ids[0]) == tid
        assert not once.should_escalate(tid, moved[0], 0.45)
        assert once.sticky(tid) == CloudLabel("7", 7, 0.97)
    ended = tracker.update(np.zeros((0, 4))).ended
    once.forget(ended)
    assert ended == (tid,) and once.sticky(tid) is None
