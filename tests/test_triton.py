"""A real Triton (the pytriton wheel's tritonserver) serving repositories written from the demo models."""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("pytriton")
grpcclient = pytest.importorskip("tritonclient.grpc")
grpc_aio = pytest.importorskip("tritonclient.grpc.aio")

from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from edgewire.cloud_bridge.model_repository import (  # noqa: E402
    model_meta_from_config,
    write_onnxruntime_repository,
    write_python_repository,
)
from edgewire.cloud_bridge.triton_server import EmbeddedTriton, TritonError, prepare_tritonserver  # noqa: E402
from edgewire.demo.models import CLOUD_NAME, EDGE_NAME, DemoArtifacts  # noqa: E402
from edgewire.errors import ModelError  # noqa: E402
from edgewire.modelmeta import META_KEY, ModelMeta  # noqa: E402
from edgewire.preprocess import Preprocessor, read  # noqa: E402

# One server and one loop for the module: every test but the last runs against it as started.
module_loop = pytest.mark.asyncio(loop_scope="module")


def _meta_of(path: Path) -> ModelMeta:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ModelMeta.model_validate_json(session.get_modelmeta().custom_metadata_map[META_KEY])


def _local(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x})[0]


def _frames(demo: DemoArtifacts, meta: ModelMeta, n: int, start: int = 0) -> np.ndarray:
    pre = Preprocessor(meta.input)
    paths = sorted(demo.frames_dir.glob("*.jpg"))[start : start + n]
    images = [read(str(p), gray=pre.gray) for p in paths]
    assert len(images) == n and all(img is not None for img in images)
    return pre.batch(images)  # type: ignore[arg-type]


def _parse(config_path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())


async def _infer(client: grpc_aio.InferenceServerClient, model: str, x: np.ndarray) -> np.ndarray:
    inp = grpcclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = await client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("probs")])
    return result.as_numpy("probs")


async def _counts(client: grpc_aio.InferenceServerClient, model: str) -> tuple[int, int]:
    """Requests served and model executions so far: fewer executions means requests were batched."""
    stats = (await client.get_inference_statistics(model)).model_stats[0]
    return stats.inference_stats.success.count, stats.execution_count


