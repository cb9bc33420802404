"""A flooding neighbour, end to end: a real broker, the bridge and a real Triton. One device
sends requests as fast as its connection takes them; another escalates its hard frames as a
device does. The flood is refused with a counted reason (answered ``rate limited`` up to the
refusals' budget, dropped unanswered past it), and every escalation of the other device ends
with the cloud's answer. Correctness only: the latency figures are bench/flood.py's."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from pathlib import Path

import aiomqtt
import pytest

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

from edgewire import envelopes as env
from edgewire import topics
from edgewire.cloud_bridge.triton_server import EmbeddedTriton
from edgewire.demo.models import DemoArtifacts
from edgewire.edge.agent import EdgeAgent
from edgewire.ratelimit import BucketsPerKey

from .conftest import BrokerHandle, Mosquitto, until
from .invariants import until_quiet
from .test_bridge_e2e import ResultReader, RunningBridge, device, request


class Flooder:
    """A device that publishes valid requests back to back while ``on``, and keeps its answers."""

    def __init__(self, broker: BrokerHandle, device_id: str, payload: bytes) -> None:
        self.broker = broker
        self.device_id = device_id
        self.payload = payload
        self.sent = 0
        self.answers: list[env.Result] = []
        self.ready = asyncio.Event()
        self.on = True

    async def run(self) -> None:
        async with aiomqtt.Client(self.broker.host, self.broker.port, identifier=self.device_id) as client:
            await client.subscribe(topics.RESULT.build(device_id=self.device_id), qos=1)
            reader = asyncio.create_task(self._read(client))
            self.ready.set()
            try:
                while self.on:
                    trace_id = f"{self.sent:032x}"
                    req = request(self.device_id, trace_id, self.payload, deadline=time.time() + 60)
                    topic = topics.REQUEST.build(device_id=self.device_id, trace_id=trace_id)
                    await client.publish(topic, env.encode(req), qos=1)
                    self.sent += 1
                await until_quiet(lambda: len(self.answers), quiet_s=1.5, timeout=30)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self.answers.append(env.decode(env.Result, message.payload))


async def test_a_flooding_neighbour_is_refused_and_every_escalation_is_answered(
    broker: BrokerHandle, triton: EmbeddedTriton, demo: DemoArtifacts
) -> None:
    payload = sorted(demo.frames_dir.glob("*.jpg"))[0].read_bytes()
    # Without the flood shield, so that every flooded request reaches the bridge and is counted
    # (the shield, which leaves them at the broker, is tests/test_flood_shield.py's).
    running = RunningBridge(broker, triton, flood_shield=False)
    # Each device: 40 requests at once, then 10 a second (the escalating device, 40 frames at
    # 20 a second, stays inside it); refusals: 20 at once, then 2 a second.
    running.bridge.admission.budgets = BucketsPerKey(10.0, 40.0)
    running.bridge.admission.refusals = BucketsPerKey(2.0, 20.0)
    seen: list[env.LocalResult] = []
    async with running as bridge:
        flooder = Flooder(broker, "cam-flood", payload)
        flooding = asyncio.create_task(flooder.run())
        await asyncio.wait_for(flooder.ready.wait(), 10)
        started = time.monotonic()
        agent = EdgeAgent(device(demo, broker.url, "cam-calm", max_frames=40, fps=20), on_result=seen.append)
        summary = await agent.run()
        assert await until(lambda: flooder.sent >= 300, 60)  # however slow the machine: past both budgets
        flooder.on = False
        elapsed = time.monotonic() - started
        await flooding
    # The calm device: every escalated frame ended with the cloud's answer, none refused.
    finals = [r for r in seen if r.state != "PENDING_CLOUD"]
    pending = {r.trace_id for r in seen if r.state == "PENDING_CLOUD"}
    assert summary.completed == 40 and len(finals) == 40
    assert summary.escalated == len(pending) > 5
    by_cloud = {r.trace_id for r in finals if r.answered_by == "cloud"}
    assert by_cloud == pending, (len(by_cloud), len(pending))
    assert summary.timeouts == 0
    assert agent.meter.get("results_total", status="ok") == len(pending)
    # The flood: answered ok inside its budget, refused with the reason past it, counted.
    ok = [r for r in flooder.answers if r.status == "ok"]
    refused = [r for r in flooder.answers if r.status != "ok"]
    assert all(r.status == "rejected" and r.reason == env.RATE_LIMITED for r in refused)
    assert len({r.trace_id for r in flooder.answers}) == len(flooder.answers)  # one answer each, at most
    assert 0 < len(ok) <= 40 + 10 * elapsed + 1
    limited = bridge.meter.total("requests_rate_limited_total")
    assert limited + len(ok) == flooder.sent  # every request either served or counted as refused
    answered = bridge.meter.get("requests_rate_limited_total", answered="yes")
    assert 0 < len(refused) <= answered <= 20 + 2 * elapsed + 1
    assert bridge.meter.get("requests_rate_limited_total", answered="no") == limited - answered > 0
    assert bridge.meter.get("requests_total", status="ok") == len(ok) + len(pending)


async def test_the_bridge_command_s_device_budget_refuses_a_burst_past_it_and_serves_another_device(
    mosquitto: Mosquitto, triton: EmbeddedTriton, demo: DemoArtifacts, tmp_path: Path
) -> None:
    """``edgewire bridge --device-rate 2 --device-burst 2``, as an operator starts it: a device
    sending 30 requests at once gets 2 (and what 2/s refilled) served and the rest answered
    ``rate limited``, while another device's requests, each within its own budget, are served."""
    jpeg = sorted(demo.frames_dir.glob("*.jpg"))[0].read_bytes()
    broker = BrokerHandle("mosquitto", "127.0.0.1", mosquitto.port)
    notify_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    log = tmp_path / "bridge.log"
    with log.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgewire.cli", "bridge", "--triton", f"grpc://{triton.grpc_url}",
            "--broker", broker.url, "--id", "bridge-budget", "--decode-workers", "0",
            "--device-rate", "2", "--device-burst", "2",
            env={**os.environ, "NOTIFY_SOCKET": notify_path}, stdout=asyncio.subprocess.DEVNULL, stderr=log_file,
        )  # fmt: skip
    try:
        notify.settimeout(60)  # READY=1 once it is subscribed to the requests; a loaded machine is slow
        ready = await asyncio.to_thread(notify.recv, 4096)
        assert ready.startswith(b"READY=1"), ready
        async with ResultReader(broker, "cam-flood") as flood, ResultReader(broker, "cam-calm") as calm:
            started = time.monotonic()
            for i in range(30):
                await flood.send(request("cam-flood", f"f{i:04d}", jpeg, deadline=time.time() + 60))
            for i in range(2):  # behind the flood, and inside its own budget
                await calm.send(request("cam-calm", f"c{i:04d}", jpeg, deadline=time.time() + 60))
            flooded = await flood.wait(30, timeout=60)
            elapsed = time.monotonic() - started
            answers = await calm.wait(2, timeout=60)
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)
        notify.close()
    assert [r.status for r in answers] == ["ok", "ok"], log.read_text()
    ok = [r for r in flooded if r.status == "ok"]
    limited = [r for r in flooded if r.status == "rejected" and r.reason == env.RATE_LIMITED]
    assert len(flooded) == 30 and len(ok) + len(limited) == 30, [(r.status, r.reason) for r in flooded]
    # 2 from the burst, and at most 2/s more while the 30 arrived.
    assert 2 <= len(ok) <= 2 + 2 * elapsed + 1, (len(ok), elapsed)
    assert len(limited) >= 30 - 2 - 2 * elapsed - 1 and limited
