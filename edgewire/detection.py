"""Object detection outputs to boxes in source-image pixels: formats, letterbox, decode, NMS.

The device (after its engine), the bridge (after Triton) and the benches read detector outputs
the same way, so all of them use this module. It knows nothing about MQTT: a batch of raw
output tensors goes in, one :class:`Detections` per image comes out, and
:meth:`Detections.to_wire` makes the wire's ``edgewire.envelopes.Detection`` list only where a
message is built.

Output formats (:data:`FORMATS`), recognised from the output's shape by :func:`recognise_format`:

``yolov5``
    ``[B, N, 5+C]``: centre x, centre y, width, height, objectness, C class scores.
    A box's score is objectness times its best class score.
``yolov8``
    ``[B, 4+C, N]``: centre x, centre y, width, height, C class scores (YOLOv8 and YOLO11
    exports from Ultralytics). No objectness: the score is the best class score.
``end2end``
    ``[B, K, 6]``: x1, y1, x2, y2, score, class, with NMS inside the model (YOLOv10-style, or
    any export with NMS built in). Only the score threshold and the detection cap apply.
``probmap``
    ``[B, 1, H, W]``: a per-pixel probability map, as PaddleOCR's DB text detectors emit. Boxes
    are the bounding rectangles of the connected regions above :attr:`DecodeSettings.map_threshold`
    (OpenCV contours), scored by the mean probability inside the rectangle, then grown on each
    side by ``area * unclip_ratio / perimeter`` as DB's "unclip" does. Kept simple on purpose:
    axis-aligned rectangles, not DB's rotated polygons, which is what a box on the wire holds.

Geometry: every image is resized into the model's input by :func:`fit_geometry` (``letterbox``
as Ultralytics does it: scale to fit keeping the aspect ratio, pad the rest around the centre;
``stretch``; ``center_crop``) and :meth:`Geometry.to_source` undoes it exactly, clipping boxes
to the source image.

OpenCV is imported where it is used: model metadata (``edgewire.modelmeta``) reads this
module's format names and shape rules on hosts that only push models and have no OpenCV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from edgewire.envelopes import Detection

OutputFormat = Literal["yolov5", "yolov8", "end2end", "probmap"]
FORMATS: tuple[OutputFormat, ...] = ("yolov5", "yolov8", "end2end", "probmap")
#: The shape each format has, as an operator reads it in a refusal.
FORMAT_SHAPES: dict[str, str] = {
    "yolov5": "[B, N, 5+C] (xywh, objectness, class scores)",
    "yolov8": "[B, 4+C, N] (xywh, class scores)",
    "end2end": "[B, K, 6] (x1, y1, x2, y2, score, class; NMS inside the model)",
    "probmap": "[B, 1, H, W] (probability map, DB text detector)",
}
Resize = Literal["stretch", "center_crop", "letterbox"]
#: The grey Ultralytics pads with; a model trained on it sees the same border here.
LETTERBOX_PAD = 114
#: A dimension the graph leaves open (a name, -1 or None) is written as None.
Dim = int | None


# ---- geometry -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Where an image landed inside the model's input: ``model = source * scale + pad``.

    ``pad_x``/``pad_y`` are negative for a centre crop (the source starts left of the input).
    """

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    #: Source image size, for clipping boxes brought back.
    src_w: int
    src_h: int
    #: The resized image's size before padding (letterbox) or cropping (center_crop).
    new_w: int
    new_h: int

    def to_source(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes (N x 4, x1 y1 x2 y2) in model-input pixels to source pixels, clipped to the image."""
        out = np.empty_like(boxes, dtype=np.float32)
        out[:, 0::2] = (boxes[:, 0::2] - self.pad_x) / self.scale_x
        out[:, 1::2] = (boxes[:, 1::2] - self.pad_y) / self.scale_y
        np.clip(out[:, 0::2], 0, self.src_w, out=out[:, 0::2])
        np.clip(out[:, 1::2], 0, self.src_h, out=out[:, 1::2])
        return out

    def to_model(self, boxes: np.ndarray) -> np.ndarray:
        """Source pixels to model-input pixels (the forward map; tests and crops use it)."""
        out = np.empty_like(boxes, dtype=np.float32)
        out[:, 0::2] = boxes[:, 0::2] * self.scale_x + self.pad_x
        out[:, 1::2] = boxes[:, 1::2] * self.scale_y + self.pad_y
        return out


def fit_geometry(src_w: int, src_h: int, dst_w: int, dst_h: int, resize: Resize = "letterbox") -> Geometry:
    """How a ``src_w`` x ``src_h`` image is fitted into a ``dst_w`` x ``dst_h`` input.

    ``letterbox`` follows Ultralytics' ``LetterBox`` (scaleup, centred): new size
    ``round(w * r), round(h * r)`` with ``r = min(dst_h / h, dst_w / w)``, left/top padding
    ``round(d / 2 - 0.1)``, so a box from an Ultralytics-trained model lands where it did in
    training.
    """
    if resize == "stretch":
        return Geometry(dst_w / src_w, dst_h / src_h, 0.0, 0.0, src_w, src_h, dst_w, dst_h)
    if resize == "center_crop":
        r = max(dst_w / src_w, dst_h / src_h)
        new_w, new_h = max(1, round(src_w * r)), max(1, round(src_h * r))
        return Geometry(r, r, -((new_w - dst_w) // 2), -((new_h - dst_h) // 2), src_w, src_h, new_w, new_h)
    r = min(dst_h / src_h, dst_w / src_w)
    new_w, new_h = max(1, round(src_w * r)), max(1, round(src_h * r))
    left = round((dst_w - new_w) / 2 - 0.1)
    top = round((dst_h - new_h) / 2 - 0.1)
    # The scale actually applied per axis (rounding the new size makes it differ from r slightly).
    return Geometry(new_w / src_w, new_h / src_h, float(left), float(top), src_w, src_h, new_w, new_h)


def stride_aligned(src_w: int, src_h: int, size: int, stride: int = 32) -> tuple[int, int]:
    """The smallest stride-multiple input holding the image scaled to fit ``size`` (Ultralytics'
    ``auto`` letterbox), for models with open spatial dimensions, as (width, height)."""
    r = min(size / src_w, size / src_h)
    new_w, new_h = max(1, round(src_w * r)), max(1, round(src_h * r))
    return math.ceil(new_w / stride) * stride, math.ceil(new_h / stride) * stride


def letterbox(
    image: np.ndarray, dst_w: int, dst_h: int, resize: Resize = "letterbox", pad_value: int = LETTERBOX_PAD
) -> tuple[np.ndarray, Geometry]:
    """The image fitted into ``dst_w`` x ``dst_h`` as :func:`fit_geometry` says, and that geometry."""
    import cv2

    h, w = image.shape[:2]
    g = fit_geometry(w, h, dst_w, dst_h, resize)
    interp = cv2.INTER_AREA if g.new_w < w else cv2.INTER_LINEAR
    if resize == "stretch":
        return cv2.resize(image, (dst_w, dst_h), interpolation=interp), g
    resized = cv2.resize(image, (g.new_w, g.new_h), interpolation=interp) if (g.new_w, g.new_h) != (w, h) else image
    if resize == "center_crop":
        x0, y0 = int(-g.pad_x), int(-g.pad_y)
        return np.ascontiguousarray(resized[y0 : y0 + dst_h, x0 : x0 + dst_w]), g
    left, top = int(g.pad_x), int(g.pad_y)
    right, bottom = dst_w - g.new_w - left, dst_h - g.new_h - top
    canvas = cv2.copyMakeBorder(resized, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(pad_value,) * 3)
    return canvas, g


# ---- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detections:
    """One image's objects as columns: ``boxes`` N x 4 (x1, y1, x2, y2, float32, source pixels
    once :meth:`Geometry.to_source` ran), ``scores`` N (float32), ``classes`` N (int64), best first."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    @staticmethod
    def empty() -> Detections:
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, keep: np.ndarray) -> Detections:
        return Detections(self.boxes[keep], self.scores[keep], self.classes[keep])

    def to_wire(
        self, labels: tuple[str, ...] | list[str], track_ids: list[int | None] | None = None
    ) -> list[Detection]:
        """The wire's Detection list; a class index past ``labels`` is named ``class<k>``."""
        n = len(labels)
        ids = track_ids if track_ids is not None else [None] * len(self)
        return [
            Detection.model_construct(
                box=[float(v) for v in box],
                score=float(score),
                class_index=int(k),
                label=labels[k] if 0 <= k < n else f"class{k}",
                track_id=tid,
            )
            for box, score, k, tid in zip(
                self.boxes.tolist(), self.scores.tolist(), self.classes.tolist(), ids, strict=True
            )
        ]


