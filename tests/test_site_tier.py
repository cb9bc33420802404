"""The edge-server tier: a site's own bridge and Triton in front of the cloud's, real processes.

A site Mosquitto rendered by ``edgewire flash`` (with a ``tier``) is bridged to a central
Mosquitto; the site's bridge runs the rendered routing rules (the site's model, then
``tier:cloud``) and the central bridge the cloud model. One Triton server serves both models
(two servers are too heavy beside everything else on two cores): ``digits-edge`` stands for the
site's Triton, reached through a TCP relay the test cuts to take the site's Triton down, and
``digits-cloud`` for the cloud's. A device on the site sends requests and counts every message
on its result topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

from edgewire import envelopes as env
from edgewire import topics
from edgewire.cloud_bridge.breaker import BreakerBoard
from edgewire.cloud_bridge.bridge import Bridge
from edgewire.cloud_bridge.dispatch import Dispatcher
from edgewire.cloud_bridge.model_repository import write_python_repository
from edgewire.cloud_bridge.rules import default_rules, load_rules
from edgewire.cloud_bridge.triton_server import EmbeddedTriton
from edgewire.config import BrokerSettings
from edgewire.demo.models import CLOUD_NAME, EDGE_NAME, DemoArtifacts
from edgewire.fleet import flash, sites
from edgewire.ports import free_port, wait_port
from edgewire.preprocess import Preprocessor, decode
from edgewire.session import MqttSession

from .conftest import Mosquitto, stop_process, until
from .test_sites import Relay, site_broker, write_fleet

BUDGET = 32  # more than cam-a1 sends in all; cam-a2 sends 3 more than this
FAST_BREAKER = {"window": 6, "min_calls": 3, "error_rate": 0.5, "open_s": 5.0}


@pytest.fixture(scope="module")
def repository(demo: DemoArtifacts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both demo models in one Triton: the edge model stands for the site's, the cloud model
    for the cloud's."""
    repo = tmp_path_factory.mktemp("triton-tiers") / "repo"
    write_python_repository(repo, [demo.edge_model, demo.cloud_model])
    return repo


async def site_confidences(triton: EmbeddedTriton, frames: list[bytes]) -> list[float]:
    """How sure the site's model is of each frame, asked of the same Triton the site uses."""
    dispatcher = Dispatcher([f"grpc://{triton.grpc_url}"])
    try:
        meta = await dispatcher.model_meta(EDGE_NAME)
        pre = Preprocessor(meta.input)
        out = []
        for frame in frames:
            image = decode(frame, pre.gray)
            assert image is not None
            answer = await dispatcher.call(EDGE_NAME, pre.batch([image]), time.time() + 30)
            assert answer.prediction is not None
            out.append(answer.prediction.confidence)
        return out
    finally:
        await dispatcher.close()


