"""Edge-cloud joint inference end to end: devices, a real broker, the bridge, a real Triton."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import aiomqtt
import pytest

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

from edgewire import envelopes as env
from edgewire import topics
from edgewire.cloud_bridge.breaker import BreakerBoard
from edgewire.cloud_bridge.bridge import Bridge
from edgewire.cloud_bridge.dispatch import Dispatcher, failed_status
from edgewire.cloud_bridge.rules import RuleSet, default_rules, load_rules
from edgewire.cloud_bridge.triton_server import EmbeddedTriton
from edgewire.config import BrokerSettings, CloudSettings, DeviceConfig, JudgeSettings, ModelSettings, SourceSettings
from edgewire.demo.models import DemoArtifacts, label_of
from edgewire.edge.agent import EdgeAgent

from .conftest import BrokerHandle, Mosquitto
from .invariants import until_quiet

FAST_BREAKER = {"window": 6, "min_calls": 3, "error_rate": 0.5, "open_s": 0.5}


class RunningBridge:
    def __init__(self, broker: BrokerHandle, triton: EmbeddedTriton, rules: RuleSet | None = None, **kw: object):
        breaker: dict[str, float] = kw.pop("breaker", FAST_BREAKER)  # type: ignore[assignment]
        self.dispatcher = Dispatcher([f"grpc://{triton.grpc_url}"], breakers=BreakerBoard(**breaker))
        self.bridge = Bridge(
            kw.pop("bridge_id", "bridge-t"),  # type: ignore[arg-type]
            BrokerSettings(url=broker.url, reconnect_min_s=0.05, reconnect_max_s=0.5),
            self.dispatcher,
            rules or default_rules("digits-cloud"),
            **kw,  # type: ignore[arg-type]
        )
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Bridge:
        self.task = asyncio.create_task(self.bridge.run())
        await asyncio.wait_for(self.bridge.ready.wait(), 15)
        return self.bridge

    async def __aexit__(self, *exc: object) -> None:
        self.bridge.stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, 30)
        await self.dispatcher.close()


def device(demo: DemoArtifacts, url: str, device_id: str, **source: object) -> DeviceConfig:
    src = {"kind": "folder", "path": demo.frames_dir, "max_frames": 80, **source}
    return DeviceConfig(
        device_id=device_id,
        fleet="lab",
        broker=BrokerSettings(url=url, reconnect_min_s=0.05, reconnect_max_s=0.5),
        source=SourceSettings(**src),
        model=ModelSettings(path=demo.edge_model),
        judge=JudgeSettings(min_confidence=0.8),
        cloud=CloudSettings(deadline_ms=5000, model_hint="digits"),
    )


def request(device_id: str, trace_id: str, payload: bytes, **kw: object) -> env.Request:
    fields: dict[str, object] = {
        "trace_id": trace_id,
        "device_id": device_id,
        "created": time.time(),
        "deadline": time.time() + 10,
        "model_hint": "digits",
        "payload": payload,
        "content_type": "image/jpeg",
        "reply_to": topics.RESULT.build(device_id=device_id),
    }
    fields.update(kw)
    return env.Request(**fields)  # type: ignore[arg-type]


class ResultReader:
    """A device stand-in: a plain MQTT client on result/<device>."""

    def __init__(self, broker: BrokerHandle, device_id: str) -> None:
        self.broker = broker
        self.device_id = device_id
        self.results: list[env.Result] = []
        self.raw: list[bytes] = []
        self._got = asyncio.Event()
        self._ready = asyncio.Event()
        self.client: aiomqtt.Client | None = None

    async def __aenter__(self) -> ResultReader:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        async with aiomqtt.Client(self.broker.host, self.broker.port, identifier=f"dev-{self.device_id}") as c:
            self.client = c
            await c.subscribe(topics.RESULT.build(device_id=self.device_id), qos=1)
            self._ready.set()
            async for m in c.messages:
                self.raw.append(bytes(m.payload))
                self.results.append(env.decode(env.Result, m.payload))
                self._got.set()

    async def send(self, req: env.Request | bytes, trace_id: str | None = None) -> None:
        assert self.client is not None
        data = req if isinstance(req, bytes) else env.encode(req)
        tid = trace_id or (req.trace_id if isinstance(req, env.Request) else "t")
        await self.client.publish(topics.REQUEST.build(device_id=self.device_id, trace_id=tid), data, qos=1)

    async def wait(self, count: int, timeout: float = 15) -> list[env.Result]:
        deadline = time.monotonic() + timeout
        while len(self.results) < count and (left := deadline - time.monotonic()) > 0:
            self._got.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._got.wait(), left)
        return self.results


async def test_joint_inference_two_devices(broker: BrokerHandle, triton: EmbeddedTriton, demo: DemoArtifacts) -> None:
    seen: dict[str, list[env.LocalResult]] = {"cam-a": [], "cam-b": []}
    async with RunningBridge(broker, triton) as bridge:
        agents = [EdgeAgent(device(demo, broker.url, d), on_result=seen[d].append) for d in seen]
        summaries = await asyncio.gather(*(a.run() for a in agents))
    for agent, summary in zip(agents, summaries, strict=True):
        finals = [r for r in seen[agent.config.device_id] if r.state != "PENDING_CLOUD"]
        pending = {r.trace_id for r in seen[agent.config.device_id] if r.state == "PENDING_CLOUD"}
        assert summary.completed == 80 and len(finals) == 80
        assert summary.escalated == len(pending) > 5
        assert summary.timeouts == 0
        by_cloud = [r for r in finals if r.answered_by == "cloud"]
        assert {r.trace_id for r in by_cloud} == pending  # every escalation answered, with its own trace_id
        assert all(r.model == "digits-cloud" and not r.degraded for r in by_cloud)
        assert agent.meter.total("results_ignored_total") == 0  # no answer meant for the other device
        edge_right = sum(
            r.prediction.label == str(label_of(Path(r.source_ref)))
            for r in seen[agent.config.device_id]
            if r.answered_by == "edge" and (r.state == "PENDING_CLOUD" or r.trace_id not in pending)
        )
        joint_right = sum(r.prediction.label == str(label_of(Path(r.source_ref))) for r in finals)
        assert joint_right > edge_right
    assert bridge.meter.get("requests_total", status="ok") == sum(s.escalated for s in summaries)


async def test_duplicate_request_runs_once_and_is_answered_twice(
    broker: BrokerHandle, triton: EmbeddedTriton, demo: DemoArtifacts
) -> None:
    jpeg = sorted(demo.frames_dir.glob("*.jpg"))[0].read_bytes()
    async with RunningBridge(broker, triton) as bridge, ResultReader(broker, "cam-d") as dev:
        req = request("cam-d", "dup-1", jpeg)
        await dev.send(req)
        await dev.wait(1)
        await dev.send(req)
        results = await dev.wait(2)
        assert [r.trace_id for r in results] == ["dup-1", "dup-1"]
        assert dev.raw[0] == dev.raw[1]
        assert results[0].status == "ok" and results[0].prediction is not None
        assert bridge.meter.total("triton_calls_total") == 1
        assert bridge.meter.total("requests_duplicate_total") == 1


async def test_bad_requests_are_answered_with_reasons(
    broker: BrokerHandle, triton: EmbeddedTriton, demo: DemoArtifacts, tmp_path: Path
) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text("rules:\n  - name: digits\n    when: {model_hint: 'digits*'}\n    route_to: [digits-cloud]\n")
    jpeg = sorted(demo.frames_dir.glob("*.jpg"))[0].read_bytes()
    async with RunningBridge(broker, triton, load_rules(rules_file)) as bridge, ResultReader(broker, "cam-x") as dev:
        await dev.send(b"\x81\xa1v\x01 garbage", trace_id="bad-1")
        await dev.send(request("cam-x", "bad-2", jpeg, model_hint="faces"))
        await dev.send(request("cam-x", "bad-3", b"not an image"))
        bomb = bytearray(jpeg)
        sof = bomb.index(b"\xff\xc0")
        bomb[sof + 5 : sof + 9] = (65500).to_bytes(2, "big") * 2  # 65500 x 65500 declared
        await dev.send(request("cam-x", "bad-7", bytes(bomb)))
        await dev.send(request("cam-x", "bad-4", jpeg, deadline=time.time() - 1))
        await dev.send(request("cam-x", "bad-5", jpeg, reply_to="result/someone-else"))
        await dev.send(request("cam-x", "good-6", jpeg))
        results = {r.trace_id: r for r in await dev.wait(7)}
    assert results["bad-1"].status == "rejected" and "malformed" in (results["bad-1"].reason or "")
    assert results["bad-2"].status == "rejected" and "no route" in (results["bad-2"].reason or "")
    assert results["bad-3"].status == "rejected" and "not a decodable image" in (results["bad-3"].reason or "")
    assert results["bad-7"].status == "rejected"
    assert results["bad-4"].status == "expired"
    assert results["bad-5"].status == "rejected" and "reply_to" in (results["bad-5"].reason or "")
    assert results["good-6"].status == "ok"
    assert results["good-6"].timings.total_ms >= results["good-6"].timings.inference_ms > 0
    assert bridge.meter.get("requests_failed_total", status="rejected") == 5
    assert bridge.meter.get("requests_failed_total", status="expired") == 1


async def test_circuit_opens_without_triton_and_recovers(
    repository: Path, demo: DemoArtifacts, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    handle = BrokerHandle("mosquitto", "127.0.0.1", mosquitto.port)
    jpeg = sorted(demo.frames_dir.glob("*.jpg"))[0].read_bytes()
    server = EmbeddedTriton(repository, workdir=tmp_path)
    await server.start()
    # Open long enough that the request sent after the failures surely finds it open, however
    # slowly a loaded machine answers them.
    breaker = {**FAST_BREAKER, "open_s": 5.0}
    try:
        async with RunningBridge(handle, server, breaker=breaker) as bridge, ResultReader(handle, "cam-c") as dev:
            await dev.send(request("cam-c", "warm", jpeg))
            assert (await dev.wait(1))[0].status == "ok"
            await server.stop()
            for i in range(6):
                await dev.send(request("cam-c", f"down-{i}", jpeg))
            down = (await dev.wait(7))[1:]
            assert [r.status for r in down] == ["unavailable"] * 6
            assert "open" in bridge.dispatcher.breakers.states().values()
            # On a loaded machine the six may all be read in one pass and admitted before the
            # first failure is known; the one after them is refused without a call.
            await dev.send(request("cam-c", "down-6", jpeg))
            refused = (await dev.wait(8))[-1]
            assert refused.trace_id == "down-6" and refused.status == "unavailable"
            assert "circuit open" in (refused.reason or "")
            # A device keeps answering from its local model meanwhile.
            cfg = device(demo, handle.url, "cam-c2", max_frames=20)
            seen: list[env.LocalResult] = []
            summary = await EdgeAgent(cfg, on_result=seen.append).run()
            finals = [r for r in seen if r.state != "PENDING_CLOUD"]
            assert summary.completed == 20 and len(finals) == 20
            assert all(r.answered_by == "edge" for r in finals)
            assert all(r.degraded for r in finals if r.reasons)
            await server.start()
            await asyncio.sleep(breaker["open_s"] + 0.1)
            deadline = time.monotonic() + 15
            status = ""
            i = 0
            while status != "ok" and time.monotonic() < deadline:
                await dev.send(request("cam-c", f"up-{i}", jpeg))
                status = (await dev.wait(9 + i))[-1].status
                i += 1
                await asyncio.sleep(0.2)
            assert status == "ok"
            assert set(bridge.dispatcher.breakers.states().values()) == {"closed"}
    finally:
        await server.stop()


async def test_bridge_restart_loses_nothing_acknowledged(
    triton: EmbeddedTriton, demo: DemoArtifacts, mosquitto: Mosquitto
) -> None:
    handle = BrokerHandle("mosquitto", "127.0.0.1", mosquitto.port)
    jpeg = sorted(demo.frames_dir.glob("*.jpg"))[0].read_bytes()
    async with ResultReader(handle, "cam-r") as dev:
        async with RunningBridge(handle, triton, bridge_id="bridge-r") as first:
            for i in range(20):
                await dev.send(request("cam-r", f"r-{i}", jpeg))
        # Bridge gone: these wait at the broker in its persistent session.
        for i in range(20, 40):
            await dev.send(request("cam-r", f"r-{i}", jpeg))
        async with RunningBridge(handle, triton, bridge_id="bridge-r") as bridge:
            await dev.wait(40, timeout=60)
            # Listen until quiet, not until the count: a late duplicate must have time to show.
            assert await until_quiet(lambda: len(dev.results), quiet_s=2.0, timeout=30)
            results = list(dev.results)
    ids = sorted(r.trace_id for r in results)
    assert ids == sorted(f"r-{i}" for i in range(40))  # each exactly once
    bridges = (first, bridge)
    assert sum(b.meter.total("requests_total") for b in bridges) == 40  # none ran twice
    assert sum(b.meter.total("requests_duplicate_total") for b in bridges) == 0
    assert all(r.status == "ok" for r in results)


async def test_bridge_reports_model_readiness_from_triton(broker: BrokerHandle, triton: EmbeddedTriton) -> None:
    rules = RuleSet(rules=[], default=default_rules("digits-cloud").default)
    async with RunningBridge(broker, triton, rules) as bridge:
        health = await bridge.dispatcher.health({"digits-cloud", "no-such-model"})
        await bridge._check_health()
    url = f"grpc://{triton.grpc_url}"
    assert health == {(url, "digits-cloud"): True, (url, "no-such-model"): False}
    assert bridge.meter.get("triton_model_ready", endpoint=url, model="digits-cloud") == 1.0


async def test_a_device_with_impossible_deadlines_does_not_open_the_circuit_for_others(
    broker: BrokerHandle, triton: EmbeddedTriton, demo: DemoArtifacts
) -> None:
    """Requests whose deadline is NaN, or a couple of milliseconds ahead, are the asker's problem:
    refused or expired, never counted against Triton, so another device's requests are served."""
    jpeg = sorted(demo.frames_dir.glob("*.jpg"))[0].read_bytes()
    async with (
        RunningBridge(broker, triton) as bridge,
        ResultReader(broker, "cam-rude") as rude,
        ResultReader(broker, "cam-fair") as fair,
    ):
        await rude.send(request("cam-rude", "nan", jpeg, deadline=float("nan")))
        for i in range(40):
            # 2 to 41 ms ahead: some expire before dispatch, some reach Triton with no time left.
            await rude.send(request("cam-rude", f"tight-{i}", jpeg, deadline=time.time() + 0.002 + i / 1000))
            if i % 4 == 0:
                await fair.send(request("cam-fair", f"fair-{i}", jpeg))
        rude_results = {r.trace_id: r for r in await rude.wait(41, timeout=60)}
        fair_results = await fair.wait(10, timeout=60)
        states = bridge.dispatcher.breakers.states()
        errors = bridge.dispatcher.meter.total("triton_errors_total")
    assert errors == 0  # a deadline that ran out during a call is the asker's, not Triton's
    assert rude_results["nan"].status == "rejected" and "finite" in (rude_results["nan"].reason or "")
    assert len(rude_results) == 41
    assert all(r.status in ("expired", "ok") for t, r in rude_results.items() if t != "nan")
    assert [r.status for r in fair_results] == ["ok"] * 10, [(r.status, r.reason) for r in fair_results]
    assert set(states.values()) <= {"closed"}, states


