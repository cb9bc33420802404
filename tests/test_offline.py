"""Offline first: durable escalations across kill -9, queue bounds, degraded mode and its way back."""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import sqlite3
import statistics
from pathlib import Path

import onnx
import pytest

pytest.importorskip("pytriton")

from edgewire import envelopes as env
from edgewire import topics
from edgewire.cloud_bridge.cloud import EmbeddedCloud
from edgewire.config import (
    BrokerSettings,
    CloudSettings,
    DeviceConfig,
    JudgeSettings,
    ModelSettings,
    OutboxSettings,
    PipelineSettings,
    SourceSettings,
)
from edgewire.demo.models import LABELS, DemoArtifacts
from edgewire.edge.agent import EdgeAgent
from edgewire.modelmeta import META_KEY
from edgewire.ports import free_port

from .conftest import BrokerHandle, Mosquitto, until
from .test_edge_integration import Reader, spawn_edge_run

EVERY_FRAME_HARD = JudgeSettings(unknown_labels=list(LABELS))


def config(demo: DemoArtifacts, port: int, device_id: str, tmp: Path, **over: object) -> DeviceConfig:
    source = over.pop("source", {"kind": "folder", "path": demo.frames_dir, "fps": 40, "loop": True})
    cloud = {
        "deadline_ms": 5000,
        "model_hint": "digits",
        "outbox": OutboxSettings(path=tmp / f"{device_id}.db", **over.pop("outbox", {})),  # type: ignore[arg-type]
        **over.pop("cloud", {}),  # type: ignore[dict-item]
    }
    return DeviceConfig(
        device_id=device_id,
        broker=BrokerSettings(
            url=f"mqtt://127.0.0.1:{port}", reconnect_min_s=0.05, reconnect_max_s=0.3, startup_wait_s=0.2
        ),
        source=SourceSettings(**source),  # type: ignore[arg-type]
        model=ModelSettings(path=demo.edge_model),
        judge=over.pop("judge", EVERY_FRAME_HARD),  # type: ignore[arg-type]
        cloud=CloudSettings(**cloud),  # type: ignore[arg-type]
        **over,  # type: ignore[arg-type]
    )


