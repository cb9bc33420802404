"""Track ids for a camera's detections across frames: a plain IoU tracker.

ByteTrack (the ``supervision`` package) would be the maintained choice, but it depends on
``opencv-python``, which cannot be installed beside the ``opencv-python-headless`` the device
uses (both own the ``cv2`` module). A fixed camera at frame rate moves an object a few pixels a
frame, so overlap with where it was is enough to follow it: each frame's boxes are matched to
the live tracks greedily by IoU, highest overlap first, one match per track and per box. Matching
ignores the class on purpose: an uncertain object's class is exactly what flickers between
frames, and its track must not break when it does. A track not matched for ``max_missed``
frames ends; a box matched to nothing starts a new track.

Greedy matching is vectorised per step (one argmax over the IoU matrix per accepted pair, so at
most min(tracks, boxes) steps); it gives the Hungarian answer whenever overlaps are unambiguous,
which is the case for objects that do not cross, and needs no scipy on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgewire.detection import iou

__all__ = ["IouTracker", "TrackUpdate"]


@dataclass(frozen=True)
class TrackUpdate:
    """One frame's outcome: a track id per box (in the boxes' order) and the tracks that ended."""

    ids: np.ndarray  # (N,) int64
    ended: tuple[int, ...] = ()


@dataclass
class IouTracker:
    """Greedy IoU matching of each frame's boxes to the tracks of the frames before."""

    iou_threshold: float = 0.3
    max_missed: int = 5
    _next_id: int = 1
    _ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    _boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    _missed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], not {self.iou_threshold}")
        if self.max_missed < 0:
            raise ValueError(f"max_missed must be >= 0, not {self.max_missed}")

    @property
    def live(self) -> int:
        """Tracks currently followed (seen within the last ``max_missed`` frames)."""
        return len(self._ids)

    def update(self, boxes: np.ndarray) -> TrackUpdate:
        """Assign a track id to each of this frame's boxes (x1, y1, x2, y2, source pixels)."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        ids = np.zeros(len(boxes), np.int64)
        matched_track = np.zeros(len(self._ids), bool)
        matched_box = np.zeros(len(boxes), bool)
        if len(boxes) and len(self._ids):
            overlap = iou(self._boxes, boxes)
            overlap[overlap < self.iou_threshold] = -1.0
            for _ in range(min(overlap.shape)):
                t, b = np.unravel_index(int(np.argmax(overlap)), overlap.shape)
                if overlap[t, b] < 0:
                    break
                ids[b] = self._ids[t]
                matched_track[t] = matched_box[b] = True
                overlap[t, :] = -1.0
                overlap[:, b] = -1.0
        fresh = np.flatnonzero(~matched_box)
        ids[fresh] = np.arange(self._next_id, self._next_id + len(fresh))
        self._next_id += len(fresh)

        # Matched tracks move to their new box; unmatched ones age and end past max_missed.
        missed = self._missed + 1
        missed[matched_track] = 0
        track_boxes = self._boxes.copy()
        if matched_track.any():
            order = {int(tid): k for k, tid in enumerate(ids)}
            rows = np.flatnonzero(matched_track)
            track_boxes[rows] = boxes[[order[int(tid)] for tid in self._ids[rows]]]
        alive = missed <= self.max_missed
        ended = tuple(int(t) for t in self._ids[~alive])
        self._ids = np.concatenate([self._ids[alive], ids[fresh]])
        self._boxes = np.concatenate([track_boxes[alive], boxes[fresh]])
        self._missed = np.concatenate([missed[alive], np.zeros(len(fresh), np.int64)])
        return TrackUpdate(ids, ended)