async def test_a_trace_id_sent_first_by_another_device_does_not_take_the_answer(
    broker: BrokerHandle, triton: EmbeddedTriton, demo: DemoArtifacts
) -> None:
    """Answers are kept per (device, trace id): a device that sends another's next trace id
    first is served its own request, and the owner still gets the answer to its own frame."""
    frames = sorted(demo.frames_dir.glob("*.jpg"))
    by_label: dict[int, Path] = {}
    for frame in frames:
        by_label.setdefault(label_of(frame), frame)
    mine, theirs = by_label[min(by_label)], by_label[max(by_label)]
    async with (
        RunningBridge(broker, triton) as bridge,
        ResultReader(broker, "cam-owner") as owner,
        ResultReader(broker, "cam-thief") as thief,
    ):
        stolen = "0123456789abcdef0123456789abcdef"
        await thief.send(request("cam-thief", stolen, theirs.read_bytes()))
        assert len(await thief.wait(1)) == 1
        await owner.send(request("cam-owner", stolen, mine.read_bytes()))
        answers = await owner.wait(1)
        await asyncio.sleep(0.3)  # room for a stray answer to arrive where it must not
    assert len(answers) == 1 and len(thief.results) == 1
    assert answers[0].device_id == "cam-owner" and answers[0].status == "ok"
    assert thief.results[0].device_id == "cam-thief"
    assert owner.raw[0] != thief.raw[0]
    assert bridge.meter.total("requests_duplicate_total") == 0
    assert bridge.meter.total("triton_calls_total") == 2