@pytest.fixture(scope="module")
def repo(demo: DemoArtifacts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("triton-repo")
    assert write_python_repository(path, [demo.cloud_model, demo.edge_model]) == [CLOUD_NAME, EDGE_NAME]
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def triton(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedTriton]:
    async with EmbeddedTriton(repo, workdir=tmp_path_factory.mktemp("triton-work")) as server:
        print(f"tritonserver ready in {server.start_seconds:.2f} s", file=sys.stderr)
        yield server


@pytest_asyncio.fixture(loop_scope="module")
async def client(triton: EmbeddedTriton) -> AsyncIterator[grpc_aio.InferenceServerClient]:
    c = grpc_aio.InferenceServerClient(triton.grpc_url)
    try:
        yield c
    finally:
        # An open channel makes Triton's graceful shutdown wait for it.
        await c.close()


@module_loop
async def test_server_and_models_ready(triton: EmbeddedTriton, client: grpc_aio.InferenceServerClient) -> None:
    assert triton.running
    assert triton.grpc_url == f"127.0.0.1:{triton.grpc_port}"
    assert triton.http_url == f"http://127.0.0.1:{triton.http_port}"
    assert triton.models == [CLOUD_NAME, EDGE_NAME]
    assert await client.is_server_live()
    assert await client.is_server_ready()
    for name in (CLOUD_NAME, EDGE_NAME):
        assert await client.is_model_ready(name)


@module_loop
async def test_model_meta_from_config(demo: DemoArtifacts, client: grpc_aio.InferenceServerClient) -> None:
    expected = _meta_of(demo.cloud_model)
    response = await client.get_model_config(CLOUD_NAME)
    meta = model_meta_from_config(response)
    assert meta == expected
    assert meta.labels == tuple(str(i) for i in range(10))
    assert meta.input.name == "image" and meta.input.shape == (-1, 1, 8, 8)
    assert meta.output == "probs"
    # The same contract from .config, and from grpc's and HTTP's JSON forms.
    assert model_meta_from_config(response.config) == expected
    as_json = await client.get_model_config(CLOUD_NAME, as_json=True)
    assert model_meta_from_config(as_json) == expected
    assert model_meta_from_config(as_json["config"]) == expected
    assert model_meta_from_config(await client.get_model_config(EDGE_NAME)) == _meta_of(demo.edge_model)


def test_model_meta_from_config_refuses_a_config_without_it() -> None:
    with pytest.raises(ModelError, match=re.escape("config.pbtxt of Triton model 'resnet50': no 'edgewire' entry")):
        model_meta_from_config({"config": {"name": "resnet50", "parameters": {}}})
    with pytest.raises(ModelError, match="resnet50"):
        model_meta_from_config(model_config_pb2.ModelConfig(name="resnet50"))
    with pytest.raises(ModelError, match="not a valid ModelMeta"):
        model_meta_from_config({"name": "x", "parameters": {META_KEY: {"string_value": '{"name": "x"}'}}})


@module_loop
@pytest.mark.parametrize("model", [CLOUD_NAME, EDGE_NAME])
@pytest.mark.parametrize("n", [1, 8])
async def test_infer_matches_local_onnxruntime(
    demo: DemoArtifacts, client: grpc_aio.InferenceServerClient, model: str, n: int
) -> None:
    path = demo.cloud_model if model == CLOUD_NAME else demo.edge_model
    meta = model_meta_from_config(await client.get_model_config(model))
    x = _frames(demo, meta, n)
    assert x.shape == (n, 1, 8, 8) and x.dtype == np.float32
    got = await _infer(client, model, x)
    want = _local(path, x)
    assert got.shape == (n, 10)
    assert np.allclose(got, want, atol=1e-6)
    assert (got.argmax(1) == want.argmax(1)).all()


@module_loop
async def test_concurrent_requests_are_batched_and_split_back(
    demo: DemoArtifacts, triton: EmbeddedTriton, client: grpc_aio.InferenceServerClient
) -> None:
    """Concurrent requests of different sizes land in one execute(); each must get its own rows back."""
    meta = _meta_of(demo.cloud_model)
    sizes = [1, 3, 2, 5, 1, 4, 2, 6] * 3
    starts = np.cumsum([0, *sizes[:-1]])
    inputs = [_frames(demo, meta, n, int(s)) for n, s in zip(sizes, starts, strict=True)]
    before = await _counts(client, CLOUD_NAME)
    results = await asyncio.gather(*(_infer(client, CLOUD_NAME, x) for x in inputs))
    # Triton records a request's statistics after its response has gone out: wait for them.
    after = await _counts(client, CLOUD_NAME)
    for _ in range(50):
        if after[0] - before[0] >= len(sizes):
            break
        await asyncio.sleep(0.1)
        after = await _counts(client, CLOUD_NAME)
    for x, got in zip(inputs, results, strict=True):
        assert got.shape == (x.shape[0], 10)
        assert np.allclose(got, _local(demo.cloud_model, x), atol=1e-6)
    requests, executions = (a - b for a, b in zip(after, before, strict=True))
    assert requests == len(sizes)
    assert executions < requests, "the dynamic batcher never merged requests, so the split path went untested"
    assert "running them one by one" not in triton.log_path.read_text()


@module_loop
async def test_a_burst_queued_in_the_bridge_leaves_a_healthy_endpoints_circuit_closed(
    demo: DemoArtifacts, triton: EmbeddedTriton
) -> None:
    """A reconnect storm's replay queues hundreds of calls in the bridge behind the one in
    flight, while each call to Triton stays fast. The circuit breaker must judge the endpoint's
    time, not the wait in the queue: had it opened, every request of its open period would have
    been answered ``unavailable`` by a bridge whose Triton was healthy."""
    from edgewire.cloud_bridge.breaker import BreakerBoard
    from edgewire.cloud_bridge.dispatch import Dispatcher

    x = _frames(demo, _meta_of(demo.cloud_model), 1)
    url = f"grpc://{triton.grpc_url}"
    probe = Dispatcher([url], max_batch=1)
    try:
        await probe.call(CLOUD_NAME, x, time.time() + 60)
        singles = []
        for _ in range(20):
            t0 = time.perf_counter()
            await probe.call(CLOUD_NAME, x, time.time() + 60)
            singles.append((time.perf_counter() - t0) * 1000)
    finally:
        await probe.close()
    one_ms = sorted(singles)[len(singles) // 2]
    slow_ms = max(20 * one_ms, 50.0)  # far slower than a call, far quicker than the burst
    burst = min(4000, int(8 * slow_ms / one_ms))
    d = Dispatcher([url], max_batch=1, breakers=BreakerBoard(slow_call_ms=slow_ms))
    try:
        await d.call(CLOUD_NAME, x, time.time() + 60)
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(d.call(CLOUD_NAME, x, time.time() + 300) for _ in range(burst)))
        drained_ms = (time.perf_counter() - t0) * 1000
        breaker = d.breakers.get(url, CLOUD_NAME).snapshot()
    finally:
        await d.close()
    assert len(answers) == burst
    assert drained_ms > 2 * slow_ms, f"the burst never queued past {slow_ms:.0f} ms: nothing was tested"
    assert breaker["state"] == "closed", breaker


@module_loop
async def test_startup_failure_carries_the_server_log(tmp_path: Path, demo: DemoArtifacts) -> None:
    bad = tmp_path / "repo"
    write_python_repository(bad, [demo.edge_model])
    (bad / EDGE_NAME / "1" / "model.onnx").write_bytes(b"not an onnx model")
    server = EmbeddedTriton(bad, workdir=tmp_path / "work")
    with pytest.raises(TritonError, match="exited during startup") as err:
        await server.start()
    assert "--- tail of" in str(err.value) and EDGE_NAME in str(err.value)
    assert not server.running


@module_loop
async def test_missing_repository_is_a_triton_error(tmp_path: Path) -> None:
    with pytest.raises(TritonError, match="does not exist"):
        await EmbeddedTriton(tmp_path / "nowhere", workdir=tmp_path).start()


def test_missing_wheel_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pytriton.triton", None)
    with pytest.raises(TritonError, match=r"pip install 'edgewire\[cloud\]'"):
        prepare_tritonserver(tmp_path / "cache")


def test_prepared_server_is_reused(tmp_path: Path) -> None:
    first = prepare_tritonserver(tmp_path / "ts")
    stub = first / "backends" / "python" / "triton_python_backend_stub"
    assert (first / "bin" / "tritonserver").is_file() and stub.is_file()
    assert not (first / "python_backend_stubs").exists()
    mtime = stub.stat().st_mtime_ns
    assert prepare_tritonserver(tmp_path / "ts") == first
    assert stub.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["ts"]  # no temp dir left behind


def test_python_repository_layout_and_idempotence(repo: Path, demo: DemoArtifacts) -> None:
    config = _parse(repo / CLOUD_NAME / "config.pbtxt")
    assert config.name == CLOUD_NAME and config.backend == "python"
    assert config.max_batch_size == 64
    assert config.dynamic_batching.max_queue_delay_microseconds == 200
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert (repo / CLOUD_NAME / "1" / "model.py").read_bytes() == (
        Path(__file__).parents[1] / "cloud_bridge" / "triton_python_model.py"
    ).read_bytes()
    assert (repo / CLOUD_NAME / "1" / "model.onnx").read_bytes() == demo.cloud_model.read_bytes()
    files = sorted(p for p in repo.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    assert write_python_repository(repo, [demo.cloud_model, demo.edge_model]) == [CLOUD_NAME, EDGE_NAME]
    assert {p: p.stat().st_mtime_ns for p in sorted(p for p in repo.rglob("*") if p.is_file())} == before


def test_onnxruntime_fallback_writes_the_same_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, demo: DemoArtifacts, repo: Path
) -> None:
    """Without the onnx package (a bridge host needs only onnxruntime) the signature comes from a session."""
    monkeypatch.setitem(sys.modules, "onnx", None)
    write_python_repository(tmp_path, [demo.cloud_model])
    assert (tmp_path / CLOUD_NAME / "config.pbtxt").read_text() == (repo / CLOUD_NAME / "config.pbtxt").read_text()


def test_model_without_metadata_is_refused(tmp_path: Path, demo: DemoArtifacts) -> None:
    import onnx

    proto = onnx.load(str(demo.edge_model))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    out = tmp_path / "repo"
    # Read as a device reads it: the graph gives the input and the task, nothing gives the labels.
    with pytest.raises(ModelError, match=re.escape(f"{bare}: nothing in the model says its labels")) as refused:
        write_python_repository(out, [demo.cloud_model, bare])
    assert f"edgewire model annotate {bare}" in str(refused.value) and "--labels" in str(refused.value)
    assert not out.exists()  # checked before anything was written
    with pytest.raises(ModelError, match="both declare"):
        write_python_repository(out, [demo.cloud_model, demo.cloud_model])


def test_onnxruntime_repository_for_ngc(tmp_path: Path, demo: DemoArtifacts) -> None:
    repo = tmp_path / "ngc"
    # Written over a python layout: the stale model.py must go.
    write_python_repository(repo, [demo.cloud_model])
    assert write_onnxruntime_repository(repo, [demo.cloud_model, demo.edge_model]) == [CLOUD_NAME, EDGE_NAME]
    for name, path in ((CLOUD_NAME, demo.cloud_model), (EDGE_NAME, demo.edge_model)):
        assert sorted(p.relative_to(repo / name).as_posix() for p in (repo / name).rglob("*") if p.is_file()) == [
            "1/model.onnx",
            "config.pbtxt",
        ]
        config = _parse(repo / name / "config.pbtxt")
        assert config.name == name
        assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
        assert config.max_batch_size == 64
        assert config.dynamic_batching.max_queue_delay_microseconds == 200
        assert len(config.instance_group) == 0  # Triton picks GPUs where it has them
        (inp,) = config.input
        (out,) = config.output
        assert (inp.name, inp.data_type, list(inp.dims)) == ("image", model_config_pb2.TYPE_FP32, [1, 8, 8])
        assert (out.name, out.data_type, list(out.dims)) == ("probs", model_config_pb2.TYPE_FP32, [10])
        assert model_meta_from_config(config) == _meta_of(path)


@module_loop
async def test_stop_and_start_again_on_the_same_ports(triton: EmbeddedTriton, demo: DemoArtifacts) -> None:
    """Last in the module: the bridge's tests need Triton to go away and come back where it was."""
    grpc_port, http_port = triton.grpc_port, triton.http_port
    await triton.stop()
    assert not triton.running
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", grpc_port)) != 0
    c = grpc_aio.InferenceServerClient(triton.grpc_url)
    try:
        with pytest.raises(InferenceServerException):
            await c.is_server_ready()
    finally:
        await c.close()

    await triton.start()
    assert triton.running and (triton.grpc_port, triton.http_port) == (grpc_port, http_port)
    c = grpc_aio.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    try:
        assert await c.is_server_ready()
        x = _frames(demo, _meta_of(demo.cloud_model), 8)
        assert np.allclose(await _infer(c, CLOUD_NAME, x), _local(demo.cloud_model, x), atol=1e-6)
    finally:
        await c.close()
