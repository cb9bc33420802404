"""The ONNX Runtime engine on the real demo model, and the errors for models it cannot use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from edgewire.demo.models import DemoArtifacts, build_demo, label_of  # noqa: E402
from edgewire.edge.engines import Engine, create_engine  # noqa: E402
from edgewire.edge.engines.onnx import OnnxEngine  # noqa: E402
from edgewire.errors import ModelError  # noqa: E402
from edgewire.modelmeta import META_KEY, InputSpec, ModelMeta  # noqa: E402
from edgewire.preprocess import Preprocessor, read  # noqa: E402
from edgewire.profiles import DeviceProfile, Limits, load_profile  # noqa: E402

helper, TP = onnx.helper, onnx.TensorProto
LABELS10 = tuple(str(i) for i in range(10))


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> DemoArtifacts:
    return build_demo(tmp_path_factory.mktemp("engine-demo"))


@pytest.fixture(scope="module")
def engine(demo_models: DemoArtifacts) -> OnnxEngine:
    return OnnxEngine(demo_models.edge_model)


def frames_batch(arts: DemoArtifacts, engine: OnnxEngine, n: int) -> tuple[np.ndarray, list[int]]:
    paths = sorted(arts.frames_dir.glob("*.jpg"))[:n]
    pre = Preprocessor(engine.meta.input)
    images = [read(str(p), pre.gray) for p in paths]
    assert all(img is not None for img in images)
    return pre.batch(images), [label_of(p) for p in paths]


def tiny_model(
    path: Path,
    *,
    meta: ModelMeta | None = None,
    raw_meta: str | None = None,
    op: str = "Softmax",
    batch: int | str = "N",
) -> Path:
    """A [batch,1,1,10] -> [batch,10] graph (Flatten, then ``op``), optionally with edgewire metadata."""
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], axis=1)]
    nodes.append(helper.make_node(op, ["flat"], ["y"], **({"axis": 1} if op == "Softmax" else {})))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TP.FLOAT, [batch, 1, 1, 10])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [batch, 10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    if meta is not None:
        raw_meta = meta.model_dump_json()
    if raw_meta is not None:
        helper.set_model_props(model, {META_KEY: raw_meta})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_meta(**kw: object) -> ModelMeta:
    shape = kw.pop("shape", (-1, 1, 1, 10))
    fields: dict[str, object] = {
        "name": "tiny",
        "version": "0.1",
        "labels": LABELS10,
        "input": InputSpec(name=kw.pop("input_name", "x"), shape=shape),
        "output": "y",
    }
    fields.update(kw)
    return ModelMeta(**fields)


def profile(*backends: str) -> DeviceProfile:
    return DeviceProfile(
        name="test-box",
        description="test",
        backends=list(backends),
        precisions=["fp32"],
        limits=Limits(memory_limit_mb=64, max_batch=8, latency_budget_ms=10),
    )


# ---- the demo model -------------------------------------------------------------------------


def test_demo_model_metadata(engine: OnnxEngine) -> None:
    assert isinstance(engine, Engine)
    assert engine.backend == "onnxruntime"
    assert engine.meta.name == "digits-edge"
    assert engine.meta.labels == LABELS10
    assert engine.meta.input.shape == (-1, 1, 8, 8)


@pytest.mark.parametrize("n", [1, 3, 17])
def test_batch_of_n_gives_n_probability_rows(demo_models: DemoArtifacts, engine: OnnxEngine, n: int) -> None:
    batch, _ = frames_batch(demo_models, engine, n)
    assert batch.shape == (n, 1, 8, 8)
    probs = engine.infer(batch)
    assert probs.shape == (n, 10)
    assert np.all(probs >= 0) and np.all(probs <= 1)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_batched_and_single_inference_agree(demo_models: DemoArtifacts, engine: OnnxEngine) -> None:
    batch, _ = frames_batch(demo_models, engine, 6)
    together = engine.infer(batch)
    alone = np.concatenate([engine.infer(batch[i : i + 1]) for i in range(len(batch))])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_demo_model_reads_its_frames(demo_models: DemoArtifacts, engine: OnnxEngine) -> None:
    batch, labels = frames_batch(demo_models, engine, 100)
    predicted = engine.infer(batch).argmax(axis=1)
    accuracy = float(np.mean(predicted == np.array(labels)))
    assert accuracy >= 0.75, accuracy


def test_create_engine_picks_onnxruntime(demo_models: DemoArtifacts) -> None:
    for name in ("x86-64-cpu", "jetson-orin-nano-8gb"):
        eng = create_engine(demo_models.edge_model, load_profile(name))
        assert isinstance(eng, OnnxEngine)
        assert eng.meta.name == "digits-edge"
        eng.close()


# ---- models it refuses ----------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.onnx"
    with pytest.raises(ModelError, match="not found") as info:
        OnnxEngine(path)
    assert str(path) in str(info.value)
    with pytest.raises(ModelError, match="not found"):
        create_engine(path, load_profile("x86-64-cpu"))


def test_random_bytes_are_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelError, match="not a loadable") as info:
        OnnxEngine(path)
    assert str(path) in str(info.value)


def test_directory_named_onnx_is_not_found(tmp_path: Path) -> None:
    path = tmp_path / "dir.onnx"
    path.mkdir()
    with pytest.raises(ModelError, match="not found"):
        OnnxEngine(path)


def test_model_without_edgewire_metadata_is_refused_naming_only_what_the_graph_cannot_say(tmp_path: Path) -> None:
    # Its graph gives the input (1 channel: gray, 1x10) and the task (a [N, 10] output): only
    # the labels are unknown, and the refusal names them and the command that fills them.
    path = tiny_model(tmp_path / "plain.onnx")
    with pytest.raises(ModelError) as info:
        OnnxEngine(path)
    assert str(info.value) == (
        f"{path}: nothing in the model says its labels; "
        f"fix: edgewire model annotate {path} --out {tmp_path / 'plain.edgewire.onnx'} --labels LABELS.txt"
    )


@pytest.mark.parametrize("raw", ["{not json", '{"name": "x"}', "[]"])
def test_model_with_invalid_metadata(tmp_path: Path, raw: str) -> None:
    path = tiny_model(tmp_path / "bad-meta.onnx", raw_meta=raw)
    with pytest.raises(ModelError, match=f"the '{META_KEY}' entry is not (JSON|a valid ModelMeta)"):
        OnnxEngine(path)


def test_metadata_naming_an_input_the_graph_lacks(tmp_path: Path) -> None:
    path = tiny_model(tmp_path / "wrong-input.onnx", meta=tiny_meta(input_name="image"))
    with pytest.raises(ModelError, match=r"metadata names input 'image', graph has \['x'\]"):
        OnnxEngine(path)


def test_tiny_model_with_metadata_loads_and_softmaxes(tmp_path: Path) -> None:
    eng = OnnxEngine(tiny_model(tmp_path / "ok.onnx", meta=tiny_meta()))
    x = np.arange(20, dtype=np.float32).reshape(2, 1, 1, 10)
    probs = eng.infer(x)
    assert probs.shape == (2, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert list(probs.argmax(axis=1)) == [9, 9]


def test_logits_output_is_turned_into_probabilities(tmp_path: Path) -> None:
    path = tiny_model(tmp_path / "logits.onnx", meta=tiny_meta(output_kind="logits"), op="Identity")
    logits = np.array([[0.0] * 9 + [1000.0], [1.0, 2.0, 3.0, 0, 0, 0, 0, 0, 0, 0]], dtype=np.float32)
    probs = OnnxEngine(path).infer(logits.reshape(2, 1, 1, 10))
    assert np.all(np.isfinite(probs))  # large logits must not overflow
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert probs[0, 9] == pytest.approx(1.0)
    expected = np.exp(logits[1]) / np.exp(logits[1]).sum()
    np.testing.assert_allclose(probs[1], expected, rtol=1e-5)


def test_fixed_batch_model_runs_whole_batches_in_chunks(tmp_path: Path) -> None:
    path = tiny_model(tmp_path / "fixed.onnx", meta=tiny_meta(shape=(4, 1, 1, 10)), batch=4)
    eng = OnnxEngine(path)
    x = np.random.default_rng(0).standard_normal((8, 1, 1, 10)).astype(np.float32)
    probs = eng.infer(x)
    assert probs.shape == (8, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("n", [2, 6])
def test_fixed_batch_model_runs_a_partial_batch(tmp_path: Path, n: int) -> None:
    path = tiny_model(tmp_path / "fixed.onnx", meta=tiny_meta(shape=(4, 1, 1, 10)), batch=4)
    eng = OnnxEngine(path)
    x = np.random.default_rng(0).standard_normal((n, 1, 1, 10)).astype(np.float32)
    probs = eng.infer(x)
    assert probs.shape == (n, 10)


# ---- choosing a backend ---------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".plan", ".engine"])
def test_a_tensorrt_engine_is_refused_saying_what_runs_it(tmp_path: Path, suffix: str) -> None:
    plan = tmp_path / f"model{suffix}"
    plan.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError) as info:
        create_engine(plan, load_profile("jetson-orin-nano-8gb"))
    message = str(info.value)
    assert message.startswith(f"{plan}: a TensorRT engine is built for one GPU and TensorRT version")
    assert "runs only on the 'tensorrt' backend, on the Jetson it was built on" in message
    assert "profile 'jetson-orin-nano-8gb'" in message
    assert "Serve the ONNX export instead" in message


def test_no_backend_when_the_profile_lacks_onnxruntime(demo_models: DemoArtifacts) -> None:
    with pytest.raises(ModelError, match=r"no backend of profile 'test-box' \(tensorrt\) loads '.onnx' files"):
        create_engine(demo_models.edge_model, profile("tensorrt"))


def test_model_error_is_an_edgewire_error() -> None:
    from edgewire.errors import EdgewireError

    assert issubclass(ModelError, EdgewireError)
