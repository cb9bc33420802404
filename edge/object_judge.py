"""Which detected objects are uncertain, which frames go to the cloud for them, and the crops.

The detector's counterpart of :mod:`.judge`: policies apply per box and all of them at once
(score in the uncertain band, a class listed for escalation or unknown to the model, a box too
small, a crop too blurred), each reason kept, because operators tune by reading why. A frame is
hard when it holds ``min_uncertain`` uncertain boxes.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edgewire import envelopes as env
from edgewire.config import DetectEscalation, ObjectJudgeSettings
from edgewire.detection import Detections
from edgewire.preprocess import sharpness

UNCERTAIN_SCORE = "uncertain_score"
ESCALATED_CLASS = "escalated_class"
UNKNOWN_CLASS = "unknown_class"
SMALL_BOX = "small_box"
BLURRY_BOX = "blurry_box"


@dataclass(frozen=True)
class FrameObjects:
    """One frame's objects and their verdicts."""

    detections: Detections
    #: Per box: True when uncertain.
    uncertain: np.ndarray
    #: Every reason any box of the frame gave, in policy order.
    reasons: tuple[str, ...]
    hard: bool


@dataclass(frozen=True)
class ObjectVerdicts:
    """A batch's frames, judged; ``hard`` lists the indices of the frames to escalate."""

    frames: list[FrameObjects]
    labels: tuple[str, ...]
    hard: list[int]

    def __len__(self) -> int:
        return len(self.frames)

    def wire(self, i: int) -> list[env.Detection]:
        return self.frames[i].detections.to_wire(self.labels)


class ObjectJudge:
    def __init__(self, settings: ObjectJudgeSettings, labels: tuple[str, ...]) -> None:
        self.settings = settings
        self.labels = labels
        n = len(labels)
        # Per class index: its band and whether it is always escalated (one lookup per box).
        self._floor = np.full(n, settings.floor, np.float32)
        self._ceiling = np.full(n, settings.ceiling, np.float32)
        for label, rule in settings.classes.items():
            if label in labels:
                k = labels.index(label)
                self._floor[k], self._ceiling[k] = rule.floor, rule.ceiling
        listed = set(settings.escalate_labels)
        self._listed = np.array([label in listed for label in labels], dtype=bool)

    def judge_frame(self, found: Detections, image: np.ndarray | None) -> FrameObjects:
        s = self.settings
        k = found.classes
        known = (k >= 0) & (k < len(self.labels))
        kk = np.where(known, k, 0)
        band = known & (found.scores >= self._floor[kk]) & (found.scores < self._ceiling[kk])
        listed = known & self._listed[kk]
        unknown = ~known
        sides = np.minimum(found.boxes[:, 2] - found.boxes[:, 0], found.boxes[:, 3] - found.boxes[:, 1])
        small = sides < s.min_box_px if s.min_box_px > 0 else np.zeros(len(found), bool)
        blurry = np.zeros(len(found), bool)
        if s.min_sharpness is not None and image is not None and len(found):
            for j, box in enumerate(found.boxes.astype(int).tolist()):  # only frames that ask for it
                patch = image[box[1] : box[3], box[0] : box[2]]
                blurry[j] = patch.size > 0 and sharpness(patch) < s.min_sharpness
        policies = ((UNCERTAIN_SCORE, band), (ESCALATED_CLASS, listed), (UNKNOWN_CLASS, unknown))
        policies += ((SMALL_BOX, small), (BLURRY_BOX, blurry))
        uncertain = band | listed | unknown | small | blurry
        reasons = tuple(name for name, hit in policies if hit.any())
        return FrameObjects(found, uncertain, reasons, int(uncertain.sum()) >= s.min_uncertain)

    def judge_batch(self, found: list[Detections], images: list[np.ndarray] | None = None) -> ObjectVerdicts:
        frames = [self.judge_frame(d, images[i] if images is not None else None) for i, d in enumerate(found)]
        return ObjectVerdicts(frames, self.labels, [i for i, f in enumerate(frames) if f.hard])


def crops_of(image: np.ndarray, objects: FrameObjects, settings: DetectEscalation) -> list[env.Crop]:
    """JPEG crops of a frame's uncertain boxes, each grown by the margin and clipped to the
    image, with the box and the region sent (so the cloud maps its answer back)."""
    h, w = image.shape[:2]
    crops: list[env.Crop] = []
    boxes = objects.detections.boxes[objects.uncertain]
    m = settings.crop_margin
    for x1, y1, x2, y2 in boxes.tolist():
        mx, my = (x2 - x1) * m, (y2 - y1) * m
        region = [
            max(0, int(np.floor(x1 - mx))),
            max(0, int(np.floor(y1 - my))),
            min(w, int(np.ceil(x2 + mx))),
            min(h, int(np.ceil(y2 + my))),
        ]
        if region[2] <= region[0] or region[3] <= region[1]:
            continue
        ok, jpeg = cv2.imencode(
            ".jpg",
            image[region[1] : region[3], region[0] : region[2]],
            [cv2.IMWRITE_JPEG_QUALITY, settings.crop_quality],
        )
        if ok:
            crops.append(env.Crop(box=[x1, y1, x2, y2], region=region, payload=jpeg.tobytes()))
    return crops
