"""How the bridge answers a ``detect`` request: what it classifies, and how the cloud's answer
and the device's detections become the one list the device is sent back.

The answer is always the frame's whole list of detections as the cloud settles it, so the device
applies one rule whatever the policy: the cloud's list replaces its own. Boxes the device sent
come back unchanged (a relabelled crop keeps its box), and so do track ids; a box the cloud's
detector found inherits the track id of the device box it overlaps best (IoU >= 0.5), so the
device's tracks keep their answers.

- ``relabel``: each crop (or, without crops, each device detection cut from the frame) is
  classified; the classifier's label, class index and confidence replace the device's for that
  box. With the device's full list in the request, the relabelled boxes take their places in it
  and class-aware NMS runs again (two boxes the device held apart by class may now agree).
- ``replace``: the cloud detector's boxes are the answer.
- ``union``: the cloud detector's boxes and the device's, class-aware NMS over both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgewire.detection import Detections, iou, nms
from edgewire.envelopes import Crop, Detection, Prediction, Request
from edgewire.errors import DecodeError
from edgewire.preprocess import ImageRejected, decode

__all__ = ["NMS_IOU", "TRACK_IOU", "pieces_to_classify", "relabel", "replace", "union"]

#: Overlap above which two boxes of one class are the same object (the device's NMS default).
NMS_IOU = 0.45
#: Overlap above which a cloud box is taken for a device box and inherits its track id.
TRACK_IOU = 0.5


class Unanswerable(DecodeError):
    """A detect request that cannot be answered as its route asks: nothing to classify, no frame
    to detect on, or images that do not decode. Answered ``rejected`` with this reason."""


def _cut(image: np.ndarray, box: Sequence[float], origin: Sequence[int]) -> np.ndarray:
    """The pixels of ``box`` (frame pixels) from ``image``, whose top-left is ``origin`` in the frame."""
    h, w = image.shape[:2]
    x1 = int(np.clip(np.floor(box[0] - origin[0]), 0, w - 1))
    y1 = int(np.clip(np.floor(box[1] - origin[1]), 0, h - 1))
    x2 = int(np.clip(np.ceil(box[2] - origin[0]), x1 + 1, w))
    y2 = int(np.clip(np.ceil(box[3] - origin[1]), y1 + 1, h))
    return image[y1:y2, x1:x2]


def pieces_to_classify(request: Request, gray: bool) -> tuple[list[np.ndarray], list[Detection]]:
    """The images a relabel classifies and the box each belongs to.

    Crops are cut to their box (the margin around it helps a human reviewing the crop, not a
    classifier trained on tight digits); without crops, each device detection is cut from the
    frame in the payload.
    """
    pieces: list[np.ndarray] = []
    boxes: list[Detection] = []
    if request.crops:
        for crop in request.crops:
            image = _decoded(crop.payload, gray)
            pieces.append(_cut(image, crop.box, crop.region[:2]))
            boxes.append(_crop_detection(request, crop))
    elif request.detections:
        frame = _decoded(request.payload, gray)
        for det in request.detections:
            pieces.append(_cut(frame, det.box, (0, 0)))
            boxes.append(det)
    else:
        raise Unanswerable("a relabel needs crops or detections in the request; it has neither")
    return pieces, boxes


def _decoded(payload: bytes, gray: bool) -> np.ndarray:
    try:
        image = decode(payload, gray)
    except ImageRejected as exc:
        raise Unanswerable(str(exc)) from None
    if image is None or image.size == 0:
        raise Unanswerable("a crop or frame in the request is not a decodable image")
    return image


def _crop_detection(request: Request, crop: Crop) -> Detection:
    """The device's detection a crop was cut for (same track, else same box), or a bare one."""
    for det in request.detections:
        if (crop.track_id is not None and det.track_id == crop.track_id) or det.box == crop.box:
            return det
    return Detection(box=list(crop.box), score=0.0, class_index=-1, label="", track_id=crop.track_id)


def relabel(request: Request, boxes: Sequence[Detection], answers: Sequence[Prediction]) -> list[Detection]:
    """The device's list with each classified box carrying the classifier's answer."""
    relabelled = [
        Detection(
            box=list(det.box),
            score=float(answer.confidence),
            class_index=answer.class_index,
            label=answer.label,
            track_id=det.track_id,
        )
        for det, answer in zip(boxes, answers, strict=True)
    ]
    if not request.detections:
        return relabelled
    by_id = {id(det): new for det, new in zip(boxes, relabelled, strict=True)}
    merged = [by_id.get(id(det), det) for det in request.detections]
    known = {id(det) for det in request.detections}
    merged += [new for det, new in zip(boxes, relabelled, strict=True) if id(det) not in known]
    return _suppressed(merged)


def replace(device: Sequence[Detection], cloud: Sequence[Detection]) -> list[Detection]:
    """The cloud's detections, carrying the track ids of the device boxes they cover."""
    return _with_tracks(list(cloud), device)


def union(device: Sequence[Detection], cloud: Sequence[Detection]) -> list[Detection]:
    """Both lists together, class-aware NMS over them, track ids kept or inherited."""
    return _with_tracks(_suppressed([*device, *cloud]), device)


def _columns(dets: Sequence[Detection]) -> Detections:
    if not dets:
        return Detections.empty()
    return Detections(
        np.array([d.box for d in dets], np.float32).reshape(-1, 4),
        np.array([d.score for d in dets], np.float32),
        np.array([d.class_index for d in dets], np.int64),
    )


def _suppressed(dets: list[Detection]) -> list[Detection]:
    cols = _columns(dets)
    keep = nms(cols.boxes, cols.scores, cols.classes, NMS_IOU, max(len(dets), 1))
    return [dets[int(k)] for k in keep]


def _with_tracks(dets: list[Detection], device: Sequence[Detection]) -> list[Detection]:
    kept = {d.track_id for d in dets if d.track_id is not None}  # a track keeps its own box
    tracked = [d for d in device if d.track_id is not None and d.track_id not in kept]
    if not dets or not tracked:
        return dets
    overlap = iou(_columns(dets).boxes, _columns(tracked).boxes)
    out = []
    for k, det in enumerate(dets):
        best = int(np.argmax(overlap[k]))
        if det.track_id is None and overlap[k, best] >= TRACK_IOU:
            det = det.model_copy(update={"track_id": tracked[best].track_id})
            overlap[:, best] = -1.0  # one box per track
        out.append(det)
    return out
