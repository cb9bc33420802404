"""Escalate an uncertain object once per track, and keep the cloud's answer on the track.

Without this a camera sends the same uncertain object up on every frame it stays in view: at
30 frames a second that is thirty identical questions, each costing uplink bytes and a Triton
call. With a track id per box (``edge/tracker.py``) the device asks once; it asks again only when
the object changed enough that the old answer may no longer hold: its box changed shape or size
so that, centred on each other, it overlaps the box that was asked about by less than
``min_box_iou`` (an object drifting across the view keeps its answer; one that turned or came
closer is asked about again), or its score moved by more than ``score_delta``. While the
question is open, and after it is answered, the track's later frames are not escalated; they
are counted as saved. The cloud's answer (label, class, score) sticks to the track and is
applied to its boxes in the frames that follow, until the track ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from edgewire import envelopes as env
from edgewire.config import TrackSettings
from edgewire.detection import iou

from .object_judge import FrameObjects
from .tracker import IouTracker

__all__ = ["CloudLabel", "ObjectTracks", "OncePerTrack", "TrackedFrame"]


@dataclass(frozen=True)
class CloudLabel:
    """The cloud's answer for one object, as it sticks to the object's track."""

    label: str
    class_index: int
    score: float


@dataclass
class _Asked:
    box: np.ndarray
    score: float
    answer: CloudLabel | None = None


def _centred_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boxes moved onto a common centre: how much their shape and size agree."""
    wa, ha = a[0, 2] - a[0, 0], a[0, 3] - a[0, 1]
    wb, hb = b[0, 2] - b[0, 0], b[0, 3] - b[0, 1]
    half = np.array([[-wa, -ha, wa, ha]], np.float32) / 2, np.array([[-wb, -hb, wb, hb]], np.float32) / 2
    return float(iou(*half)[0, 0])


@dataclass
class OncePerTrack:
    """Which uncertain boxes go to the cloud, and what the cloud said about each track."""

    min_box_iou: float = 0.5
    score_delta: float = 0.2
    #: Uncertain boxes sent up / kept back because their track had been asked about already.
    escalated: int = 0
    saved: int = 0
    _asked: dict[int, _Asked] = field(default_factory=dict)

    def should_escalate(self, track_id: int, box: np.ndarray | list[float], score: float) -> bool:
        """Whether this uncertain box goes up; a True is recorded as the track's open question."""
        box = np.asarray(box, dtype=np.float32).reshape(1, 4)
        asked = self._asked.get(track_id)
        if asked is not None:
            overlap = _centred_iou(asked.box, box)
            if overlap >= self.min_box_iou and abs(score - asked.score) <= self.score_delta:
                self.saved += 1
                return False
        self._asked[track_id] = _Asked(box, float(score), asked.answer if asked is not None else None)
        self.escalated += 1
        return True

    def answered(self, track_id: int, answer: CloudLabel) -> None:
        """The cloud's answer for a track's box; kept while the track lives."""
        asked = self._asked.get(track_id)
        if asked is not None:
            asked.answer = answer

    def sticky(self, track_id: int | None) -> CloudLabel | None:
        """The cloud's latest answer for this track, if it has one."""
        if track_id is None:
            return None
        asked = self._asked.get(track_id)
        return asked.answer if asked is not None else None

    def forget(self, track_ids: tuple[int, ...] | list[int]) -> None:
        """Tracks that ended: their questions and answers are dropped."""
        for track_id in track_ids:
            self._asked.pop(track_id, None)


@dataclass(frozen=True)
class TrackedFrame:
    """One frame after tracking: its detections (track ids set, the cloud's sticky answers
    applied to boxes not asked about again), whether it goes up, and the crops that do."""

    detections: list[env.Detection]
    escalate: bool
    crops: list[env.Crop] | None


class ObjectTracks:
    """The device's side of once-per-track escalation: a tracker and the per-track questions,
    fed in frame order (the event loop's order of finished batches)."""

    def __init__(self, settings: TrackSettings) -> None:
        self.tracker = IouTracker(settings.iou_threshold, settings.max_missed)
        self.once = OncePerTrack(settings.min_box_iou, settings.score_delta)

    def observe(
        self, frame: FrameObjects, detections: Sequence[env.Detection], crops: list[env.Crop] | None
    ) -> TrackedFrame:
        """Track this frame's boxes; the frame goes up only for uncertain boxes whose track has
        not been asked about (or changed since), and only their crops go with it."""
        update = self.tracker.update(frame.detections.boxes)
        self.once.forget(update.ended)
        out: list[env.Detection] = []
        asked: list[list[float]] = []
        for j, det in enumerate(detections):
            track_id = int(update.ids[j])
            changes: dict[str, object] = {"track_id": track_id}
            if bool(frame.uncertain[j]) and self.once.should_escalate(track_id, det.box, det.score):
                asked.append(det.box)
            elif (answer := self.once.sticky(track_id)) is not None:
                changes.update(label=answer.label, class_index=answer.class_index, score=answer.score)
            out.append(det.model_copy(update=changes))
        sent = None
        if crops is not None:
            ids = {tuple(d.box): d.track_id for d in out}
            wanted = {tuple(b) for b in asked}
            sent = [c.model_copy(update={"track_id": ids.get(tuple(c.box))}) for c in crops if tuple(c.box) in wanted]
        # A frame sent as crops goes up only with a crop to carry (a box too thin to cut has none).
        escalate = frame.hard and bool(asked) and (sent is None or bool(sent))
        return TrackedFrame(out, escalate, sent)

    def answered(self, results: Sequence[env.LocalResult]) -> None:
        """Keep the cloud's answers for their tracks (final results of escalated frames)."""
        for result in results:
            if result.answered_by != "cloud" or not result.detections:
                continue
            for det in result.detections:
                if det.track_id is not None:
                    self.once.answered(det.track_id, CloudLabel(det.label, det.class_index, det.score))
