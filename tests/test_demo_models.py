"""The demo models and frames: loadable, labelled, accurate, and reproducible byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
cv2 = pytest.importorskip("cv2")

from edgewire.demo.models import DemoArtifacts, build_demo, label_of  # noqa: E402
from edgewire.modelmeta import META_KEY, ModelMeta  # noqa: E402

HELD_OUT = 540  # 30% of the 1797 load_digits samples


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoArtifacts:
    return build_demo(tmp_path_factory.mktemp("demo"))


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _meta(path: Path) -> ModelMeta:
    props = _session(path).get_modelmeta().custom_metadata_map
    return ModelMeta.model_validate_json(props[META_KEY])


def _preprocess(frame: Path, meta: ModelMeta) -> np.ndarray:
    """What a device does to a frame, written out here independently of the module under test."""
    spec = meta.input
    image = cv2.imdecode(np.fromfile(str(frame), dtype=np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, frame
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    h, w = gray.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = gray[top : top + side, left : left + side]
    small = cv2.resize(crop, (spec.width, spec.height), interpolation=cv2.INTER_AREA)
    x = small.astype(np.float32) * np.float32(spec.scale)
    x = (x - np.float32(spec.mean[0])) / np.float32(spec.std[0])
    return x[None, :, :]  # CHW, one channel


def test_models_load_with_metadata(demo: DemoArtifacts) -> None:
    for path, name in ((demo.edge_model, "digits-edge"), (demo.cloud_model, "digits-cloud")):
        assert path.name == f"{name}.onnx"
        session = _session(path)
        meta = _meta(path)
        assert meta.name == name
        assert meta.version == "1.0.0"
        assert meta.labels == tuple(str(i) for i in range(10))
        assert meta.input.name == "image" and meta.input.shape == (-1, 1, 8, 8)
        assert meta.input.resize == "center_crop" and meta.input.color == "gray"
        assert meta.output == "probs" and meta.output_kind == "probabilities"
        (inp,) = session.get_inputs()
        (out,) = session.get_outputs()
        assert inp.name == "image" and inp.shape == ["N", 1, 8, 8] and inp.type == "tensor(float)"
        assert out.name == "probs" and out.shape == ["N", 10]
        probs = session.run(["probs"], {"image": np.zeros((3, 1, 8, 8), dtype=np.float32)})[0]
        assert probs.shape == (3, 10)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_onnx_structure(demo: DemoArtifacts) -> None:
    import onnx

    for path in (demo.edge_model, demo.cloud_model):
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        assert model.ir_version == 8
        assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
        assert model.producer_name == "edgewire"
        ops = [n.op_type for n in model.graph.node]
        # The device's NCHW tensor is flattened for the converted MLP, whose softmax ends it;
        # the label path of the conversion is cut away (no ArgMax, no ai.onnx.ml operators).
        assert ops[0] == "Flatten" and "Softmax" in ops and "ArgMax" not in ops
        assert ops.count("MatMul") == (2 if path == demo.edge_model else 3)
        assert {init.data_type for init in model.graph.initializer} == {onnx.TensorProto.FLOAT}
    assert demo.edge_model.stat().st_size < demo.cloud_model.stat().st_size


def test_accuracies(demo: DemoArtifacts) -> None:
    assert 0.80 <= demo.edge_accuracy <= 0.97
    assert demo.cloud_accuracy >= 0.95
    assert demo.cloud_accuracy > demo.edge_accuracy


def test_frames(demo: DemoArtifacts) -> None:
    labels = json.loads(demo.labels_file.read_text())
    frames = sorted(p for p in demo.frames_dir.iterdir() if p.suffix == ".jpg")
    assert len(frames) == len(labels) == HELD_OUT
    assert sorted(labels) == [p.name for p in frames]
    assert set(labels.values()) == set(range(10))
    for frame in frames[:20]:
        assert label_of(frame) == labels[frame.name]
        image = cv2.imread(str(frame), cv2.IMREAD_UNCHANGED)
        assert image.shape == (240, 320, 3) and image.dtype == np.uint8
    assert all(label_of(p) == labels[p.name] for p in frames)


def test_label_of() -> None:
    assert label_of(Path("frames/00042-7.jpg")) == 7
    assert label_of(Path("00000-0.png")) == 0
    with pytest.raises(ValueError):
        label_of(Path("nolabel.jpg"))


def test_frame_preprocessing_matches_training_scale(demo: DemoArtifacts) -> None:
    labels = json.loads(demo.labels_file.read_text())
    names = sorted(labels)
    truth = np.array([labels[n] for n in names])
    for path, expected in ((demo.edge_model, demo.edge_accuracy), (demo.cloud_model, demo.cloud_accuracy)):
        meta = _meta(path)
        batch = np.stack([_preprocess(demo.frames_dir / n, meta) for n in names]).astype(np.float32)
        probs = _session(path).run([meta.output], {meta.input.name: batch})[0]
        accuracy = float(np.mean(probs.argmax(axis=1) == truth))
        assert abs(accuracy - expected) <= 0.03, (path.name, accuracy, expected)


def test_deterministic(demo: DemoArtifacts, tmp_path: Path) -> None:
    messages: list[str] = []
    again = build_demo(tmp_path / "again", progress=messages.append)
    assert any("training edge model" in m for m in messages)
    assert again.edge_model.read_bytes() == demo.edge_model.read_bytes()
    assert again.cloud_model.read_bytes() == demo.cloud_model.read_bytes()
    assert again.labels_file.read_bytes() == demo.labels_file.read_bytes()
    for index in (0, 123, HELD_OUT - 1):
        (frame,) = demo.frames_dir.glob(f"{index:05d}-*.jpg")
        assert (again.frames_dir / frame.name).read_bytes() == frame.read_bytes()
    assert (again.edge_accuracy, again.cloud_accuracy) == (demo.edge_accuracy, demo.cloud_accuracy)
