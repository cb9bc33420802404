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

from dataclasses import dataclass, field

import numpy as np

from edgewire.detection import iou

__all__ = ["CloudLabel", "OncePerTrack"]


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