@dataclass(frozen=True)
class DecodeSettings:
    """Thresholds of the decode (the device takes them from its judge config)."""

    score_threshold: float = 0.25
    iou_threshold: float = 0.45
    max_detections: int = 100
    #: Candidates kept per image before NMS (best scores first), as Ultralytics' ``max_nms``.
    #: OpenCV's greedy NMS grows with candidates times boxes kept (about 15 ms for 1000, 0.5 s for
    #: 8400 on one core), and a trained detector rarely has more above its threshold: 2000 holds
    #: some 100 objects' worth of overlapping candidates, which ``max_detections`` caps anyway.
    max_candidates: int = 2000
    #: probmap: a pixel belongs to an object above this probability (DB's ``thresh``).
    map_threshold: float = 0.3
    #: probmap: how far each box grows, DB's ``unclip_ratio``.
    unclip_ratio: float = 1.6
    #: probmap: regions smaller than this many map pixels on a side are dropped.
    min_side: int = 3


# ---- format recognition -------------------------------------------------------------------


def _anchor_counts(height: Dim, width: Dim) -> set[int]:
    """Box counts a YOLO head gives for an input size (strides 8/16/32, 1 or 3 anchors)."""
    if not height or not width:
        return set()
    cells = sum(math.ceil(height / s) * math.ceil(width / s) for s in (8, 16, 32))
    return {cells, 3 * cells}