def split_by_confidence(confidences: list[float]) -> float:
    """A bar in the widest gap between neighbouring confidences in the middle half, so that no
    frame sits near it (batching may move a confidence by a rounding error)."""
    ranked = sorted(confidences)
    n = len(ranked)
    lo = max(range(n // 4, 3 * n // 4), key=lambda i: ranked[i + 1] - ranked[i])
    assert ranked[lo + 1] - ranked[lo] > 1e-3, ranked
    return round((ranked[lo] + ranked[lo + 1]) / 2, 6)


def request(device_id: str, payload: bytes, deadline_s: float = 60.0) -> env.Request:
    return env.Request(
        trace_id=secrets.token_hex(16),
        device_id=device_id,
        fleet="plants",
        created=time.time(),
        deadline=time.time() + deadline_s,
        model_hint="digits",
        payload=payload,
        content_type="image/jpeg",
        reply_to=topics.RESULT.build(device_id=device_id),
    )


class Device:
    """A device on the site: sends requests to its site broker and keeps every answer it sees."""

    def __init__(self, device_id: str, port: int) -> None:
        self.device_id = device_id
        self.session = MqttSession(device_id, "127.0.0.1", port, username=device_id, protocol="3.1.1")
        self.answers: dict[str, list[env.Result]] = {}
        self.raw: dict[str, list[bytes]] = {}
        self.requests: dict[str, bytes] = {}  # trace id -> the request's bytes, as an outbox keeps them
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.session.__aenter__()
        await self.session.wait_connected(10)
        await self.session.subscribe(topics.RESULT.build(device_id=self.device_id), qos=1)
        self._task = asyncio.create_task(self._receive())

    async def _receive(self) -> None:
        async for message in self.session.messages():
            result = env.decode(env.Result, bytes(message.payload))
            self.answers.setdefault(result.trace_id, []).append(result)
            self.raw.setdefault(result.trace_id, []).append(bytes(message.payload))

    async def send(self, req: env.Request) -> None:
        self.requests[req.trace_id] = env.encode(req)
        await self.resend(req.trace_id)

    async def resend(self, trace_id: str) -> None:
        topic = topics.REQUEST.build(device_id=self.device_id, trace_id=trace_id)
        await self.session.publish(topic, self.requests[trace_id], qos=1, timeout=10)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.session.close()


def rendered_env(files: dict[str, bytes]) -> dict[str, str]:
    lines = files[sites.SITE_BRIDGE_ENV].decode().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


@pytest.mark.slow
async def test_site_answers_what_it_is_sure_of_the_cloud_the_rest_and_everything_when_the_site_is_down(
    tmp_path: Path, triton: EmbeddedTriton, demo: DemoArtifacts
) -> None:
    frames = [p.read_bytes() for p in sorted(demo.frames_dir.glob("*.jpg"))[:40]]
    confidences = await site_confidences(triton, frames)
    bar = split_by_confidence(confidences)
    sure = [f for f, c in zip(frames, confidences, strict=True) if c >= bar + 1e-4][:8]
    unsure = [f for f, c in zip(frames, confidences, strict=True) if c < bar - 1e-4][:8]
    assert len(sure) == 8 and len(unsure) == 8, (bar, sorted(confidences))

    central = Mosquitto(tmp_path)
    await asyncio.to_thread(central.start)
    site_triton = Relay(int(triton.grpc_url.rsplit(":", 1)[1]))  # the site's Triton, as the site reaches it
    await site_triton.start()
    port_a = free_port()
    write_fleet(tmp_path / "fleet.yaml", port_a, free_port())
    doc = yaml.safe_load((tmp_path / "fleet.yaml").read_text())
    doc["sites"][0]["tier"] = {
        "triton": f"grpc://127.0.0.1:{site_triton.port}",
        "model": EDGE_NAME,
        "min_confidence": bar,
    }
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc))
    rendered = {r.device_id: r.files for r in flash.render(tmp_path / "fleet.yaml")}
    site_files = rendered["site-a"]
    (tmp_path / "site-rules.yaml").write_bytes(site_files[sites.SITE_BRIDGE_RULES])
    settings = rendered_env(site_files)
    broker_url = settings["EDGEWIRE_BROKER"]  # mqtt://site-a-bridge@HOST:PORT (a lab site: no password)
    user, address = broker_url.removeprefix("mqtt://").split("@")

    procs: list[subprocess.Popen[bytes]] = []
    site_dispatcher = Dispatcher([settings["EDGEWIRE_TRITON"]], breakers=BreakerBoard(**FAST_BREAKER))
    central_dispatcher = Dispatcher([f"grpc://{triton.grpc_url}"], breakers=BreakerBoard())
    site_bridge = Bridge(
        user,
        BrokerSettings(url=f"mqtt://{address}", username=user, reconnect_min_s=0.1),
        site_dispatcher,
        load_rules(tmp_path / "site-rules.yaml"),
        # Each device's budget at the site: BUDGET requests, then (no refill to speak of) busy.
        device_rate_per_s=0.001,
        device_burst=BUDGET,
    )

    def cloud_bridge() -> Bridge:
        at_central = BrokerSettings(url=f"mqtt://127.0.0.1:{central.port}", reconnect_min_s=0.1)
        return Bridge("central-bridge", at_central, central_dispatcher, default_rules(CLOUD_NAME))

    central_bridge = cloud_bridge()
    tasks: list[asyncio.Task[None]] = []
    device = Device("cam-a1", port_a)
    busy_device = Device("cam-a2", port_a)
    sent: dict[str, str] = {}  # trace id -> what is expected: site or cloud
    try:
        procs.append(site_broker(site_files, tmp_path, "site-a", central.port))
        await asyncio.to_thread(wait_port, port_a)
        tasks += [asyncio.create_task(central_bridge.run()), asyncio.create_task(site_bridge.run())]
        await asyncio.wait_for(central_bridge.ready.wait(), 30)
        await asyncio.wait_for(site_bridge.ready.wait(), 30)
        await device.start()
        await busy_device.start()
        await asyncio.sleep(2)  # the uplink's subscriptions at the central broker

        # 1. Sure at the site: the site answers. Unsure: the cloud answers.
        for sure_frame, unsure_frame in zip(sure, unsure, strict=True):
            for frame, tier in ((sure_frame, "site"), (unsure_frame, "cloud")):
                req = request("cam-a1", frame)
                sent[req.trace_id] = tier
                await device.send(req)
        assert await until(lambda: set(device.answers) == set(sent), 60), f"{len(device.answers)} of {len(sent)}"
        await asyncio.sleep(2)  # room for a second answer, were there one
        for trace_id, tier in sent.items():
            (answer,) = device.answers[trace_id]  # exactly one answer per request
            assert answer.status == "ok" and answer.tier == tier, (answer, tier)
            if tier == "site":
                assert (answer.bridge_id, answer.model) == (user, EDGE_NAME)
                assert answer.prediction is not None and answer.prediction.confidence >= bar
                assert "handed_up" not in answer.hops
            else:
                assert (answer.bridge_id, answer.model) == ("central-bridge", CLOUD_NAME)
                stamps = ["site_received", "handed_up", "bridge_received", "bridge_sent", "site_relayed"]
                assert [answer.hops[s] for s in stamps] == sorted(answer.hops[s] for s in stamps)
        assert site_bridge.meter.get("requests_handed_up_total", why="unsure") == 8
        assert central_bridge.meter.total("requests_total") == 8  # the cloud ran only what went up

        # A device's resend of a request the cloud answered: the same answer again, run nowhere.
        resent = next(t for t, tier in sent.items() if tier == "cloud")
        await device.resend(resent)
        assert await until(lambda: len(device.raw[resent]) == 2, 30)
        assert device.raw[resent][0] == device.raw[resent][1]
        assert site_bridge.meter.get("requests_duplicate_total", state="answered") == 1
        assert central_bridge.meter.total("requests_total") == 8

        # 2. Busy: a device past its budget at the site is served by the cloud.
        burst = [request("cam-a2", sure[i % len(sure)]) for i in range(BUDGET + 3)]
        for req in burst:
            await busy_device.send(req)
        assert await until(lambda: len(busy_device.answers) == len(burst), 60), f"{len(busy_device.answers)} answered"
        await asyncio.sleep(1)
        tiers = [busy_device.answers[req.trace_id] for req in burst]
        assert all(len(answers) == 1 and answers[0].status == "ok" for answers in tiers)
        assert sorted(answers[0].tier or "" for answers in tiers) == ["cloud"] * 3 + ["site"] * BUDGET
        assert site_bridge.meter.get("requests_handed_up_total", why="busy") == 3
        assert central_bridge.meter.total("requests_total") == 8 + 3

        # 3. The cloud down: an unsure request gets the site's own answer before its deadline, and
        # the cloud's answer arriving later is not sent on (the device sees one answer).
        central_bridge.stop()
        await asyncio.wait_for(tasks[0], 30)
        cloudless = [request("cam-a1", frame, deadline_s=6.0) for frame in unsure[:4]]
        for req in cloudless:
            await device.send(req)
        assert await until(lambda: all(r.trace_id in device.answers for r in cloudless), 30)
        for req in cloudless:
            (answer,) = device.answers[req.trace_id]
            assert (answer.status, answer.tier, answer.bridge_id) == ("ok", "site", user)
            assert answer.prediction is not None and answer.prediction.confidence < bar
            assert answer.hops["bridge_sent"] < req.deadline  # in time for the device
        central_bridge = cloud_bridge()  # back: it answers what waited for it at the central broker
        tasks[0] = asyncio.create_task(central_bridge.run())
        assert await until(lambda: site_bridge.meter.get("upstream_answers_unmatched_total") == 4, 30)
        await asyncio.sleep(1)
        assert all(len(device.answers[req.trace_id]) == 1 for req in cloudless)

        # 4. The site's Triton down: every request is answered by the cloud, once.
        await site_triton.cut()
        down: dict[str, str] = {}
        for frame in sure[:4] + unsure[:4]:
            req = request("cam-a1", frame)
            down[req.trace_id] = "cloud"
            await device.send(req)
        assert await until(lambda: set(device.answers) >= set(down), 60), f"{len(device.answers)} answered"
        await asyncio.sleep(2)
        for trace_id in down:
            (answer,) = device.answers[trace_id]
            assert answer.status == "ok" and answer.tier == "cloud" and answer.bridge_id == "central-bridge"
        handed = site_bridge.meter.total("requests_handed_up_total")
        assert handed == 8 + 3 + 4 + 8 and site_bridge.meter.get("requests_handed_up_total", why="unsure") == 8 + 4
        # The cloud answered each request it got once: phase 4's, and phase 3's (ok, or expired when
        # its deadline passed first), which the site did not send on.
        assert central_bridge.meter.total("requests_total") == 8 + 4
        assert central_bridge.meter.total("requests_duplicate_total") == 0
        answered = len(sent) + len(burst) + len(cloudless) + len(down)
        assert site_bridge.meter.total("requests_total") == answered
        assert sum(map(len, device.answers.values())) + sum(map(len, busy_device.answers.values())) == answered + 1
    finally:
        await device.close()
        await busy_device.close()
        for bridge in (site_bridge, central_bridge):
            bridge.stop()
        for task in tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
        await site_dispatcher.close()
        await central_dispatcher.close()
        with contextlib.suppress(Exception):
            await site_triton.cut()
        for proc in procs:
            stop_process(proc, 5)
        await asyncio.to_thread(central.stop)


