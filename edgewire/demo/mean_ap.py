"""Mean average precision at IoU 0.5, the score the detect demo and its bench report.

VOC 2010+/COCO-style all-point interpolation: per class, detections of every image are ranked
by score; each is a true positive when it overlaps a not-yet-claimed ground-truth box of its
class by IoU >= 0.5 (the best such box is claimed), else a false positive. The precision curve
is made monotone (each point takes the best precision at any higher recall) and AP is the area
under it, summed exactly at each recall step. The mean is over classes that have ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgewire.detection import iou

__all__ = ["ImageEval", "average_precision", "mean_ap50"]


@dataclass(frozen=True)
class ImageEval:
    """One image's detections and ground truth (boxes x1,y1,x2,y2 in one coordinate frame)."""

    boxes: np.ndarray  # (D, 4)
    scores: np.ndarray  # (D,)
    classes: np.ndarray  # (D,)
    gt_boxes: np.ndarray  # (G, 4)
    gt_classes: np.ndarray  # (G,)


def average_precision(tp: np.ndarray, n_gt: int) -> float:
    """AP from true-positive flags already in descending score order, over ``n_gt`` objects."""
    if n_gt == 0:
        raise ValueError("average precision needs at least one ground-truth object")
    tp = np.asarray(tp, dtype=np.float64)
    if tp.size == 0:
        return 0.0
    ctp = np.cumsum(tp)
    recall = ctp / n_gt
    precision = ctp / np.arange(1, len(tp) + 1)
    mrec = np.concatenate([[0.0], recall])
    mpre = np.concatenate([[0.0], precision])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def mean_ap50(images: Sequence[ImageEval], iou_threshold: float = 0.5) -> float:
    """mAP@0.5 over ``images``; classes without ground truth are left out of the mean."""
    classes = sorted({int(c) for im in images for c in np.asarray(im.gt_classes).ravel()})
    if not classes:
        raise ValueError("no ground truth in any image")
    aps = []
    for cls in classes:
        scores: list[float] = []
        flags: list[bool] = []
        n_gt = 0
        for im in images:
            gt = np.asarray(im.gt_boxes, dtype=np.float64).reshape(-1, 4)[np.asarray(im.gt_classes) == cls]
            n_gt += len(gt)
            mine = np.asarray(im.classes) == cls
            boxes = np.asarray(im.boxes, dtype=np.float64).reshape(-1, 4)[mine]
            conf = np.asarray(im.scores, dtype=np.float64)[mine]
            order = np.argsort(-conf, kind="stable")
            boxes, conf = boxes[order], conf[order]
            ious = iou(boxes, gt) if len(boxes) and len(gt) else np.zeros((len(boxes), len(gt)))
            claimed = np.zeros(len(gt), dtype=bool)
            for k in range(len(boxes)):
                hit = False
                if len(gt):
                    candidates = np.where(claimed, -1.0, ious[k])
                    best = int(np.argmax(candidates))
                    if candidates[best] >= iou_threshold:
                        claimed[best] = True
                        hit = True
                scores.append(float(conf[k]))
                flags.append(hit)
        order = np.argsort(-np.asarray(scores), kind="stable")
        aps.append(average_precision(np.asarray(flags)[order], n_gt))
    return float(np.mean(aps))
