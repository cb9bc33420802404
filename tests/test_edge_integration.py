"""The device agent against real brokers, read back by a separate MQTT client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import aiomqtt
import cv2
import numpy as np
import yaml

from edgewire import envelopes as env
from edgewire import topics
from edgewire.config import BrokerSettings, DeviceConfig, ModelSettings, SourceSettings
from edgewire.demo.models import DemoArtifacts, label_of
from edgewire.edge.agent import EdgeAgent

from .conftest import BrokerHandle, free_port


def device_config(demo: DemoArtifacts, url: str, **source: object) -> DeviceConfig:
    src = {"kind": "folder", "path": demo.frames_dir, "max_frames": 60, **source}
    return DeviceConfig(
        device_id="cam-01",
        broker=BrokerSettings(url=url, reconnect_min_s=0.05, reconnect_max_s=0.5, startup_wait_s=5),
        source=SourceSettings(**src),
        model=ModelSettings(path=demo.edge_model),
    )


async def spawn_edge_run(cfg: DeviceConfig, folder: Path, *args: str, output: int) -> asyncio.subprocess.Process:
    """`edgewire edge run` in its own process, as systemd would start it."""
    path = folder / "device.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgewire.cli", "edge", "run", "--config", str(path), *args, stdout=output, stderr=output
    )


class Reader:
    """A plain aiomqtt client that collects decoded messages by topic family."""

    def __init__(self, broker: BrokerHandle, *filters: str) -> None:
        self.broker = broker
        self.filters = filters
        self.messages: list[tuple[str, bytes, bool]] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._arrived = asyncio.Event()

    async def __aenter__(self) -> Reader:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        async with aiomqtt.Client(self.broker.host, self.broker.port, identifier=f"reader-{os.getpid()}") as c:
            for f in self.filters:
                await c.subscribe(f, qos=1)
            self._ready.set()
            async for m in c.messages:
                self.messages.append((str(m.topic), bytes(m.payload), bool(m.retain)))
                self._arrived.set()

    def decoded(self, spec: topics.TopicSpec) -> list[env.Envelope]:
        return [env.decode(spec.payload, p) for t, p, _ in self.messages if topics.parse(t).spec is spec]

    def results(self) -> list[env.LocalResult]:
        return [r for batch in self.decoded(topics.LOCAL) for r in batch.results]

    async def wait_results(self, count: int, timeout: float = 10.0) -> list[env.LocalResult]:
        deadline = time.monotonic() + timeout
        while len(found := self.results()) < count and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        return found

    async def wait_for(self, spec: topics.TopicSpec, count: int, timeout: float = 10.0) -> list[env.Envelope]:
        deadline = time.monotonic() + timeout
        while len(found := self.decoded(spec)) < count and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        return found


async def test_device_publishes_every_result_and_its_presence(broker: BrokerHandle, demo: DemoArtifacts) -> None:
    async with Reader(broker, "local/+", "presence/+", "telemetry/+") as reader:
        summary = await EdgeAgent(device_config(demo, broker.url)).run()
        results = await reader.wait_results(60)
        presence = await reader.wait_for(topics.PRESENCE, 2)
        telemetry = await reader.wait_for(topics.TELEMETRY, 1)
    assert summary.completed == 60 and summary.failed == 0
    assert len(results) == 60
    assert [r.seq for r in results] == list(range(60))
    assert {r.device_id for r in results} == {"cam-01"}
    assert all(r.state == "COMPLETE" and r.answered_by == "edge" for r in results)
    assert all(r.degraded == bool(r.reasons) for r in results)
    assert len({r.trace_id for r in results}) == 60
    correct = sum(r.prediction.label == str(label_of(Path(r.source_ref))) for r in results)
    assert correct / 60 > 0.8
    # Birth then goodbye, both for this device, both with the model it runs.
    assert [p.online for p in presence][:2] == [True, False]
    assert presence[0].models == {"digits-edge": "1.0.0"} and presence[0].state == "local-only"
    assert telemetry[-1].metrics["frames_completed_total"] == 60


async def test_mqtt_input_source_survives_bad_messages(broker: BrokerHandle, demo: DemoArtifacts) -> None:
    cfg = device_config(demo, broker.url, kind="mqtt", path=None, max_frames=None)
    agent = EdgeAgent(cfg)
    frames = sorted(demo.frames_dir.glob("*.jpg"))[:5]
    async with Reader(broker, "local/cam-01") as reader:
        run = asyncio.create_task(agent.run())
        await asyncio.sleep(0)
        assert agent.session is not None
        await agent.session.wait_connected(10)
        await asyncio.sleep(0.2)  # the input subscription is made right after connecting
        topic = topics.INPUT.build(device_id="cam-01")
        async with aiomqtt.Client(broker.host, broker.port, identifier="feeder") as feeder:
            await feeder.publish(topic, b"\x93not an envelope", qos=1)
            big = env.Frame(frame_id="big", ts=time.time(), content_type="image/jpeg", data=b"\0" * (5 << 20))
            await feeder.publish(topic, env.encode(big), qos=1)
            notimg = env.Frame(frame_id="junk", ts=time.time(), content_type="image/jpeg", data=b"not a jpeg")
            await feeder.publish(topic, env.encode(notimg), qos=1)
            # 8.6 KB whose header claims 65500 x 65500 pixels: refused unread, the device lives on.
            jpeg = bytearray(frames[0].read_bytes())
            sof = jpeg.index(b"\xff\xc0")
            jpeg[sof + 5 : sof + 9] = (65500).to_bytes(2, "big") * 2
            bomb = env.Frame(frame_id="bomb", ts=time.time(), content_type="image/jpeg", data=bytes(jpeg))
            await feeder.publish(topic, env.encode(bomb), qos=1)
            for path in frames:
                f = env.Frame(frame_id=path.name, ts=time.time(), content_type="image/jpeg", data=path.read_bytes())
                await feeder.publish(topic, env.encode(f), qos=1)
        results = await reader.wait_results(5)
        agent.stop()
        summary = await asyncio.wait_for(run, 10)
    assert [r.source_ref for r in results] == [p.name for p in frames]
    assert summary.failed == 2  # the frame whose data is not an image, and the bomb
    assert agent.meter.get("frames_failed_total", reason="rejected") == 1
    assert agent.meter.get("messages_rejected_total", reason="payload") == 2  # garbage + oversize
    assert summary.completed == 5


async def test_unreadable_frame_is_skipped_and_counted(
    broker: BrokerHandle, demo: DemoArtifacts, tmp_path: Path
) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for p in sorted(demo.frames_dir.glob("*.jpg"))[:4]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "00002-9.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    summary = await EdgeAgent(device_config(demo, broker.url, path=folder)).run()
    assert summary.frames == 5
    assert summary.completed == 4
    assert summary.failed == 1


async def test_device_keeps_answering_without_a_broker(demo: DemoArtifacts) -> None:
    cfg = device_config(demo, f"mqtt://127.0.0.1:{free_port()}", max_frames=30)
    cfg.broker.startup_wait_s = 0.2
    seen: list[env.LocalResult] = []
    agent = EdgeAgent(cfg, on_result=seen.append)
    summary = await asyncio.wait_for(agent.run(), 30)
    assert summary.completed == 30 and len(seen) == 30
    assert agent.meter.total("publish_dropped_total") >= 1  # result batches that had no broker


async def test_endless_folder_at_full_speed_stops_when_told(demo: DemoArtifacts) -> None:
    """Frames of a folder read at full speed are taken as the workers have room (no reader
    task): stopping ends the run, and every frame taken was answered, in order, once."""
    cfg = device_config(demo, f"mqtt://127.0.0.1:{free_port()}", max_frames=None, loop=True)
    cfg.broker.startup_wait_s = 0.2
    seen: list[env.LocalResult] = []
    enough = asyncio.Event()

    def answered(result: env.LocalResult) -> None:
        seen.append(result)
        if len(seen) >= 500:
            enough.set()

    agent = EdgeAgent(cfg, on_result=answered)
    run = asyncio.create_task(agent.run())
    try:
        await asyncio.wait_for(enough.wait(), 60)
        agent.stop()
        summary = await asyncio.wait_for(run, 30)
    finally:
        agent.stop()
        await asyncio.gather(run, return_exceptions=True)
    assert len(seen) >= 500
    assert [r.seq for r in seen] == list(range(len(seen)))
    assert summary.completed == len(seen) and summary.failed == 0


async def test_session_reconnects_and_republishes_birth(demo: DemoArtifacts, tmp_path: Path) -> None:
    from .conftest import Mosquitto

    m = Mosquitto(tmp_path)
    await asyncio.to_thread(m.start)
    handle = BrokerHandle("mosquitto", "127.0.0.1", m.port)
    cfg = device_config(demo, handle.url, kind="mqtt", path=None, max_frames=None)
    agent = EdgeAgent(cfg)
    run = asyncio.create_task(agent.run())
    try:
        await asyncio.sleep(0)
        assert agent.session is not None
        await agent.session.wait_connected(10)
        await asyncio.to_thread(m.stop)
        await asyncio.sleep(0.3)
        assert not agent.session.connected
        await asyncio.to_thread(m.start)  # same port
        await agent.session.wait_connected(10)
        async with Reader(handle, "presence/cam-01") as reader:
            births = await reader.wait_for(topics.PRESENCE, 1)
        assert births and births[0].online is True  # retained birth re-sent after the reconnect
        assert agent.meter.total("mqtt_reconnects_total") >= 1
    finally:
        agent.stop()
        await asyncio.wait_for(run, 10)
        await asyncio.to_thread(m.stop)


async def test_killed_device_leaves_its_last_will(broker: BrokerHandle, demo: DemoArtifacts, tmp_path: Path) -> None:
    cfg = device_config(demo, broker.url, kind="mqtt", path=None, max_frames=None)
    cfg.broker.keepalive = 5
    proc = await spawn_edge_run(cfg, tmp_path, output=asyncio.subprocess.DEVNULL)
    try:
        async with Reader(broker, "presence/cam-01") as reader:
            births = await reader.wait_for(topics.PRESENCE, 1, timeout=30)
            assert births and births[-1].online is True
            proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 5)
            # The broker notices the dead TCP connection and publishes the will.
            wills = await reader.wait_for(topics.PRESENCE, 2, timeout=20)
        assert wills[-1].online is False and wills[-1].client_id == "cam-01"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_edge_run_cli_end_to_end(broker: BrokerHandle, demo: DemoArtifacts, tmp_path: Path) -> None:
    cfg = device_config(demo, broker.url, max_frames=25)
    async with Reader(broker, "local/cam-01") as reader:
        proc = await spawn_edge_run(cfg, tmp_path, "--print", output=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
        results = await reader.wait_results(25)
    assert proc.returncode == 0, stderr.decode()
    assert b"local-only" in stderr and b"25 frames" in stderr
    assert stdout.decode().count("cam-01 #") == 25
    assert len(results) == 25


def test_blurred_frames_escalate_for_blur(demo: DemoArtifacts, tmp_path: Path) -> None:
    from edgewire.preprocess import sharpness

    sharp_frame = cv2.imread(str(sorted(demo.frames_dir.glob("*.jpg"))[0]))
    blurred = cv2.GaussianBlur(sharp_frame, (31, 31), 8)
    assert sharpness(blurred) < sharpness(sharp_frame) / 4
    assert np.isfinite(sharpness(blurred))
