"""Over-the-air configuration against real brokers, driven by `edgewire config set/get`."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

import pytest

from edgewire.config import BrokerSettings, DeviceConfig, ModelSettings, SourceSettings
from edgewire.demo.models import DemoArtifacts
from edgewire.edge.agent import EdgeAgent
from edgewire.edge.remote_config import boot_config
from edgewire.edge.state import DeviceState

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


async def test_desired_config_applied_live_rejected_or_deferred(
    broker: BrokerHandle, demo: DemoArtifacts, tmp_path: Path
) -> None:
    cfg = DeviceConfig(
        device_id="cam-o",
        fleet="lab",
        broker=BrokerSettings(url=broker.url, password="s3cret"),
        source=SourceSettings(kind="mqtt"),
        model=ModelSettings(path=demo.edge_model),
    )
    saved = DeviceState(tmp_path / "device.yaml.state.json")
    agent = EdgeAgent(cfg, boot_config=cfg, state=saved)
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
        # Kept for the next boot, where the setting that waited for a restart takes effect.
        rebooted = boot_config(cfg, DeviceState(saved.path))
        assert rebooted.pipeline.max_batch == 4 and rebooted.judge.min_confidence == 0.6
        assert EdgeAgent(rebooted, boot_config=cfg).config.pipeline.max_batch == 4

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


def _file_config(demo: DemoArtifacts) -> DeviceConfig:
    return DeviceConfig(
        device_id="cam-s",
        broker=BrokerSettings(url="mqtt://127.0.0.1:1"),
        source=SourceSettings(kind="mqtt"),
        model=ModelSettings(path=demo.edge_model),
    )


def test_saved_documents_boot_over_the_file(demo: DemoArtifacts, tmp_path: Path) -> None:
    file_cfg = _file_config(demo)
    state = DeviceState.beside(tmp_path / "device.yaml")
    assert state.path == tmp_path / "device.yaml.state.json"
    assert boot_config(file_cfg, state) == file_cfg  # nothing saved yet
    state.save_desired({"fleet": {"pipeline": {"max_batch": 8}}, "device": {"pipeline": {"max_batch": 2}}})
    again = DeviceState.beside(tmp_path / "device.yaml")
    assert boot_config(file_cfg, again).pipeline.max_batch == 2  # the device's own over the fleet's


def test_documents_an_earlier_release_kept_beside_the_config_are_taken_in(demo: DemoArtifacts, tmp_path: Path) -> None:
    legacy = tmp_path / "device.yaml.desired.json"
    legacy.write_text('{"fleet": {}, "device": {"pipeline": {"max_batch": 3}}}')
    state = DeviceState.beside(tmp_path / "device.yaml")
    assert not legacy.exists()
    assert boot_config(_file_config(demo), state).pipeline.max_batch == 3
    assert boot_config(_file_config(demo), DeviceState(state.path)).pipeline.max_batch == 3


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{not json", "unreadable"),
        ('["fleet"]', "unreadable"),
        ('{"desired": {"1": {"fleet": ["x"]}}}', "expected a map"),
        ('{"desired": {"1": {"device": {"pipeline": {"max_batch": -3}}}}}', "no longer apply"),
        ('{"desired": {"1": {"device": {"device_id": "someone-else"}}}}', "device_id cannot be changed"),
    ],
)
def test_unusable_saved_documents_boot_from_the_file_and_say_why(
    demo: DemoArtifacts, tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str, why: str
) -> None:
    file_cfg = _file_config(demo)
    path = tmp_path / "device.yaml.state.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING):
        assert boot_config(file_cfg, DeviceState(path)) == file_cfg
    assert why in caplog.text and str(path) in caplog.text
    if why == "unreadable":  # set aside beside itself, not lost and not in the way
        assert not path.exists() and any(p.name.startswith(path.name + ".unreadable-") for p in tmp_path.iterdir())
