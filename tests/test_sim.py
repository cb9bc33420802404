"""The fleet simulator against a real Mosquitto: presence, telemetry, escalations matched by trace
id, redeliveries told from answers run twice, and a model pushed to the simulated devices.

The bridge's side here is a small answerer on its own session (the real bridge and Triton are
exercised by tests/test_sites.py and bench/fleet.py); what is under test is the simulator. A
model push runs as in a real fleet, with a distributor: a simulated device subscribes to a
version's chunks when its announce arrives, so on a loaded machine the push's chunks may pass
before that subscription is in place, and the device fetches what it missed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from edgewire import delivery, topics
from edgewire import envelopes as env
from edgewire.cloud_bridge.distributor import Distributor
from edgewire.config import BrokerSettings
from edgewire.demo.models import DemoArtifacts
from edgewire.fleet.push import announce, publish_chunks, push
from edgewire.fleet.sim import Fleet, anonymous_identities, identities_from_fleet, load_frames
from edgewire.fleet.sim_device import Identity, SimSettings
from edgewire.fleet.status import collect_presence, collect_status
from edgewire.session import MqttSession

from .conftest import ROOT, Mosquitto, until


async def answer_requests(session: MqttSession, twice: set[str], answered: list[str], refuse: set[str]) -> None:
    """Answer each request with an ok Result; answer the devices in ``twice`` a second time,
    once identically (a redelivery) and once with another answer (as if run again); answer the
    first request of each device in ``refuse`` as unavailable, with the reason a bridge gives."""
    async for message in session.messages():
        request = env.decode(env.Request, message.payload)
        refused = request.device_id in refuse
        refuse.discard(request.device_id)
        result = env.Result(
            trace_id=request.trace_id,
            device_id=request.device_id,
            bridge_id="answerer",
            status="unavailable" if refused else "ok",
            reason="digits-cloud: grpc://127.0.0.1:8001: circuit open" if refused else None,
            model="digits-cloud",
            prediction=request.local,
            timings=env.Timings(queued_ms=0, inference_ms=1, total_ms=1),
        )
        encoded = env.encode(result)
        await session.publish(request.reply_to, encoded, qos=1)
        answered.append(request.trace_id)
        if request.device_id in twice:
            twice.discard(request.device_id)
            await session.publish(request.reply_to, encoded, qos=1)
            other = result.model_copy(update={"bridge_id": "another"})
            await session.publish(request.reply_to, env.encode(other), qos=1)


async def test_simulated_devices_escalate_report_and_install_a_pushed_model(
    mosquitto: Mosquitto, demo: DemoArtifacts, tmp_path: Path
) -> None:
    settings = SimSettings(port=mosquitto.port, escalations_per_s=5.0, telemetry_interval_s=0.5, fetch_after_s=0.5)
    fleet = Fleet(anonymous_identities(5, "simtest-"), settings, load_frames(demo.frames_dir, limit=8))
    answered: list[str] = []
    distributor = Distributor(BrokerSettings(url=f"mqtt://127.0.0.1:{mosquitto.port}"), tmp_path / "store")
    distributing = asyncio.create_task(distributor.run())
    async with (
        MqttSession("answerer", "127.0.0.1", mosquitto.port) as answerer,
        MqttSession("watcher", "127.0.0.1", mosquitto.port) as watcher,
    ):
        await answerer.wait_connected(10)
        await answerer.subscribe(topics.REQUEST.filter(), qos=1)
        await watcher.wait_connected(10)
        await watcher.subscribe(topics.TELEMETRY.filter(), qos=0)
        job = asyncio.create_task(answer_requests(answerer, {"simtest-0001"}, answered, {"simtest-0002"}))
        try:
            await fleet.start(connect_timeout_s=30)
            assert fleet.connected == 5
            assert await until(lambda: all(d.stats.answered >= 5 for d in fleet.devices), 30)
            await fleet.stop_escalating()
            assert await fleet.drain(30)
            telemetry = [env.decode(env.Telemetry, m.payload) for m in watcher.drain_inbox()]
            assert {t.client_id for t in telemetry} == {d.device_id for d in fleet.devices}

            async with MqttSession("operator", "127.0.0.1", mosquitto.port) as operator:
                presences = await collect_presence(operator, quiet_s=0.5)
                sims = {k: p for k, p in presences.items() if k.startswith("simtest-")}
                assert len(sims) == 5 and all(p.online and p.kind == "device" for p in sims.values())
                artefact = tmp_path / "m.plan"
                artefact.write_bytes(os.urandom(300_000))
                manifest = delivery.build_manifest(artefact, name="simmodel", version="7", chunk_size=64 * 1024)
                assert await until(distributor.ready.is_set, 30)  # it stores the push as it passes
                await push(operator, artefact, manifest)
                assert await until(lambda: all(d.models.get("simmodel") == "7" for d in fleet.devices), 60)
                assert await until(lambda: distributor.holds("simmodel", "7"), 30)
                statuses = await collect_status(operator, "simmodel", quiet_s=0.5)
                assert {s.state for s in statuses.values()} == {"active"} and len(statuses) == 5

                # Chunks that passed before any device knew the version (as a loaded device's
                # late chunk subscription misses them): every device fetches them all.
                served = distributor.chunks_served
                fetches = [d.stats.fetches for d in fleet.devices]
                later = tmp_path / "m8.plan"
                later.write_bytes(os.urandom(200_000))
                manifest8 = delivery.build_manifest(later, name="simmodel", version="8", chunk_size=64 * 1024)
                await publish_chunks(operator, later, manifest8)  # kept by the distributor till the announce
                await announce(operator, manifest8)
                assert await until(lambda: all(d.models.get("simmodel") == "8" for d in fleet.devices), 60)
                assert all(d.stats.fetches > before for d, before in zip(fleet.devices, fetches, strict=True))
                assert distributor.chunks_served > served
            summary = fleet.summary(1.0)
        finally:
            job.cancel()
            await fleet.close()
            distributor.stop()
            await asyncio.wait_for(distributing, 30)
    assert summary["devices_connected"] == 5
    assert summary["lost"] == 0
    assert summary["escalations_answered"] == len(answered) == summary["escalations_sent"]
    assert summary["redelivered"] == 1  # the identical second answer: the same run, delivered again
    assert summary["duplicates"] == 1  # the differing one: the request was run twice
    assert summary["duplicates_where"] == {"by two bridges": 1}
    assert summary["statuses"]["unavailable"] == 1
    assert summary["not_ok_reasons"] == {"unavailable: digits-cloud: # circuit open": 1}
    assert summary["rss_kib_per_device"] > 0 and summary["cpu_s"] > 0


def test_identities_come_from_the_fleet_file_with_flash_credentials(tmp_path: Path) -> None:
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(
        "fleet: lab\nbroker: {url: 'mqtt://127.0.0.1:1883'}\ncredentials_secret: s3cret\n"
        "defaults: {source: {kind: mqtt}, model: {path: /opt/m.onnx}}\n"
        "devices:\n  - range: {prefix: cam-, start: 1, stop: 3}\n"
    )
    identities = identities_from_fleet(fleet_file)
    assert [i.device_id for i in identities] == ["cam-001", "cam-002", "cam-003"]
    assert all(i.username == i.device_id and i.password and len(i.password) == 32 for i in identities)
    assert len({i.password for i in identities}) == 3
    assert identities[0] == Identity("cam-001", "cam-001", identities[0].password, "lab", "x86-64-cpu")


def test_the_sim_command_prints_a_json_summary(mosquitto: Mosquitto, demo: DemoArtifacts) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edgewire.cli", "sim", "--devices", "20", "--broker", f"mqtt://127.0.0.1:{mosquitto.port}",
         "--rate", "0", "--duration", "1", "--frames", str(demo.frames_dir), "--json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["devices"] == summary["devices_connected"] == 20
    assert summary["lost"] == 0 and summary["duplicates"] == 0
    assert summary["rss_kib_per_device"] > 0
