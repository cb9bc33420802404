"""The detect demo's parts: scenes, the scikit-learn detector's ONNX export, mAP@0.5."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("skl2onnx")
pytest.importorskip("onnxruntime")

import onnxruntime as ort

from edgewire.demo import detector
from edgewire.demo.mean_ap import ImageEval, average_precision, mean_ap50
from edgewire.demo.scenes import FRAME_H, FRAME_W, scene_sequence, scenes


def test_scenes_are_deterministic_and_boxes_hold_their_digits() -> None:
    a, b = scenes(3, seed=5), scenes(3, seed=5)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.boxes, y.boxes)
    for scene in a:
        assert scene.image.shape == (FRAME_H, FRAME_W, 3)
        assert 2 <= len(scene.boxes) <= 5
        assert (scene.boxes[:, :2] >= 0).all() and (scene.boxes[:, 2] <= FRAME_W).all()
        assert (scene.boxes[:, 3] <= FRAME_H).all()
        sides = scene.boxes[:, 2:] - scene.boxes[:, :2]
        assert ((sides >= 20) & (sides <= 60)).all()
        for x1, y1, x2, y2 in scene.boxes.astype(int):  # ink inside every box
            assert scene.image[y1:y2, x1:x2].max() > 150


def test_sequence_objects_drift_a_few_pixels_per_frame() -> None:
    seq = scene_sequence(seed=3, frames=6, drift_px=3.0)
    assert len(seq) == 6
    for before, after in itertools.pairwise(seq):
        assert np.array_equal(before.object_ids, after.object_ids)
        assert np.abs(after.boxes - before.boxes).max() <= 4.0  # 3 px plus rounding


def test_onnx_export_computes_what_the_sklearn_models_do() -> None:
    clf, reg = detector.train(scene_count=40)
    data = detector.to_onnx(clf, reg)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    tensor = detector.letterbox_input([s.image for s in scenes(3, seed=21)])
    (out,) = session.run(None, {detector.INPUT_NAME: tensor})
    assert out.shape == (3, 4 + detector.NUM_CLASSES, 400)
    np.testing.assert_allclose(out, detector.sklearn_outputs(clf, reg, tensor), rtol=1e-4, atol=1e-4)

    meta = session.get_modelmeta().custom_metadata_map
    assert "edgewire" not in meta  # reached by the exporter-metadata path, as a YOLO export is
    assert ast.literal_eval(meta["names"]) == {i: str(i) for i in range(10)}
    assert ast.literal_eval(meta["imgsz"]) == [320, 320]
    assert meta["task"] == "detect" and meta["stride"] == "16"


def test_letterbox_input_matches_the_core_letterbox() -> None:
    from edgewire.detection import letterbox

    image = scenes(1, seed=2)[0].image
    boxed, geometry = letterbox(image, 320, 320)
    expected = boxed[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    np.testing.assert_allclose(detector.letterbox_input([image]), expected, atol=1e-6)
    assert (geometry.pad_x, geometry.pad_y) == (0.0, 40.0)


def test_average_precision_of_a_hand_computed_ranking() -> None:
    # TP, FP, TP, FP over 3 objects: precision 1, 1/2, 2/3, 1/2 at recall 1/3, 1/3, 2/3, 2/3;
    # the monotone envelope gives 1 up to recall 1/3 and 2/3 up to 2/3: AP = 1/3 + 2/9 = 5/9.
    assert average_precision(np.array([1, 0, 1, 0]), 3) == pytest.approx(5 / 9)
    assert average_precision(np.array([0, 0]), 2) == 0.0


def test_mean_ap50_of_a_hand_computed_case() -> None:
    a = ImageEval(
        boxes=np.array([[0, 0, 10, 10], [1, 0, 11, 10], [44, 40, 54, 50], [70, 70, 80, 80]], float),
        scores=np.array([0.9, 0.6, 0.95, 0.5]),
        classes=np.array([0, 0, 1, 2]),
        gt_boxes=np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], float),
        gt_classes=np.array([0, 0, 1]),
    )
    b = ImageEval(
        boxes=np.array([[50, 50, 60, 60], [0, 0, 10, 10]], float),
        scores=np.array([0.8, 0.7]),
        classes=np.array([0, 0]),
        gt_boxes=np.array([[0, 0, 10, 10]], float),
        gt_classes=np.array([0]),
    )
    # Class 0: ranked 0.9 TP, 0.8 FP, 0.7 TP, 0.6 FP (a duplicate of a claimed box) over 3
    # objects -> 5/9. Class 1: its only box overlaps by IoU 60/140 < 0.5 -> 0. Class 2 has no
    # ground truth and is left out of the mean.
    assert mean_ap50([a, b]) == pytest.approx((5 / 9 + 0.0) / 2)
    perfect = ImageEval(a.gt_boxes, np.ones(3), a.gt_classes, a.gt_boxes, a.gt_classes)
    assert mean_ap50([perfect]) == pytest.approx(1.0)


def test_crop_classifier_onnx_computes_what_the_sklearn_model_does() -> None:
    from edgewire.demo import crop_classifier
    from edgewire.modelmeta import GraphInfo, read_model

    clf = crop_classifier.train(count=40)
    data = crop_classifier.to_onnx(clf)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    scene = scenes(1, seed=8)[0]
    features = crop_classifier.crop_features(scene.image, scene.boxes)
    (probs,) = session.run(None, {"image": features.reshape(-1, 1, 16, 16)})
    np.testing.assert_allclose(probs, clf.predict_proba(features), rtol=1e-4, atol=1e-5)
    meta = read_model("crops.onnx", GraphInfo.from_session(session)).require()
    assert meta.labels[-1] == "background" and meta.task == "classify"


def test_models_are_rebuilt_only_when_what_shapes_them_changes(tmp_path: Path) -> None:
    from edgewire.demo.build_cache import cached_build

    source = tmp_path / "recipe.py"
    source.write_text("v1")
    builds: list[int] = []

    def build() -> bytes:
        builds.append(1)
        return b"model-%d" % len(builds)

    first = cached_build(tmp_path / "m.onnx", [source], build)
    again = cached_build(tmp_path / "m.onnx", [source], build)
    assert (first.cached, again.cached, len(builds)) == (False, True, 1)
    source.write_text("v2")
    changed = cached_build(tmp_path / "m.onnx", [source], build)
    assert not changed.cached and changed.path.read_bytes() == b"model-2"
