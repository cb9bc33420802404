"""Detect requests end to end through a real broker, the bridge and a real Triton serving a crop
classifier and a detector: relabel, replace and union, routed by rules on task and class."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")
pytest.importorskip("sklearn")

import onnxruntime as ort

from edgewire import envelopes as env
from edgewire.cloud_bridge.model_repository import write_python_repository
from edgewire.cloud_bridge.rules import RuleSet
from edgewire.cloud_bridge.triton_server import EmbeddedTriton
from edgewire.demo.models import DemoArtifacts
from edgewire.demo.scenes import scenes
from edgewire.detection import DecodeSettings, decode_batch, iou
from edgewire.modelmeta import GraphInfo, read_model
from edgewire.preprocess import Preprocessor

from .conftest import BrokerHandle, Mosquitto
from .test_bridge_e2e import ResultReader, RunningBridge, request

MARGIN = 6


@pytest.fixture
def mqtt(mosquitto: Mosquitto) -> Iterator[BrokerHandle]:
    yield BrokerHandle("mosquitto", "127.0.0.1", mosquitto.port)


def _rules() -> RuleSet:
    return RuleSet.model_validate(
        {
            "rules": [
                {
                    "name": "ask-detector",
                    "when": {"task": "detect", "model_hint": "replace"},
                    "route_to": "digits-detect",
                },
                {
                    "name": "merge-detector",
                    "when": {"task": "detect", "classes": ["union-me"]},
                    "route_to": "digits-detect",
                    "merge": "union",
                },
                {"name": "crops", "when": {"task": "detect"}, "route_to": "digits-cloud", "merge": "relabel"},
            ],
            "default": {"route_to": "digits-cloud"},
        }
    )


def _jpeg(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def _device_view(frame: np.ndarray, boxes: np.ndarray, labels: list[str]) -> tuple[list[env.Detection], list[env.Crop]]:
    """What a device sends: its detections (wrong labels here, tracks 100+) and a crop of each."""
    h, w = frame.shape[:2]
    dets, crops = [], []
    for k, (box, label) in enumerate(zip(boxes.tolist(), labels, strict=True)):
        det = env.Detection(
            box=box, score=0.3, class_index=int(label) if label.isdigit() else 99, label=label, track_id=100 + k
        )
        x1, y1 = max(0, int(box[0]) - MARGIN), max(0, int(box[1]) - MARGIN)
        x2, y2 = min(w, int(box[2]) + MARGIN), min(h, int(box[3]) + MARGIN)
        crops.append(env.Crop(box=box, region=[x1, y1, x2, y2], payload=_jpeg(frame[y1:y2, x1:x2]), track_id=100 + k))
        dets.append(det)
    return dets, crops


def _classify_locally(model: Path, crop: env.Crop) -> tuple[str, float]:
    """The reference: the same classifier run here on the crop cut to its box."""
    meta = read_model(model, GraphInfo.from_file(model)).require()
    region = cv2.imdecode(np.frombuffer(crop.payload, np.uint8), cv2.IMREAD_GRAYSCALE)
    x1, y1 = int(np.floor(crop.box[0] - crop.region[0])), int(np.floor(crop.box[1] - crop.region[1]))
    x2, y2 = int(np.ceil(crop.box[2] - crop.region[0])), int(np.ceil(crop.box[3] - crop.region[1]))
    tensor = Preprocessor(meta.input).batch([region[y1:y2, x1:x2]])
    probs = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {meta.input.name: tensor})[
        0
    ][0]
    return meta.labels[int(np.argmax(probs))], float(np.max(probs))


def _detect_locally(model: Path, frame: np.ndarray) -> list[env.Detection]:
    meta = read_model(model, GraphInfo.from_file(model)).require()
    assert meta.detect is not None
    pre = Preprocessor(meta.input)
    out = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(
        None, {meta.input.name: pre.batch([frame])}
    )[0]
    found = decode_batch(out, meta.detect.format, [pre.geometry(frame)], DecodeSettings())[0]
    return found.to_wire(meta.labels)


async def test_relabel_replace_and_union_on_a_real_triton(
    mqtt: BrokerHandle, demo: DemoArtifacts, demo_detector: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    assert write_python_repository(repo, [demo.cloud_model, demo_detector]) == ["digits-cloud", "digits-detect"]
    scene = scenes(1, seed=31)[0]
    frame_jpeg = _jpeg(scene.image)
    frame = cv2.imdecode(np.frombuffer(frame_jpeg, np.uint8), cv2.IMREAD_COLOR)
    wrong = [str((int(c) + 1) % 10) for c in scene.classes]
    dets, crops = _device_view(scene.image, scene.boxes, wrong)
    union_dets = [d.model_copy(update={"label": "union-me", "class_index": 99}) for d in dets]

    async with (
        EmbeddedTriton(repo, workdir=tmp_path) as triton,
        RunningBridge(mqtt, triton, _rules()) as bridge,
        ResultReader(mqtt, "cam-det") as dev,
    ):
        common = {"task": "detect", "deadline": time.time() + 30}
        await dev.send(request("cam-det", "relabel-1", b"", detections=dets, crops=crops, model_hint="cam", **common))
        await dev.send(request("cam-det", "replace-1", frame_jpeg, detections=dets, model_hint="replace", **common))
        await dev.send(request("cam-det", "union-1", frame_jpeg, detections=union_dets, model_hint="cam", **common))
        await dev.send(request("cam-det", "classify-1", _jpeg(scene.image[:64, :64]), model_hint="cam"))
        results = {r.trace_id: r for r in await dev.wait(4, timeout=60)}
    assert {t: r.status for t, r in results.items()} == dict.fromkeys(results, "ok") and len(results) == 4

    # relabel: the classifier's label and confidence for each crop; boxes and track ids echoed.
    relabelled = results["relabel-1"]
    assert relabelled.model == "digits-cloud" and relabelled.prediction is None
    assert relabelled.detections is not None and len(relabelled.detections) == len(crops)
    by_track = {d.track_id: d for d in relabelled.detections}
    assert set(by_track) == {c.track_id for c in crops}
    for crop in crops:
        got = by_track[crop.track_id]
        label, confidence = _classify_locally(demo.cloud_model, crop)
        assert got.box == crop.box
        assert (got.label, got.class_index) == (label, int(label))
        assert got.score == pytest.approx(confidence, abs=1e-5)
    right = sum(by_track[100 + k].label == str(c) for k, c in enumerate(scene.classes))
    assert right >= len(crops) - 1  # the cloud classifier fixes the device's wrong labels
    assert bridge.meter.total("triton_calls_total") >= 1

    # replace: the detector's boxes on the whole frame, tracks inherited from overlapping device boxes.
    cloud = _detect_locally(demo_detector, frame)
    assert cloud, "the detector found nothing to compare"
    replaced = results["replace-1"].detections
    assert replaced is not None and results["replace-1"].model == "digits-detect"
    assert [(d.label, d.class_index) for d in replaced] == [(d.label, d.class_index) for d in cloud]
    np.testing.assert_allclose([d.box for d in replaced], [d.box for d in cloud], atol=1e-3)
    overlap = iou(np.array([d.box for d in replaced], np.float32), scene.boxes)
    for k, d in enumerate(replaced):
        if d.track_id is not None:
            assert overlap[k, d.track_id - 100] >= 0.5

    # union: every answer box is the device's or the detector's; device boxes survive unless a
    # same-class box with a higher score overlaps them (here labels differ: all survive).
    merged = results["union-1"].detections
    assert merged is not None
    sources = [d.box for d in union_dets] + [d.box for d in cloud]
    assert all(any(np.allclose(d.box, s, atol=1e-3) for s in sources) for d in merged)
    assert sum(d.label == "union-me" for d in merged) == len(union_dets)
    assert len(merged) == len(union_dets) + len(cloud)  # no class in common, nothing suppressed
    assert {d.track_id for d in merged if d.label == "union-me"} == {d.track_id for d in union_dets}

    # A classify request on the same bridge still gets a prediction.
    assert results["classify-1"].prediction is not None and results["classify-1"].detections is None
