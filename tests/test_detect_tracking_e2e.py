"""A detecting device with tracking, against a real broker, the bridge and Triton: each tracked
object goes up once, and the cloud's answer sticks to its track in the frames that follow."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiomqtt
import pytest

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")
pytest.importorskip("sklearn")

from edgewire import envelopes as env
from edgewire import topics
from edgewire.cloud_bridge.triton_server import EmbeddedTriton
from edgewire.config import TrackSettings
from edgewire.demo.detect_run import detect_device_config, write_detect_frames
from edgewire.edge.agent import EdgeAgent

from .conftest import BrokerHandle, Mosquitto
from .test_bridge_e2e import RunningBridge


async def test_each_track_is_escalated_once_and_keeps_the_cloud_answer(
    mosquitto: Mosquitto, triton: EmbeddedTriton, demo_detector: Path, tmp_path: Path
) -> None:
    broker = BrokerHandle("mosquitto", "127.0.0.1", mosquitto.port)
    frames = write_detect_frames(tmp_path / "frames", sequences=2, frames=12)
    cfg = detect_device_config(demo_detector, frames.folder, broker.url, fps=15.0)
    # Never asked again for a change of box or score: every track goes up exactly once.
    track = TrackSettings(enabled=True, min_box_iou=0.0, score_delta=1.0)
    cfg = cfg.model_copy(update={"detect": cfg.detect.model_copy(update={"track": track})})
    results: list[env.LocalResult] = []
    requests: list[env.Request] = []

    async def spy(ready: asyncio.Event) -> None:
        async with aiomqtt.Client(broker.host, broker.port, identifier="req-spy") as client:
            await client.subscribe(topics.REQUEST.filter(), qos=1)
            ready.set()
            async for message in client.messages:
                requests.append(env.decode(env.Request, message.payload))

    ready = asyncio.Event()
    spying = asyncio.create_task(spy(ready))
    await asyncio.wait_for(ready.wait(), 10)
    try:
        async with RunningBridge(broker, triton):
            agent = EdgeAgent(cfg, on_result=results.append)
            summary = await agent.run()
        await asyncio.sleep(0.5)
    finally:
        spying.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await spying

    assert summary.completed == 24 and summary.timeouts == 0
    assert agent.object_frames.tracks is not None and requests
    asked = [c.track_id for r in requests for c in r.crops]
    assert None not in asked
    assert len(asked) == len(set(asked)) == agent.object_frames.tracks.once.escalated  # each track once
    assert agent.object_frames.tracks.once.saved > 0
    assert all(r.task == "detect" and r.payload == b"" for r in requests)  # crops only

    # The cloud's answer for a track is applied to that track's boxes in later frames.
    answers = {
        d.track_id: (d.label, d.score)
        for r in results
        if r.answered_by == "cloud" and r.detections
        for d in r.detections
        if d.track_id in set(asked)
    }
    assert answers
    firsts: dict[str, env.LocalResult] = {}
    for r in results:
        firsts.setdefault(r.trace_id, r)
    sticky = [
        d
        for r in firsts.values()
        for d in r.detections or []
        if d.track_id in answers and (d.label, d.score) == answers[d.track_id]
    ]
    assert sticky