def recognise_format(
    shape: tuple[Dim, ...] | list[Dim], input_hw: tuple[Dim, Dim] = (None, None)
) -> OutputFormat | None:
    """The detection format an output of ``shape`` has, or None when it fits none.

    ``[B, N, 6]`` is both an end-to-end output and a one-class YOLOv5 head: it is ``yolov5``
    only when N is the box count a YOLO head gives for ``input_hw``, else ``end2end``.
    ``[B, A, N]`` is ``yolov8`` when A < N (4+C channels, many boxes), ``yolov5`` otherwise.
    """
    shape = tuple(shape)
    if len(shape) == 4 and shape[1] == 1:
        return "probmap"
    if len(shape) != 3:
        return None
    _, a, b = shape
    if b == 6 and (a is None or a not in _anchor_counts(*input_hw)):
        return "end2end"
    if a is not None and b is not None:
        if 5 <= a < b:
            return "yolov8"
        if b >= 6 and a > b:
            return "yolov5"
        return None
    if a is not None and a >= 5:  # boxes open: channels first
        return "yolov8"
    if b is not None and b >= 6:
        return "yolov5"
    return None


def class_count(fmt: OutputFormat, shape: tuple[Dim, ...] | list[Dim]) -> int | None:
    """How many classes an output of this format and shape scores (None when open or not fixed)."""
    if fmt == "yolov5":
        return shape[2] - 5 if shape[2] is not None else None
    if fmt == "yolov8":
        return shape[1] - 4 if shape[1] is not None else None
    if fmt == "probmap":
        return 1
    return None


# ---- NMS ----------------------------------------------------------------------------------


def nms(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float, max_detections: int
) -> np.ndarray:
    """Indices of the boxes kept by class-aware greedy NMS, best score first.

    OpenCV's ``NMSBoxesBatched`` does the greedy pass in C++ (no Python loop per box); boxes of
    different classes never suppress each other.
    """
    import cv2

    if len(scores) == 0:
        return np.zeros(0, np.int64)
    xywh = boxes.astype(np.float32).copy()
    xywh[:, 2:] -= xywh[:, :2]
    # top_k stays 0 (all): OpenCV applies it to the candidates before suppressing, not after.
    keep = cv2.dnn.NMSBoxesBatched(xywh, scores.astype(np.float32), classes.astype(np.int32), 0.0, float(iou_threshold))
    keep = np.asarray(keep, dtype=np.int64).reshape(-1)
    # OpenCV returns them by descending score already; a stable sort makes ties deterministic.
    order = np.argsort(-scores[keep], kind="stable")
    return keep[order][:max_detections]


# ---- decoders -----------------------------------------------------------------------------


def _xywh_to_xyxy(xywh: np.ndarray) -> np.ndarray:
    out = np.empty_like(xywh, dtype=np.float32)
    half = xywh[:, 2:4] / 2
    out[:, :2] = xywh[:, :2] - half
    out[:, 2:] = xywh[:, :2] + half
    return out