async def test_a_flooding_device_is_rate_limited_and_does_not_starve_another(
    broker: BrokerHandle, triton: EmbeddedTriton, demo: DemoArtifacts
) -> None:
    """One device sends far past its budget at once; the excess is answered `rejected: rate
    limited` without reaching Triton, and another device's requests are all answered."""
    jpeg = sorted(demo.frames_dir.glob("*.jpg"))[0].read_bytes()
    running = RunningBridge(broker, triton)
    running.bridge.admission.budgets = type(running.bridge.admission.budgets)(2.0, 10.0)  # 10 at once, then 2/s
    async with running as bridge, ResultReader(broker, "cam-flood") as flood, ResultReader(broker, "cam-calm") as calm:
        started = time.monotonic()
        for i in range(60):
            await flood.send(request("cam-flood", f"f{i:04d}", jpeg))
        for i in range(5):
            await calm.send(request("cam-calm", f"c{i:04d}", jpeg))
        flooded = await flood.wait(60, timeout=30)
        elapsed = time.monotonic() - started
        answers = await calm.wait(5, timeout=30)
    assert len(answers) == 5 and all(r.status == "ok" for r in answers)
    limited = [r for r in flooded if r.reason == "rate limited"]
    assert len(flooded) == 60 and all(r.status == "rejected" for r in limited)
    # 10 served from the burst, and at most 2/s more while the 60 arrived.
    assert 60 - 10 - 2 * elapsed - 1 <= len(limited) <= 50
    assert bridge.meter.total("requests_rate_limited_total") == len(limited)
    assert bridge.meter.get("requests_total", status="ok") == 60 - len(limited) + 5


def test_a_request_the_models_could_not_answer_is_expired_only_past_its_deadline() -> None:
    """The classify and the detect path tell a failed request the same thing: ``unavailable``
    (ask again) while the device still waits, ``expired`` once it has stopped waiting."""
    now = time.time()
    assert failed_status(now + 60) == "unavailable"
    assert failed_status(now - 1) == "expired"