def count(db: Path, sql: str) -> int:
    con = sqlite3.connect(db)
    try:
        return int(con.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:  # the device has not created its tables yet
        return 0
    finally:
        con.close()


async def test_escalations_queued_offline_survive_kill9_and_are_answered_exactly_once(
    demo: DemoArtifacts, tmp_path: Path
) -> None:
    port = free_port()
    cfg = config(demo, port, "cam-k", tmp_path)
    db = tmp_path / "cam-k.db"
    log = (tmp_path / "device.log").open("wb")
    device = await spawn_edge_run(cfg, tmp_path, output=log.fileno())
    await until(lambda: count(db, "SELECT COUNT(*) FROM outbox") >= 25, 60)
    device.send_signal(signal.SIGKILL)  # mid-stream, no goodbye
    await device.wait()
    con = sqlite3.connect(db)
    owed = {row[0] for row in con.execute("SELECT key FROM owed WHERE state = 'waiting'")}
    queued = con.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    con.close()
    assert len(owed) == queued >= 25  # every durable request is owed its answer

    broker = Mosquitto(tmp_path, port=port)
    await asyncio.to_thread(broker.start)
    handle = BrokerHandle("mosquitto", "127.0.0.1", port)
    idle = {"kind": "mqtt"}  # back up with nothing new to see: only the queue moves
    try:
        async with (
            EmbeddedCloud(
                BrokerSettings(url=handle.url), [demo.cloud_model], tmp_path / "cloud", distributor=False
            ) as cloud,
            Reader(handle, topics.LOCAL.build(device_id="cam-k")) as reader,
        ):
            restart = config(demo, port, "cam-k", tmp_path, source=idle)
            (tmp_path / "r1").mkdir()
            device = await spawn_edge_run(restart, tmp_path / "r1", output=log.fileno())
            await until(lambda: len([r for r in reader.results() if r.late]) >= len(owed), 60)
            await asyncio.sleep(1.5)  # room for any duplicate to show up
            device.send_signal(signal.SIGTERM)
            await device.wait()
            # A third start finds nothing owed and nothing queued: no answer is taken twice.
            device = await spawn_edge_run(restart, tmp_path / "r1", output=log.fileno())
            await asyncio.sleep(4)
            device.send_signal(signal.SIGTERM)
            await device.wait()
            assert cloud.bridge is not None
            ran = cloud.bridge.meter.total("requests_total")
    finally:
        await asyncio.to_thread(broker.stop)
    late = [r for r in reader.results() if r.late]
    per_trace = collections.Counter(r.trace_id for r in late)
    assert set(per_trace) == owed
    assert set(per_trace.values()) == {1}
    assert all(r.answered_by == "cloud" and not r.degraded for r in late)
    assert ran == len(owed)  # the bridge ran each request once
    assert count(db, "SELECT COUNT(*) FROM outbox") == 0
    assert count(db, "SELECT COUNT(*) FROM owed WHERE state = 'waiting'") == 0


@pytest.mark.parametrize("policy", ["drop_oldest", "refuse"])
async def test_full_outbox_applies_its_policy_and_counts_drops(
    demo: DemoArtifacts, tmp_path: Path, policy: str
) -> None:
    port = free_port()  # nothing listens: the device is offline throughout
    source = {"kind": "folder", "path": demo.frames_dir, "max_frames": 30}
    cfg = config(demo, port, "cam-f", tmp_path, source=source, outbox={"max_messages": 8, "when_full": policy})
    agent = EdgeAgent(cfg)
    summary = await agent.run()
    db = tmp_path / "cam-f.db"
    assert summary.completed == 30 and summary.hard == 30
    assert count(db, "SELECT COUNT(*) FROM outbox") == 8
    assert count(db, "SELECT COUNT(*) FROM owed WHERE state = 'waiting'") == 8
    if policy == "drop_oldest":
        assert agent.meter.get("outbox_dropped_total", reason="drop_oldest") == 22
        # the newest eight are kept
        con = sqlite3.connect(db)
        notes = con.execute("SELECT note FROM owed WHERE state = 'waiting'").fetchall()
        kept = sorted(env.decode(env.LocalResults, note).results[0].seq for (note,) in notes)
        con.close()
        assert kept == list(range(22, 30))
    else:
        assert agent.meter.get("escalations_skipped_total", reason="outbox_full") == 22
    assert agent.meter.get("escalations_expired_total") == 0


async def test_offline_device_answers_every_frame_locally_at_local_speed(demo: DemoArtifacts, tmp_path: Path) -> None:
    port = free_port()
    source = {"kind": "folder", "path": demo.frames_dir, "max_frames": 120, "fps": 60}
    offline: list[env.LocalResult] = []
    local_only: list[env.LocalResult] = []
    summary = await EdgeAgent(config(demo, port, "cam-o", tmp_path, source=source), on_result=offline.append).run()
    base = config(demo, port, "cam-l", tmp_path, source=source).model_copy(update={"cloud": None})
    await EdgeAgent(base, on_result=local_only.append).run()
    assert summary.mode == "degraded" and summary.completed == 120
    assert len(offline) == 120 and all(r.degraded and r.state == "COMPLETE" for r in offline)
    ratio = statistics.median(r.latency_ms for r in offline) / statistics.median(r.latency_ms for r in local_only)
    assert ratio < 2.0, f"offline answers took {ratio:.2f}x the local-only latency"


async def test_degraded_when_the_cloud_is_gone_and_back_when_it_answers(
    demo: DemoArtifacts, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    handle = BrokerHandle("mosquitto", "127.0.0.1", mosquitto.port)
    cfg = config(
        demo,
        mosquitto.port,
        "cam-d",
        tmp_path,
        source={"kind": "folder", "path": demo.frames_dir, "fps": 20, "loop": True},
        cloud={"deadline_ms": 400, "degraded_after": 2},
    )
    agent = EdgeAgent(cfg)
    watch = (topics.PRESENCE.build(client_id="cam-d"), topics.LOCAL.build(device_id="cam-d"))
    async with Reader(handle, *watch) as reader:
        run = asyncio.create_task(agent.run())
        try:
            assert await until(lambda: agent.mode == "degraded", 20)
            async with EmbeddedCloud(
                BrokerSettings(url=handle.url), [demo.cloud_model], tmp_path / "cloud", distributor=False
            ):
                assert await until(lambda: agent.mode == "joint", 30)
                await asyncio.sleep(1.0)
                agent.stop()
                await asyncio.wait_for(run, 30)
        finally:
            agent.stop()
            await asyncio.gather(run, return_exceptions=True)
    states = [p.state for p in reader.decoded(topics.PRESENCE) if p.online]  # type: ignore[attr-defined]
    assert "degraded" in states and states.index("degraded") < len(states) - 1
    assert "joint" in states[states.index("degraded") :]
    assert agent.meter.get("mode_transitions_total", to="degraded", reason="timeout") == 1
    results = reader.results()
    late = [r for r in results if r.late]
    assert late and all(r.answered_by == "cloud" for r in late)  # queued while degraded, answered later
    finals = [r for r in results if r.state != "PENDING_CLOUD" and not r.late]
    assert len({r.trace_id for r in finals}) == len(finals)  # one final outcome per frame


async def test_fallback_model_serves_while_degraded_and_overloaded(demo: DemoArtifacts, tmp_path: Path) -> None:
    lite = onnx.load(str(demo.edge_model))
    for prop in lite.metadata_props:
        if prop.key == META_KEY:
            meta = json.loads(prop.value)
            meta["name"] = "digits-edge-lite"
            prop.value = json.dumps(meta)
    onnx.save(lite, str(tmp_path / "lite.onnx"))
    source = {"kind": "folder", "path": demo.frames_dir, "max_frames": 400}  # as fast as it reads: a backlog
    cfg = config(demo, free_port(), "cam-lite", tmp_path, source=source)
    cfg = cfg.model_copy(
        update={
            "model": ModelSettings(path=demo.edge_model, fallback=tmp_path / "lite.onnx"),
            "pipeline": PipelineSettings(queue_size=8, workers=1, max_batch=4),
        }
    )
    seen: list[env.LocalResult] = []
    agent = EdgeAgent(cfg, on_result=seen.append)
    summary = await agent.run()
    assert summary.mode == "degraded" and summary.completed == 400
    by_model = collections.Counter(r.model for r in seen)
    assert by_model["digits-edge-lite"] > 0, by_model  # the lighter model took batches under load
    assert agent.meter.get("fallback_batches_total") > 0
    assert all(r.degraded for r in seen if r.model == "digits-edge-lite")
