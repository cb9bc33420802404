"""Models as they arrive: a YOLO export with Ultralytics' metadata runs with no annotate step, a
model with nothing to infer from is refused naming exactly what is missing, a detector declared
as a classifier is refused at load, and a real foreign model (PaddleOCR's text detector) goes
through inspect, annotate and a device run with its boxes on the text."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from edgewire import envelopes as env
from edgewire import topics
from edgewire.cli.app import app
from edgewire.config import (
    BrokerSettings,
    CloudSettings,
    DetectEscalation,
    DetectSettings,
    DeviceConfig,
    ModelSettings,
    ObjectJudgeSettings,
    SourceSettings,
)
from edgewire.detection import fit_geometry, iou
from edgewire.edge.agent import EdgeAgent
from edgewire.edge.engines.onnx import OnnxEngine
from edgewire.errors import ModelError
from edgewire.modelmeta import META_KEY, DetectSpec, GraphInfo, InputSpec, ModelMeta, read_model

from .conftest import BrokerHandle
from .test_edge_integration import Reader

onnx = pytest.importorskip("onnx")
helper, TP = onnx.helper, onnx.TensorProto
runner = CliRunner()

SIZE = 64
#: The tiny detector's boxes (centre x, centre y, w, h in input pixels), their class scores.
BOXES = [(20, 20, 16, 12), (44, 40, 20, 20), (22, 21, 16, 12)]  # the third overlaps the first
SCORES = [(0.9, 0.05), (0.1, 0.5), (0.8, 0.02)]  # sure cat, uncertain dog, duplicate cat
ULTRALYTICS = {
    "description": "Ultralytics YOLOv8n model trained on pets.yaml",
    "author": "Ultralytics",
    "version": "8.3.40",
    "task": "detect",
    "stride": "32",
    "batch": "1",
    "imgsz": f"[{SIZE}, {SIZE}]",
    "names": "{0: 'cat', 1: 'dog'}",
}


def yolo_model(path: Path, metadata: dict[str, str] | None = ULTRALYTICS, *, n: int = 20) -> Path:
    """An Ultralytics-shaped export: images [batch, 3, 64, 64] -> output0 [batch, 6, n] (YOLOv8
    layout, 2 classes), a fixed head plus 0 x the input's mean so the graph reads its input."""
    head = np.zeros((1, 6, n), np.float32)
    for k, ((cx, cy, w, h), scores) in enumerate(zip(BOXES, SCORES, strict=True)):
        head[0, :, k] = [cx, cy, w, h, *scores]
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["m"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Squeeze", ["m", "axis3"], ["m3"]),
        helper.make_node("Mul", ["m3", "zero"], ["z"]),
        helper.make_node("Add", ["z", "head"], ["output0"]),
    ]
    inits = [
        helper.make_tensor("axis3", TP.INT64, [1], [3]),
        helper.make_tensor("zero", TP.FLOAT, [], [0.0]),
        helper.make_tensor("head", TP.FLOAT, head.shape, head.ravel().tolist()),
    ]
    graph = helper.make_graph(
        nodes,
        "yolo",
        [helper.make_tensor_value_info("images", TP.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("output0", TP.FLOAT, ["batch", 6, n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    if metadata:
        helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def bare_classifier(path: Path) -> Path:
    """Nothing to infer from: an RGB-or-BGR input of open size, five scores, no metadata."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["y"]),
    ]
    w = helper.make_tensor("w", TP.FLOAT, [3, 5], [0.1] * 15)
    graph = helper.make_graph(
        nodes,
        "bare",
        [helper.make_tensor_value_info("x", TP.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TP.FLOAT, ["n", 5])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.save(model, str(path))
    return path


def frames(folder: Path, count: int, size: tuple[int, int] = (128, 96)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        image = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"f{i:03d}.jpg"), image)
    return folder


def inspect_json(path: Path) -> tuple[int, dict]:
    result = runner.invoke(app, ["model", "inspect", str(path), "--json"])
    return result.exit_code, json.loads(result.stdout)


# ---- a YOLO export as it is -----------------------------------------------------------------


def test_inspect_reads_a_yolo_export_from_its_own_metadata(tmp_path: Path) -> None:
    path = yolo_model(tmp_path / "yolov8n.onnx")
    code, report = inspect_json(path)
    assert code == 0
    assert report["usable"] and report["metadata_source"] == "exporter"
    assert (report["task"], report["format"], report["labels"]) == ("detect", "yolov8", ["cat", "dog"])
    assert report["inputs"] == [{"name": "images", "shape": [None, 3, SIZE, SIZE]}]
    assert report["outputs"] == [{"name": "output0", "shape": [None, 6, 20]}]
    assert report["missing"] == [] and report["problems"] == []
    assert report["inferred"]["labels"] == "exporter metadata 'names' (2)"
    assert report["exporter_metadata"]["names"] == ULTRALYTICS["names"]
    meta = ModelMeta.model_validate(report["meta"])
    assert meta.input.color == "rgb" and meta.input.resize == "letterbox" and meta.input.pad_value == 114
    assert meta.detect == DetectSpec(format="yolov8", stride=32)
    text = runner.invoke(app, ["model", "inspect", str(path)]).stdout
    assert "task: detect, format yolov8, 2 label(s)" in text and "a device loads it as it is" in text


def test_annotate_needs_no_flags_for_a_yolo_export(tmp_path: Path) -> None:
    src = yolo_model(tmp_path / "yolov8n.onnx")
    out = tmp_path / "annotated.onnx"
    result = runner.invoke(app, ["model", "annotate", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "task detect, format yolov8, 2 label(s)" in result.stdout
    engine = OnnxEngine(out)
    assert engine.reading.source == "edgewire"
    assert engine.meta == read_model(src, GraphInfo.from_file(src)).meta
    kept = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert kept["names"] == ULTRALYTICS["names"] and META_KEY in kept


def detect_config(model: Path, folder: Path, url: str, **kw: object) -> DeviceConfig:
    return DeviceConfig(
        device_id="cam-det",
        broker=BrokerSettings(url=url, reconnect_min_s=0.05, reconnect_max_s=0.5, startup_wait_s=5),
        source=SourceSettings(kind="folder", path=folder, max_frames=6),
        model=ModelSettings(path=model),
        **kw,  # type: ignore[arg-type]
    )


async def test_a_yolo_export_runs_on_a_device_with_no_annotate_step(
    broker: BrokerHandle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = yolo_model(tmp_path / "yolov8n.onnx")
    folder = frames(tmp_path / "frames", 6)
    cfg = detect_config(model, folder, broker.url)
    caplog.set_level(logging.INFO, logger="edgewire.edge.engines.onnx")
    async with Reader(broker, "local/+") as reader:
        summary = await EdgeAgent(cfg).run()
        results = await reader.wait_results(6)
    assert "no edgewire entry; inferred from the exporter's metadata and the graph" in caplog.text
    assert summary.completed == 6 and summary.failed == 0
    assert [r.seq for r in results] == list(range(6))
    g = fit_geometry(128, 96, SIZE, SIZE)
    xyxy = np.array([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2] for cx, cy, w, h in BOXES[:2]], np.float32)
    expected = g.to_source(xyxy)
    for r in results:
        assert r.prediction is None and r.detections is not None
        # The duplicate cat went to NMS; the cat (0.9) first, then the dog (0.5).
        assert [(d.label, d.class_index) for d in r.detections] == [("cat", 0), ("dog", 1)]
        assert [d.score for d in r.detections] == pytest.approx([0.9, 0.5])
        np.testing.assert_allclose([d.box for d in r.detections], expected, atol=1e-3)
        # The dog's 0.5 lies in the uncertain band [0.25, 0.6): the frame is hard, answered here.
        assert r.reasons == ["uncertain_score"] and r.degraded and r.state == "COMPLETE"


async def test_uncertain_objects_go_up_as_crops_with_their_boxes(broker: BrokerHandle, tmp_path: Path) -> None:
    model = yolo_model(tmp_path / "yolov8n.onnx")
    folder = frames(tmp_path / "frames", 2, size=(640, 480))
    detect = DetectSettings(
        judge=ObjectJudgeSettings(escalate_labels=["cat"]), escalate=DetectEscalation(send="crops", crop_margin=0.2)
    )
    cfg = detect_config(model, folder, broker.url, detect=detect, cloud=CloudSettings(deadline_ms=300))
    cfg.source.max_frames = 2
    async with Reader(broker, "local/+", "req/+/+") as reader:
        await EdgeAgent(cfg).run()
        requests = await reader.wait_for(topics.REQUEST, 2)
    assert len(requests) == 2
    for request in requests:
        assert isinstance(request, env.Request)
        assert request.task == "detect" and request.payload == b"" and request.local is None
        assert [d.label for d in request.detections] == ["cat", "dog"]
        # Both objects are uncertain (cat listed, dog in the band): two crops, each its box plus 20 %.
        assert len(request.crops) == 2
        for crop, det in zip(request.crops, request.detections, strict=True):
            assert crop.box == pytest.approx(det.box)
            x1, y1, x2, y2 = det.box
            mx, my = (x2 - x1) * 0.2, (y2 - y1) * 0.2
            assert crop.region == [
                int(np.floor(x1 - mx)),
                int(np.floor(y1 - my)),
                int(np.ceil(x2 + mx)),
                int(np.ceil(y2 + my)),
            ]
            image = cv2.imdecode(np.frombuffer(crop.payload, np.uint8), cv2.IMREAD_COLOR)
            assert image.shape[:2] == (crop.region[3] - crop.region[1], crop.region[2] - crop.region[0])
        assert set(request.reasons) == {"uncertain_score", "escalated_class"}


# ---- refusals -------------------------------------------------------------------------------


def test_a_model_with_nothing_to_infer_from_is_refused_by_inspect_and_the_device(tmp_path: Path) -> None:
    path = bare_classifier(tmp_path / "bare.onnx")
    out = tmp_path / "bare.edgewire.onnx"
    fix = f"edgewire model annotate {path} --out {out} --input-size HxW --color rgb|bgr --labels LABELS.txt"
    code, report = inspect_json(path)
    assert code == 1
    assert report["missing"] == ["input size", "color", "labels"]
    assert report["task"] is None and not report["usable"]
    assert report["inferred"]["task"] == "output shape [?, 5]"
    assert report["fill_command"] == fix
    cfg = DeviceConfig(
        device_id="cam-bare", source=SourceSettings(kind="folder", path=tmp_path), model=ModelSettings(path=path)
    )
    with pytest.raises(ModelError) as info:
        EdgeAgent(cfg)
    assert str(info.value) == f"{path}: nothing in the model says its input size, color, labels; fix: {fix}"
    # The command it names fills them.
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\nd\ne\n")
    args = ["model", "annotate", str(path), "--out", str(out), "--input-size", "32x48", "--color", "bgr"]
    result = runner.invoke(app, [*args, "--labels", str(labels)])
    assert result.exit_code == 0, result.output
    meta = OnnxEngine(out).meta
    assert (meta.task, meta.labels, meta.input.shape, meta.input.color) == (
        "classify",
        tuple("abcde"),
        (-1, 3, 32, 48),
        "bgr",
    )


def test_a_detector_declared_as_a_classifier_is_refused_at_load(tmp_path: Path) -> None:
    meta = ModelMeta(
        name="pets",
        version="1",
        labels=("cat", "dog"),
        input=InputSpec(name="images", shape=(-1, 3, SIZE, SIZE), color="rgb"),
        output="output0",
    )
    path = yolo_model(tmp_path / "declared.onnx", {META_KEY: meta.model_dump_json()})
    expected = (
        f"{path}: output 'output0' has shape [?, 6, 20] (it reads as a detect model, format yolov8), but a classify "
        f"model needs [B, 2] (one score per label); fix: edgewire model annotate {path} --out "
        f"{tmp_path / 'declared.edgewire.onnx'} --task detect"
    )
    with pytest.raises(ModelError) as info:
        OnnxEngine(path)
    assert str(info.value) == expected
    code, report = inspect_json(path)
    assert code == 1 and report["problems"] == [expected.split(": ", 1)[1].split("; fix")[0]]
    fixed = tmp_path / "fixed.onnx"
    assert runner.invoke(app, ["model", "annotate", str(path), "--out", str(fixed), "--task", "detect"]).exit_code == 0
    assert OnnxEngine(fixed).meta.detect == DetectSpec(format="yolov8")


def test_labels_that_do_not_match_the_class_count_are_refused(tmp_path: Path) -> None:
    path = yolo_model(tmp_path / "yolo.onnx", {**ULTRALYTICS, "names": "{0: 'cat', 1: 'dog', 2: 'fox'}"})
    with pytest.raises(ModelError) as info:
        OnnxEngine(path)
    message = str(info.value)
    assert "output 'output0' has shape [?, 6, 20]: 2 classes, but 3 labels are declared" in message
    assert message.endswith(f"--out {tmp_path / 'yolo.edgewire.onnx'} --labels LABELS.txt")


# ---- a real foreign model: PaddleOCR's PP-OCRv4 text detector ---------------------------------

WORDS = [("EDGEWIRE", (30, 80)), ("detects text", (60, 200)), ("42 boxes", (250, 280))]


def text_images(folder: Path, count: int) -> dict[str, np.ndarray]:
    """White 480x320 canvases with words at known places, shifted per image; their rectangles."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(count):
        image = np.full((320, 480, 3), 255, np.uint8)
        rects = []
        for word, (x, y) in WORDS:
            x, y = x + 6 * i, y - 4 * i
            cv2.putText(image, word, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 1.2, (0, 0, 0), 2)
            (tw, th), base = cv2.getTextSize(word, cv2.FONT_HERSHEY_SIMPLEX, 1.2, 2)
            rects.append([x, y - th, x + tw, y + base])
        cv2.imwrite(str(folder / f"text{i}.png"), image)
        truth[f"text{i}.png"] = np.array(rects, np.float32)
    return truth


async def test_paddle_text_detector_goes_through_inspect_annotate_and_a_device(
    paddle_text_detector: Path, broker: BrokerHandle, tmp_path: Path
) -> None:
    path = paddle_text_detector
    code, report = inspect_json(path)
    assert code == 1 and report["metadata_source"] == "graph"
    assert report["outputs"][0]["shape"] == [None, 1, None, None]
    assert report["inferred"]["output format"] == "output shape [?, 1, ?, ?]"
    assert report["missing"] == ["input size", "color"]
    annotated = tmp_path / "text-det.onnx"
    flags = ["--input-size", "320x480", "--color", "bgr", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"]
    result = runner.invoke(
        app, ["model", "annotate", str(path), "--out", str(annotated), *flags, "--name", "ppocr-det"]
    )
    assert result.exit_code == 0, result.output
    assert "task detect, format probmap, 1 label(s)" in result.stdout
    code, report = inspect_json(annotated)
    assert code == 0 and report["metadata_source"] == "edgewire" and report["labels"] == ["text"]

    folder = tmp_path / "texts"
    truth = text_images(folder, 3)
    detect = DetectSettings(score_threshold=0.5, judge=ObjectJudgeSettings(floor=0.5, ceiling=0.6))
    cfg = detect_config(annotated, folder, broker.url, detect=detect)
    cfg.source.max_frames = 3
    async with Reader(broker, "local/+") as reader:
        summary = await EdgeAgent(cfg).run()
        results = await reader.wait_results(3)
    assert summary.completed == 3 and len(results) == 3
    for r in results:
        assert r.detections is not None and r.model == "ppocr-det"
        rects = truth[Path(r.source_ref).name]
        boxes = np.array([d.box for d in r.detections], np.float32)
        assert len(boxes) == len(rects)
        # Every word is found by one box that lies on it.
        assert (iou(rects, boxes).max(axis=1) > 0.6).all()
        assert {d.label for d in r.detections} == {"text"}