def _scored(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, s: DecodeSettings, *, suppress: bool
) -> Detections:
    mask = scores >= s.score_threshold
    boxes, scores, classes = boxes[mask], scores[mask], classes[mask]
    if len(scores) > s.max_candidates:
        top = np.argpartition(-scores, s.max_candidates - 1)[: s.max_candidates]
        boxes, scores, classes = boxes[top], scores[top], classes[top]
    if suppress:
        keep = nms(boxes, scores, classes, s.iou_threshold, s.max_detections)
    else:
        keep = np.argsort(-scores, kind="stable")[: s.max_detections]
    return Detections(boxes[keep].astype(np.float32), scores[keep].astype(np.float32), classes[keep].astype(np.int64))


def _decode_yolo(rows: np.ndarray, objectness: bool, s: DecodeSettings) -> Detections:
    """``rows``: N x (4 [+1] + C), boxes as centre xywh in model-input pixels."""
    first = 5 if objectness else 4
    cls_scores = rows[:, first:]
    if cls_scores.shape[1] == 0:
        return Detections.empty()
    classes = cls_scores.argmax(axis=1)
    scores = cls_scores[np.arange(len(rows)), classes]
    if objectness:
        scores = scores * rows[:, 4]
    return _scored(_xywh_to_xyxy(rows[:, :4]), scores, classes, s, suppress=True)


def _decode_end2end(rows: np.ndarray, s: DecodeSettings) -> Detections:
    return _scored(rows[:, :4].astype(np.float32), rows[:, 4], rows[:, 5].astype(np.int64), s, suppress=False)


def _decode_probmap(prob: np.ndarray, input_hw: tuple[int, int], s: DecodeSettings) -> Detections:
    """One H x W map: contours of the thresholded map as boxes in model-input pixels."""
    import cv2

    mh, mw = prob.shape
    binary = (prob > s.map_threshold).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return Detections.empty()
    rects = np.array([cv2.boundingRect(c) for c in contours], dtype=np.float32).reshape(-1, 4)
    rects = rects[(rects[:, 2] >= s.min_side) & (rects[:, 3] >= s.min_side)]
    if len(rects) == 0:
        return Detections.empty()
    # Mean probability in each rectangle from the integral image (no per-box pass over pixels).
    integral = cv2.integral(prob.astype(np.float64))
    x0, y0 = rects[:, 0].astype(int), rects[:, 1].astype(int)
    x1, y1 = x0 + rects[:, 2].astype(int), y0 + rects[:, 3].astype(int)
    sums = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    scores = (sums / (rects[:, 2] * rects[:, 3])).astype(np.float32)
    w, h = rects[:, 2], rects[:, 3]
    grow = w * h * s.unclip_ratio / (2 * (w + h))
    boxes = np.stack([rects[:, 0] - grow, rects[:, 1] - grow, rects[:, 0] + w + grow, rects[:, 1] + h + grow], axis=1)
    np.clip(boxes[:, 0::2], 0, mw, out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0, mh, out=boxes[:, 1::2])
    ih, iw = input_hw
    boxes[:, 0::2] *= iw / mw
    boxes[:, 1::2] *= ih / mh
    return _scored(boxes.astype(np.float32), scores, np.zeros(len(scores), np.int64), s, suppress=False)


def decode_batch(
    output: np.ndarray,
    fmt: OutputFormat,
    geometries: list[Geometry],
    settings: DecodeSettings | None = None,
    input_hw: tuple[int, int] | None = None,
) -> list[Detections]:
    """A batch's raw output to one :class:`Detections` per image, boxes in source pixels.

    ``geometries[i]`` is how image ``i`` was fitted into the input; ``input_hw`` (the input's
    height and width) is needed by ``probmap`` only, whose map may be smaller than the input.
    """
    s = settings or DecodeSettings()
    if len(output) != len(geometries):
        raise ValueError(f"output holds {len(output)} images but {len(geometries)} geometries were given")
    found: list[Detections] = []
    for image_out, geometry in zip(output, geometries, strict=True):
        if fmt == "yolov5":
            d = _decode_yolo(image_out, True, s)
        elif fmt == "yolov8":
            d = _decode_yolo(image_out.T, False, s)
        elif fmt == "end2end":
            d = _decode_end2end(image_out, s)
        elif fmt == "probmap":
            hw = input_hw if input_hw is not None else image_out.shape[-2:]
            d = _decode_probmap(image_out[0], (int(hw[0]), int(hw[1])), s)
        else:
            raise ValueError(f"unknown detection format '{fmt}' (known: {', '.join(FORMATS)})")
        found.append(Detections(geometry.to_source(d.boxes), d.scores, d.classes) if len(d) else d)
    return found


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes ``a`` (N x 4) and ``b`` (M x 4), x1 y1 x2 y2: an N x M matrix."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)
