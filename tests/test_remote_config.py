"""Over-the-air configuration against real brokers, driven by `edgewire config set/get`."""

from __future__ import annotations

import asyncio
import json
import sys

from edgewire.config import BrokerSettings, DeviceConfig, ModelSettings, SourceSettings
from edgewire.demo_models import DemoArtifacts
from edgewire.edge.agent import EdgeAgent

from .conftest import BrokerHandle


async def cli(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgewire.cli",
        "config",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def reported(broker: BrokerHandle, revision: int) -> dict:
    for _ in range(40):
        doc = json.loads((await cli("get", "--device", "cam-o", "--broker", broker.url)).strip().splitlines()[-1])
        if doc.get("reported", {}).get("revision") == revision:
            return doc
        await asyncio.sleep(0.2)
    raise AssertionError(f"no report for revision {revision}: {doc}")


async def test_desired_config_applied_live_rejected_or_deferred(broker: BrokerHandle, demo: DemoArtifacts) -> None:
    cfg = DeviceConfig(
        device_id="cam-o",
        fleet="lab",
        broker=BrokerSettings(url=broker.url, password="s3cret"),
        source=SourceSettings(kind="mqtt"),
        model=ModelSettings(path=demo.edge_model),
    )
    agent = EdgeAgent(cfg)
    run = asyncio.create_task(agent.run())
    try:
        await asyncio.sleep(0)
        assert agent.session is not None
        await agent.session.wait_connected(10)
        await asyncio.sleep(0.3)

        await cli("set", "--device", "cam-o", "--broker", broker.url, "judge.min_confidence=0.55")
        doc = await reported(broker, 1)
        assert doc["reported"]["status"] == "applied"
        assert doc["desired"]["config"] == {"judge": {"min_confidence": 0.55}}
        assert agent.config.judge.min_confidence == 0.55 and agent.judge.settings.min_confidence == 0.55
        assert "s3cret" not in json.dumps(doc)  # credentials never echo back

        await cli("set", "--device", "cam-o", "--broker", broker.url, "judge.min_confidence=7")
        doc = await reported(broker, 2)
        assert doc["reported"]["status"] == "rejected"
        assert "judge.min_confidence" in doc["reported"]["reason"]
        assert agent.config.judge.min_confidence == 0.55  # running config untouched

        await cli(
            "set", "--device", "cam-o", "--broker", broker.url, "judge.min_confidence=0.6", "pipeline.max_batch=4"
        )
        doc = await reported(broker, 3)
        assert doc["reported"]["status"] == "pending_restart"
        assert "pipeline" in doc["reported"]["reason"]
        assert agent.config.judge.min_confidence == 0.6 and agent.config.pipeline.max_batch == 16

        await cli("set", "--fleet", "lab", "--broker", broker.url, "judge.min_margin=0.2")
        for _ in range(40):
            if agent.config.judge.min_margin == 0.2:
                break
            await asyncio.sleep(0.2)
        assert agent.config.judge.min_margin == 0.2  # fleet-wide setting merged under the device's own
        assert agent.config.judge.min_confidence == 0.6
    finally:
        agent.stop()
        await asyncio.wait_for(run, 20)
