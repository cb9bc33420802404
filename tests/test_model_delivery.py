"""Model delivery end to end on the device: push, verify, validate, swap, resume, catch up, roll back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from edgewire import envelopes as env
from edgewire import signing, topics
from edgewire.cloud_bridge.distributor import Distributor
from edgewire.config import (
    BrokerSettings,
    DeliverySettings,
    DeviceConfig,
    ModelSettings,
    PublishSettings,
    SourceSettings,
)
from edgewire.delivery import build_manifest, read_chunk
from edgewire.demo.models import DemoArtifacts
from edgewire.edge.agent import EdgeAgent
from edgewire.fleet.history import History
from edgewire.fleet.push import announce, publish_chunks, push
from edgewire.fleet.rollout import push_model
from edgewire.modelmeta import META_KEY, ModelMeta
from edgewire.session import MqttSession

from .conftest import BrokerHandle, until
from .test_edge_integration import Reader, spawn_edge_run
from .test_model_reading import yolo_model

NAME = "digits-edge"


def onnx_model_meta_raw(path: Path) -> str:
    return next(p.value for p in onnx.load(str(path)).metadata_props if p.key == META_KEY)


def variant(src: Path, dst: Path, version: str, *, slow: int = 0) -> Path:
    """The demo edge model re-labelled as ``version``; ``slow`` adds that many dead 1024x1024
    layers whose result is multiplied by zero, so the answers stay and the latency grows."""
    model = onnx.load(str(src))
    for prop in model.metadata_props:
        if prop.key == META_KEY:
            meta = json.loads(prop.value)
            meta["version"] = version
            prop.value = json.dumps(meta)
    if slow:
        g = model.graph
        rng = np.random.default_rng(0)
        softmax = next(n for n in g.node if n.op_type == "Softmax")
        logits = softmax.input[0]
        current, width = next(n for n in g.node if n.op_type == "Flatten").output[0], 64
        dead = []
        for i in range(slow):
            w = numpy_helper.from_array(rng.standard_normal((width, 1024)).astype(np.float32) * 0.01, f"dead{i}.w")
            g.initializer.append(w)
            dead.append(helper.make_node("MatMul", [current, f"dead{i}.w"], [f"dead{i}"]))
            current, width = f"dead{i}", 1024
        g.initializer.append(numpy_helper.from_array(np.zeros((1,), np.float32), "zero"))
        dead.append(helper.make_node("ReduceSum", [current], ["dead_sum"], keepdims=1))
        dead.append(helper.make_node("Mul", ["dead_sum", "zero"], ["dead_zero"]))
        dead.append(helper.make_node("Add", [logits, "dead_zero"], ["logits_live"]))
        # The dead layers go just before the softmax, which then reads their sum.
        at = next(i for i, n in enumerate(g.node) if n.op_type == "Softmax")
        for offset, node in enumerate(dead):
            g.node.insert(at + offset, node)
        softmax = g.node[at + len(dead)]
        softmax.input[0] = "logits_live"
    onnx.save(model, str(dst))
    return dst


@dataclass
class Fleet:
    broker: BrokerHandle
    root: Path
    private: signing.Ed25519PrivateKey
    public_file: Path
    distributor: Distributor

    def device(
        self, device_id: str, *, source: dict[str, object] | None = None, persistent: bool = True, **delivery: object
    ) -> DeviceConfig:
        return DeviceConfig(
            device_id=device_id,
            fleet="lab",
            broker=BrokerSettings(
                url=self.broker.url, reconnect_min_s=0.05, reconnect_max_s=0.5, persistent_session=persistent
            ),
            source=SourceSettings(**(source or {"kind": "mqtt"})),  # type: ignore[arg-type]
            model=ModelSettings(path=self.root / "v1.onnx"),
            delivery=DeliverySettings(
                store=self.root / "stores" / device_id,
                public_key=self.public_file,
                **{"fetch_after_s": 0.5, "probation_s": 3.0, **delivery},  # type: ignore[arg-type]
            ),
        )

    def operator(self) -> MqttSession:
        return MqttSession("operator-test", self.broker.host, self.broker.port)


@pytest.fixture
async def fleet(broker: BrokerHandle, demo: DemoArtifacts, tmp_path: Path) -> AsyncIterator[Fleet]:
    pem, public = signing.generate()
    public_file = tmp_path / "fleet-signing.pub"
    public_file.write_text(public)
    variant(demo.edge_model, tmp_path / "v1.onnx", "1.0.0")
    dist = Distributor(BrokerSettings(url=broker.url, reconnect_min_s=0.05), tmp_path / "distributor")
    task = asyncio.create_task(dist.run())
    await asyncio.wait_for(dist.ready.wait(), 15)
    try:
        yield Fleet(broker, tmp_path, signing.load_private(pem), public_file, dist)
    finally:
        dist.stop()
        await asyncio.wait_for(task, 15)


class Running:
    """An agent running in the background of a test."""

    def __init__(self, cfg: DeviceConfig, **kw: object) -> None:
        self.agent = EdgeAgent(cfg, **kw)  # type: ignore[arg-type]
        self.task: asyncio.Task[object] | None = None

    async def __aenter__(self) -> EdgeAgent:
        self.task = asyncio.create_task(self.agent.run())
        assert await until(lambda: self.agent.session is not None and self.agent.session.connected, 10)
        await asyncio.sleep(0.3)  # subscriptions in place
        return self.agent

    async def __aexit__(self, *exc: object) -> None:
        self.agent.stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, 20)


def statuses(reader: Reader, device_id: str) -> list[env.ModelStatus]:
    return [s for s in reader.decoded(topics.MODEL_STATUS) if s.device_id == device_id]  # type: ignore[attr-defined]


async def test_push_installs_on_every_device_while_frames_keep_flowing(fleet: Fleet, demo: DemoArtifacts) -> None:
    v2 = variant(demo.edge_model, fleet.root / "v2.onnx", "2.0.0")
    manifest = build_manifest(v2, name=NAME, version="2.0.0", chunk_size=4096, private_key=fleet.private)
    seen: list[env.LocalResult] = []
    busy = {"kind": "folder", "path": demo.frames_dir, "loop": True, "fps": 100}
    async with (
        Reader(fleet.broker, topics.MODEL_STATUS.filter()) as reader,
        Running(fleet.device("cam-a", source=busy), on_result=seen.append) as a,
        Running(fleet.device("cam-b")) as b,
    ):
        async with fleet.operator() as op:
            await op.wait_connected(10)
            await push(op, v2, manifest)
        assert await until(lambda: a.meta.version == b.meta.version == "2.0.0", 30)
        await until(lambda: len([r for r in seen if r.version == "2.0.0"]) > 20, 10)
    for device in ("cam-a", "cam-b"):
        states = [s.state for s in statuses(reader, device)]
        assert states[-1] == "active" and "verifying" in states and "validating" in states
    served = {r.version for r in seen}
    assert served == {"1.0.0", "2.0.0"}  # frames served across the swap
    assert a.meter.total("frames_failed_total") == 0
    assert a.meter.get("model_chunks_received_total") == manifest.chunk_count
    installed = fleet.root / "stores" / "cam-b" / NAME / "2.0.0" / "model.onnx"
    assert installed.read_bytes() == v2.read_bytes()


@pytest.mark.parametrize(
    "fault", ["wrong_sha256", "bad_signature", "truncated", "unknown_format", "corrupt_chunk", "detector_as_classifier"]
)
async def test_bad_artefacts_are_refused_and_the_active_model_stays(
    fleet: Fleet, demo: DemoArtifacts, fault: str
) -> None:
    v2 = variant(demo.edge_model, fleet.root / "v2.onnx", "2.0.0")
    key = fleet.private
    if fault == "bad_signature":
        key = signing.load_private(signing.generate()[0])
    if fault == "truncated":
        v2.write_bytes(v2.read_bytes()[: v2.stat().st_size // 2])
    if fault == "detector_as_classifier":
        # A YOLO-layout detector whose entry says it is the fleet's classifier: refused by the
        # standby validation when it loads, never served.
        edge = ModelMeta.model_validate_json(onnx_model_meta_raw(demo.edge_model))
        labels = tuple(f"c{i}" for i in range(2))
        meta = edge.model_copy(update={"version": "2.0.0", "labels": labels, "output": "output0"})
        meta = meta.model_copy(
            update={"input": meta.input.model_copy(update={"name": "images", "shape": (-1, 3, 64, 64), "color": "rgb"})}
        )
        yolo_model(v2, {META_KEY: meta.model_dump_json()})
    manifest = build_manifest(v2, name=NAME, version="2.0.0", chunk_size=4096, private_key=key)
    if fault == "wrong_sha256":
        manifest = manifest.model_copy(update={"sha256": "0" * 64})
    if fault == "unknown_format":
        manifest = manifest.model_copy(update={"format": "pytorch"})
    async with (
        Reader(fleet.broker, topics.MODEL_STATUS.filter()) as reader,
        Running(fleet.device("cam-x")) as agent,
        fleet.operator() as op,
    ):
        await op.wait_connected(10)
        if fault == "corrupt_chunk":
            # Chunk 1 arrives damaged (its data no longer matches its checksum); the rest are good.
            good = read_chunk(v2, manifest, 1)
            bad = good.model_copy(update={"data": bytes(len(good.data))})
            await announce(op, manifest)
            await publish_chunks(op, v2, manifest, indices=[0, *range(2, manifest.chunk_count)])
            topic = topics.MODEL_CHUNK.build(model=NAME, version="2.0.0", index=1)
            await op.publish(topic, env.encode(bad), qos=1, timeout=10)
            assert await until(lambda: any(s.reason for s in statuses(reader, "cam-x")), 10)
            assert agent.meta.version == "1.0.0"
            await publish_chunks(op, v2, manifest, indices=[1])  # the operator sends it again
        else:
            await push(op, v2, manifest)
        done = {"failed", "active"}
        assert await until(lambda: any(s.state in done for s in statuses(reader, "cam-x")), 20)
        final = statuses(reader, "cam-x")[-1]
        if fault == "corrupt_chunk":
            assert final.state == "active" and agent.meta.version == "2.0.0"
            assert agent.meter.get("model_chunks_rejected_total", reason="checksum") == 1
            assert any("chunk 1" in (s.reason or "") for s in statuses(reader, "cam-x"))
            return
        assert final.state == "failed"
        assert agent.meta.version == "1.0.0"
    reason = final.reason or ""
    expected = {
        "wrong_sha256": "sha256",
        "bad_signature": "signature",
        "truncated": "not a loadable ONNX model",
        "unknown_format": "unknown format 'pytorch'",
        "detector_as_classifier": "has shape [?, 6, 20] (it reads as a detect model, format yolov8), but a classify",
    }[fault]
    assert expected in reason, reason


async def test_interrupted_download_resumes_and_fetches_only_what_it_lacks(fleet: Fleet, demo: DemoArtifacts) -> None:
    v2 = variant(demo.edge_model, fleet.root / "v2.onnx", "2.0.0")
    manifest = build_manifest(v2, name=NAME, version="2.0.0", chunk_size=2048, private_key=fleet.private)
    n = manifest.chunk_count
    first = list(range(0, n, 2))  # the device is there for every other chunk, then drops off
    cfg = fleet.device("cam-r", persistent=False)
    async with fleet.operator() as op:
        await op.wait_connected(10)
        async with Running(cfg) as agent:
            await announce(op, manifest)
            await publish_chunks(op, v2, manifest, indices=first)
            assert await until(lambda: agent.meter.get("model_chunks_received_total") == len(first), 10)
            agent.updater._fetch_wait = 3600  # gone before it could ask for the rest
        await publish_chunks(op, v2, manifest, indices=[i for i in range(n) if i not in first])
        assert await until(lambda: fleet.distributor.holds(NAME, "2.0.0"), 10)
        served_before = fleet.distributor.chunks_served
        async with Running(cfg) as again:
            assert await until(lambda: again.meta.version == "2.0.0", 20)
    lacked = n - len(first)
    assert again.meter.get("model_downloads_resumed_total") == 1
    assert again.meter.get("model_chunks_received_total") == lacked  # no chunk it held came again
    assert again.meter.get("model_chunks_duplicate_total") == 0
    assert fleet.distributor.chunks_served - served_before == lacked


async def test_offline_device_catches_up_and_an_unmatched_one_ignores(fleet: Fleet, demo: DemoArtifacts) -> None:
    v2 = variant(demo.edge_model, fleet.root / "v2.onnx", "2.0.0")
    targets = env.Targets(devices=["cam-late*"])
    manifest = build_manifest(
        v2, name=NAME, version="2.0.0", chunk_size=4096, private_key=fleet.private, targets=targets
    )
    async with fleet.operator() as op:
        await op.wait_connected(10)
        await push(op, v2, manifest)  # no device is up
    assert await until(lambda: fleet.distributor.holds(NAME, "2.0.0"), 10)
    async with Running(fleet.device("cam-late-1")) as late, Running(fleet.device("cam-other")) as other:
        assert await until(lambda: late.meta.version == "2.0.0", 20)
        await asyncio.sleep(0.5)
    assert other.meta.version == "1.0.0"
    assert other.meter.get("model_announces_ignored_total", reason="not_targeted") >= 1
    assert other.meter.get("model_chunks_received_total") == 0


async def test_regression_on_probation_rolls_back_and_a_fleet_rollback_reactivates(
    fleet: Fleet, demo: DemoArtifacts
) -> None:
    v2 = variant(demo.edge_model, fleet.root / "v2.onnx", "2.0.0")
    slow = variant(demo.edge_model, fleet.root / "v3.onnx", "3.0.0", slow=24)
    m2 = build_manifest(v2, name=NAME, version="2.0.0", chunk_size=8192, private_key=fleet.private)
    m3 = build_manifest(slow, name=NAME, version="3.0.0", chunk_size=65536, private_key=fleet.private)
    busy = {"kind": "folder", "path": demo.frames_dir, "loop": True, "fps": 200}
    async with (
        Reader(fleet.broker, topics.MODEL_STATUS.filter()) as reader,
        Running(fleet.device("cam-p", source=busy, probation_s=30, min_latency_regression_ms=1.5)) as agent,
        fleet.operator() as op,
    ):
        await op.wait_connected(10)
        await push(op, v2, m2)
        assert await until(lambda: agent.meta.version == "2.0.0", 20)
        await asyncio.sleep(1.0)  # v2 serves long enough to be the baseline
        await push(op, slow, m3)
        assert await until(
            lambda: any(s.version == "3.0.0" and s.state == "active" for s in statuses(reader, "cam-p")), 20
        )
        assert await until(lambda: statuses(reader, "cam-p")[-1].state == "rolled_back", 20)
        assert agent.meta.version == "2.0.0"
    back = statuses(reader, "cam-p")[-1]
    assert back.version == "3.0.0" and "latency" in (back.reason or "")
    assert agent.meter.get("model_rollbacks_total") == 1


@pytest.mark.parametrize("good", [True, False], ids=["promoted", "aborted"])
async def test_canary_rollout_goes_on_or_stops_at_the_canary(
    fleet: Fleet, demo: DemoArtifacts, tmp_path: Path, good: bool
) -> None:
    v2 = variant(demo.edge_model, fleet.root / "v2.onnx", "2.0.0")
    if not good:  # verifies (signed as it is) but is no model: the canary refuses it at validation
        v2.write_bytes(v2.read_bytes()[:-100])
    manifest = build_manifest(v2, name=NAME, version="2.0.0", chunk_size=4096, private_key=fleet.private)
    ids = ["cam-c0", "cam-c1", "cam-c2", "cam-c3"]
    async with contextlib.AsyncExitStack() as stack:
        reader = await stack.enter_async_context(Reader(fleet.broker, topics.MODEL_STATUS.filter()))
        agents = [await stack.enter_async_context(Running(fleet.device(i))) for i in ids]
        op = await stack.enter_async_context(fleet.operator())
        await op.wait_connected(10)
        result = await push_model(
            op, v2, manifest, history=History(tmp_path / "history"), canary_percent=25, probation_s=1.0, timeout_s=30
        )
        if good:
            assert await until(lambda: all(a.meta.version == "2.0.0" for a in agents), 20)
        else:
            await asyncio.sleep(1.0)
    assert result.canaries == ["cam-c0"]
    if good:
        assert result.outcome == "promoted"
        assert {s.device_id for s in statuses_all(reader) if s.state == "active"} == set(ids)
    else:
        assert result.outcome == "aborted" and "not a loadable ONNX model" in (result.reason or "")
        assert [a.meta.version for a in agents] == ["1.0.0"] * 4
        # The rest never started: no status at all from them.
        assert {s.device_id for s in statuses_all(reader)} == {"cam-c0"}


def statuses_all(reader: Reader) -> list[env.ModelStatus]:
    return reader.decoded(topics.MODEL_STATUS)  # type: ignore[return-value]


async def test_device_killed_mid_download_resumes_after_restart(fleet: Fleet, demo: DemoArtifacts) -> None:
    v2 = variant(demo.edge_model, fleet.root / "v2.onnx", "2.0.0", slow=1)  # ~256 KiB of weights
    manifest = build_manifest(v2, name=NAME, version="2.0.0", chunk_size=4096, private_key=fleet.private)
    n = manifest.chunk_count
    half = list(range(n // 2))
    cfg = fleet.device("cam-k9").model_copy(update={"publish": PublishSettings(telemetry_interval_s=0.3)})
    folder = fleet.root / "cam-k9"
    folder.mkdir()
    device_id = "cam-k9"

    def progress() -> float:
        mine = statuses(reader, device_id)
        return mine[-1].progress if mine and mine[-1].state == "downloading" else 0.0

    async with Reader(fleet.broker, topics.MODEL_STATUS.filter(), topics.TELEMETRY.filter()) as reader:
        device = await spawn_edge_run(cfg, folder, output=asyncio.subprocess.DEVNULL)
        try:
            assert await until(
                lambda: any(getattr(p, "client_id", "") == device_id for p in reader.decoded(topics.TELEMETRY)), 20
            )
            async with fleet.operator() as op:
                await op.wait_connected(10)
                await announce(op, manifest)
                await publish_chunks(op, v2, manifest, indices=half)
                assert await until(lambda: progress() >= len(half) / n - 1e-9, 15)
                device.send_signal(signal.SIGKILL)  # mid-download, no goodbye
                await device.wait()
                await publish_chunks(op, v2, manifest, indices=range(len(half), n))
            device = await spawn_edge_run(cfg, folder, output=asyncio.subprocess.DEVNULL)
            assert await until(
                lambda: bool(statuses(reader, device_id)) and statuses(reader, device_id)[-1].state == "active", 30
            )
            await asyncio.sleep(0.8)  # one more telemetry snapshot
        finally:
            if device.returncode is None:
                device.send_signal(signal.SIGTERM)
                await device.wait()
    last = [t for t in reader.decoded(topics.TELEMETRY) if t.client_id == device_id][-1].metrics  # type: ignore[attr-defined]
    assert last["model_downloads_resumed_total"] == 1
    assert last["model_chunks_received_total"] == n - len(half)  # the second run got only what it lacked
    assert last.get("model_chunks_duplicate_total", 0) == 0
