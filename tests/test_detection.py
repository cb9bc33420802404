"""Detector outputs to boxes: every format against a reference written plainly here (NMS
included), the letterbox and its inverse, format recognition from shapes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgewire.detection import (
    DecodeSettings,
    Detections,
    Geometry,
    decode_batch,
    fit_geometry,
    iou,
    letterbox,
    nms,
    recognise_format,
    stride_aligned,
)

SETTINGS = DecodeSettings(score_threshold=0.3, iou_threshold=0.5, max_detections=20)


# ---- the reference: one box at a time, the way a textbook writes it ---------------------------


def plain_iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def plain_nms(
    cands: list[tuple[list[float], float, int]], iou_thr: float, cap: int
) -> list[tuple[list[float], float, int]]:
    kept: list[tuple[list[float], float, int]] = []
    for box, score, cls in sorted(cands, key=lambda c: -c[1]):
        if all(k[2] != cls or plain_iou(k[0], box) <= iou_thr for k in kept):
            kept.append((box, score, cls))
        if len(kept) == cap:
            break
    return kept


def to_source(box: list[float], g: Geometry) -> list[float]:
    x1 = min(max((box[0] - g.pad_x) / g.scale_x, 0), g.src_w)
    y1 = min(max((box[1] - g.pad_y) / g.scale_y, 0), g.src_h)
    x2 = min(max((box[2] - g.pad_x) / g.scale_x, 0), g.src_w)
    y2 = min(max((box[3] - g.pad_y) / g.scale_y, 0), g.src_h)
    return [x1, y1, x2, y2]


def reference(rows: np.ndarray, fmt: str, g: Geometry, s: DecodeSettings) -> list[tuple[list[float], float, int]]:
    cands = []
    for row in rows.tolist():
        if fmt == "end2end":
            box, score, cls = row[:4], row[4], int(row[5])
        else:
            cx, cy, w, h = row[:4]
            classes = row[5:] if fmt == "yolov5" else row[4:]
            cls = max(range(len(classes)), key=lambda k: classes[k])
            score = classes[cls] * (row[4] if fmt == "yolov5" else 1.0)
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        if score >= s.score_threshold:
            cands.append((box, score, cls))
    if fmt == "end2end":
        kept = sorted(cands, key=lambda c: -c[1])[: s.max_detections]
    else:
        kept = plain_nms(cands, s.iou_threshold, s.max_detections)
    return [(to_source(b, g), sc, c) for b, sc, c in kept]


def random_heads(rng: np.random.Generator, n: int, classes: int, size: int = 320) -> np.ndarray:
    """N rows of centre xywh (clustered, so NMS has work) and per-class scores."""
    centres = rng.uniform(40, size - 40, (6, 2))
    pick = centres[rng.integers(0, 6, n)] + rng.normal(0, 6, (n, 2))
    wh = rng.uniform(20, 60, (n, 2))
    scores = rng.uniform(0, 1, (n, classes)) ** 2
    return np.concatenate([pick, wh, scores], axis=1).astype(np.float32)


def assert_same(found: Detections, ref: list[tuple[list[float], float, int]]) -> None:
    assert len(found) == len(ref)
    for (box, score, cls), got_box, got_score, got_cls in zip(
        ref, found.boxes, found.scores, found.classes, strict=True
    ):
        assert got_cls == cls
        assert got_score == pytest.approx(score, rel=1e-5)
        np.testing.assert_allclose(got_box, box, atol=1e-3)


# ---- each format ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_yolov8_output_decodes_like_the_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    heads = [random_heads(rng, 300, 3) for _ in range(2)]
    output = np.stack([h.T for h in heads])  # [B, 4+C, N]
    geometries = [fit_geometry(640, 480, 320, 320), fit_geometry(200, 400, 320, 320)]
    found = decode_batch(output, "yolov8", geometries, SETTINGS)
    for image, head, g in zip(found, heads, geometries, strict=True):
        assert len(image) > 3  # the reference keeps several boxes, NMS removed many
        assert_same(image, reference(head, "yolov8", g, SETTINGS))


@pytest.mark.parametrize("seed", [3, 4])
def test_yolov5_output_decodes_like_the_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    heads = []
    for _ in range(2):
        h = random_heads(rng, 300, 4)
        heads.append(np.concatenate([h[:, :4], rng.uniform(0.3, 1, (300, 1)).astype(np.float32), h[:, 4:]], axis=1))
    output = np.stack(heads)  # [B, N, 5+C]
    geometries = [fit_geometry(320, 320, 320, 320), fit_geometry(1280, 720, 320, 320)]
    found = decode_batch(output, "yolov5", geometries, SETTINGS)
    for image, head, g in zip(found, heads, geometries, strict=True):
        assert len(image) > 3
        assert_same(image, reference(head, "yolov5", g, SETTINGS))


def test_end2end_output_keeps_its_own_boxes_above_the_threshold() -> None:
    rng = np.random.default_rng(5)
    xy = rng.uniform(0, 280, (50, 2))
    rows = np.concatenate(
        [xy, xy + rng.uniform(10, 40, (50, 2)), rng.uniform(0, 1, (50, 1)), rng.integers(0, 5, (50, 1))], axis=1
    ).astype(np.float32)
    g = fit_geometry(640, 360, 320, 320)
    settings = DecodeSettings(score_threshold=0.3, max_detections=10)
    [found] = decode_batch(rows[None], "end2end", [g], settings)
    assert len(found) == 10
    assert_same(found, reference(rows, "end2end", g, settings))


def test_probability_map_decodes_like_the_reference() -> None:
    """Regions above the map threshold become their bounding boxes, grown by DB's unclip
    distance, scored by their mean probability; found here with connected components."""
    prob = np.zeros((2, 1, 64, 96), np.float32)
    rects = [(5, 10, 30, 8), (50, 30, 20, 12), (10, 40, 6, 6)]
    for x, y, w, h in rects:
        prob[0, 0, y : y + h, x : x + w] = 0.9
    prob[0, 0, 12, 8] = 0.5  # a dip inside a region: still one region, lower mean
    prob[1, 0, 20:30, 40:70] = 0.8
    s = DecodeSettings(score_threshold=0.5, map_threshold=0.3, unclip_ratio=1.5, min_side=3)
    geometries = [fit_geometry(384, 256, 192, 128, "stretch")] * 2  # map at half the input size
    found = decode_batch(prob, "probmap", geometries, s, input_hw=(128, 192))
    for image, g, layer in zip(found, geometries, prob[:, 0], strict=True):
        n, _, stats, _ = cv2.connectedComponentsWithStats((layer > 0.3).astype(np.uint8), connectivity=8)
        ref = []
        for x, y, w, h, _ in stats[1:].tolist():
            score = float(layer[y : y + h, x : x + w].mean())
            d = w * h * 1.5 / (2 * (w + h))
            box = [max(x - d, 0) * 2, max(y - d, 0) * 2, min(x + w + d, 96) * 2, min(y + h + d, 64) * 2]
            if score >= 0.5:
                ref.append((to_source(box, g), score, 0))
        ref.sort(key=lambda r: -r[1])
        assert len(ref) == n - 1 > 0
        assert_same(image, ref)


def test_nothing_above_the_threshold_gives_an_empty_image_not_an_error() -> None:
    output = np.zeros((3, 7, 100), np.float32)
    found = decode_batch(output, "yolov8", [fit_geometry(10, 10, 32, 32)] * 3)
    assert [len(d) for d in found] == [0, 0, 0]
    assert found[0].to_wire(("a", "b", "c")) == []


def test_nms_never_suppresses_across_classes() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 11, 11]], np.float32)
    keep = nms(boxes, np.array([0.9, 0.8, 0.7], np.float32), np.array([0, 1, 0]), 0.5, 10)
    assert keep.tolist() == [0, 1]


def test_wire_detections_carry_labels_and_name_unknown_classes() -> None:
    d = Detections(
        np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32), np.array([0.9, 0.5], np.float32), np.array([1, 7])
    )
    wire = d.to_wire(("cat", "dog"))
    assert [(w.label, w.class_index, w.box) for w in wire] == [("dog", 1, [1, 2, 3, 4]), ("class7", 7, [5, 6, 7, 8])]


# ---- geometry ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("src", "dst"), [((640, 480), (320, 320)), ((333, 777), (640, 640)), ((50, 30), (256, 192))])
@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
def test_letterbox_round_trip_is_exact_to_a_pixel(src: tuple[int, int], dst: tuple[int, int], resize: str) -> None:
    """A white box drawn in the source is found in the letterboxed image and mapped back onto
    itself within a pixel."""
    w, h = src
    image = np.zeros((h, w, 3), np.uint8)
    box = [w // 5, h // 4, w // 5 + w // 3, h // 4 + h // 2]
    image[box[1] : box[3], box[0] : box[2]] = 255
    fitted, g = letterbox(image, dst[0], dst[1], resize, pad_value=0)  # type: ignore[arg-type]
    assert fitted.shape == (dst[1], dst[0], 3)
    ys, xs = np.nonzero(fitted[..., 0] > 127)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    back = g.to_source(found)[0]
    assert np.abs(back - np.array(box)).max() <= 1.0
    np.testing.assert_allclose(g.to_source(g.to_model(np.array([box], np.float32)))[0], box, atol=1e-3)


def test_letterbox_pads_like_ultralytics() -> None:
    # 640x480 into 640x640: 640x480 content, 80 rows of grey above and below.
    fitted, g = letterbox(np.zeros((480, 640, 3), np.uint8), 640, 640)
    assert (g.pad_x, g.pad_y, g.new_w, g.new_h) == (0, 80, 640, 480)
    assert (fitted[:80] == 114).all() and (fitted[80:560] == 0).all() and (fitted[560:] == 114).all()
    # An odd padding puts the extra pixel at the bottom/right, as round(d / 2 - 0.1) does.
    g = fit_geometry(100, 51, 64, 64)
    assert (g.new_w, g.new_h, g.pad_y) == (64, 33, 15)


def test_boxes_brought_back_are_clipped_to_the_image() -> None:
    g = fit_geometry(640, 480, 320, 320)
    back = g.to_source(np.array([[-10, 0, 400, 330]], np.float32))[0]
    assert back.tolist() == [0, 0, 640, 480]


def test_stride_aligned_input_is_the_smallest_stride_multiple() -> None:
    assert stride_aligned(640, 480, 640) == (640, 480)
    assert stride_aligned(1280, 500, 640, 32) == (640, 256)


# ---- recognising a format ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "hw", "fmt"),
    [
        ((1, 84, 8400), (640, 640), "yolov8"),
        ((None, 6, 8400), (640, 640), "yolov8"),  # one class
        ((1, 25200, 85), (640, 640), "yolov5"),
        ((1, 25200, 6), (640, 640), "yolov5"),  # one class: the anchor count says so
        ((1, 300, 6), (640, 640), "end2end"),
        ((None, 1, None, None), (None, None), "probmap"),
        ((1, 1000), (224, 224), None),
        ((1, 3, 4), (640, 640), None),
    ],
)
def test_formats_are_recognised_from_shapes(shape: tuple, hw: tuple, fmt: str | None) -> None:
    assert recognise_format(shape, hw) == fmt


def test_pairwise_iou_matches_the_plain_one() -> None:
    rng = np.random.default_rng(9)
    a = np.sort(rng.uniform(0, 50, (5, 2, 2)), axis=1).reshape(5, 4)[:, [0, 2, 1, 3]]
    b = np.sort(rng.uniform(0, 50, (4, 2, 2)), axis=1).reshape(4, 4)[:, [0, 2, 1, 3]]
    m = iou(a, b)
    for i in range(5):
        for j in range(4):
            assert m[i, j] == pytest.approx(plain_iou(a[i].tolist(), b[j].tolist()))