async def test_a_site_without_triton_hands_up_and_a_stopping_site_bridge_answers_what_waits(
    tmp_path: Path, demo: DemoArtifacts
) -> None:
    """No Triton anywhere: the site is down, so every request goes up; the cloud's answer
    (``unavailable``: its Triton is down too) comes back once, through the site bridge. With the
    cloud bridge gone, a site bridge that stops answers the request waiting for the cloud at once
    (``unavailable``: the device asks again later) instead of holding its stop."""
    frame = sorted(demo.frames_dir.glob("*.jpg"))[0].read_bytes()
    central = Mosquitto(tmp_path)
    await asyncio.to_thread(central.start)
    port_a = free_port()
    write_fleet(tmp_path / "fleet.yaml", port_a, free_port())
    doc = yaml.safe_load((tmp_path / "fleet.yaml").read_text())
    nowhere = f"grpc://127.0.0.1:{free_port()}"
    doc["sites"][0]["tier"] = {"triton": nowhere, "model": EDGE_NAME}
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc))
    site_files = {r.device_id: r.files for r in flash.render(tmp_path / "fleet.yaml")}["site-a"]
    (tmp_path / "site-rules.yaml").write_bytes(site_files[sites.SITE_BRIDGE_RULES])
    dispatchers = [Dispatcher([nowhere], call_timeout_s=2.0) for _ in range(2)]
    site_bridge = Bridge(
        "site-a-bridge",
        BrokerSettings(url=f"mqtt://127.0.0.1:{port_a}", username="site-a-bridge", reconnect_min_s=0.1),
        dispatchers[0],
        load_rules(tmp_path / "site-rules.yaml"),
    )
    at_central = BrokerSettings(url=f"mqtt://127.0.0.1:{central.port}", reconnect_min_s=0.1)
    central_bridge = Bridge("central-bridge", at_central, dispatchers[1], default_rules(CLOUD_NAME))
    device = Device("cam-a1", port_a)
    procs: list[subprocess.Popen[bytes]] = []
    tasks: dict[str, asyncio.Task[None]] = {}
    try:
        procs.append(site_broker(site_files, tmp_path, "site-a", central.port))
        await asyncio.to_thread(wait_port, port_a)
        tasks["central"] = asyncio.create_task(central_bridge.run())
        tasks["site"] = asyncio.create_task(site_bridge.run())
        await asyncio.wait_for(central_bridge.ready.wait(), 30)
        await asyncio.wait_for(site_bridge.ready.wait(), 30)
        await device.start()
        await asyncio.sleep(2)  # the uplink's subscriptions at the central broker

        first = request("cam-a1", frame)
        await device.send(first)
        assert await until(lambda: first.trace_id in device.answers, 30)
        await asyncio.sleep(1)
        (answer,) = device.answers[first.trace_id]
        assert (answer.status, answer.tier, answer.bridge_id) == ("unavailable", "cloud", "central-bridge")
        assert {"site_received", "handed_up", "site_relayed"} <= set(answer.hops)
        assert site_bridge.meter.get("requests_handed_up_total", why="down") == 1

        central_bridge.stop()
        await asyncio.wait_for(tasks.pop("central"), 30)
        waiting = request("cam-a1", frame)
        await device.send(waiting)
        assert await until(lambda: site_bridge.meter.total("requests_handed_up_total") == 2, 30)
        stopped_at = time.monotonic()
        site_bridge.stop()
        await asyncio.wait_for(tasks.pop("site"), 30)
        assert time.monotonic() - stopped_at < 20  # not the 600 s it would wait for the cloud
        assert await until(lambda: waiting.trace_id in device.answers, 10)
        (answer,) = device.answers[waiting.trace_id]
        assert (answer.status, answer.tier, answer.bridge_id) == ("unavailable", "site", "site-a-bridge")
    finally:
        await device.close()
        for bridge in (site_bridge, central_bridge):
            bridge.stop()
        for task in tasks.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
        for dispatcher in dispatchers:
            await dispatcher.close()
        for proc in procs:
            stop_process(proc, 5)
        await asyncio.to_thread(central.stop)
