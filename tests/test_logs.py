"""Structured logs: one JSON object a line, joined by device_id, trace_id and model."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgewire import logs
from edgewire.config import DeviceConfig, ModelSettings, SourceSettings
from edgewire.demo.models import DemoArtifacts


def test_json_lines_carry_the_bound_fields_per_task(capsys: object) -> None:
    logs.configure("info", "json")
    log = logging.getLogger("edgewire.test")

    async def component(device: str) -> None:
        logs.bind(device_id=device, model="digits")
        await asyncio.sleep(0)

        async def escalation() -> None:
            log.info("answered", extra={"trace_id": f"{device}-7"})

        await asyncio.create_task(escalation())
        log.warning("plain")

    async def main() -> None:
        await asyncio.gather(component("cam-1"), component("cam-2"))
        log.info("outside")

    try:
        asyncio.run(main())
    finally:
        logs.configure("warning", "text")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]  # type: ignore[attr-defined]
    answered = {d["device_id"]: d for d in lines if d["msg"] == "answered"}
    assert answered["cam-1"]["trace_id"] == "cam-1-7" and answered["cam-2"]["trace_id"] == "cam-2-7"
    assert answered["cam-1"]["model"] == "digits" and answered["cam-1"]["level"] == "info"
    plain = [d for d in lines if d["msg"] == "plain"]
    assert {d["device_id"] for d in plain} == {"cam-1", "cam-2"} and all("trace_id" not in d for d in plain)
    (outside,) = [d for d in lines if d["msg"] == "outside"]
    assert "device_id" not in outside  # components' fields stay in their own tasks


@pytest.mark.slow
def test_edge_run_logs_json_lines_with_its_device(demo: DemoArtifacts, tmp_path: Path) -> None:
    bad = tmp_path / "frames"
    bad.mkdir()
    for i, src in enumerate(sorted(demo.frames_dir.glob("*.jpg"))[:3]):
        (bad / f"{i}.jpg").write_bytes(src.read_bytes())
    (bad / "9.jpg").write_bytes(b"not a jpeg")  # logged as a skipped frame
    cfg = DeviceConfig(
        device_id="cam-log",
        broker={"url": "mqtt://127.0.0.1:9"},  # type: ignore[arg-type]
        source=SourceSettings(kind="folder", path=bad),
        model=ModelSettings(path=demo.edge_model),
    )
    path = tmp_path / "device.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run = subprocess.run(
        [sys.executable, "-m", "edgewire.cli", "--log-format", "json", "edge", "run", "--config", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    docs = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    skipped = [d for d in docs if "skipped" in d["msg"]]
    assert skipped and all(d["device_id"] == "cam-log" and d["model"] for d in skipped)
    assert all({"ts", "level", "logger", "msg"} <= d.keys() for d in docs)
