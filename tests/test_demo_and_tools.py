"""The commands a newcomer and an operator run: the demo, eval, and the cloud on its own."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import sys
import time
from pathlib import Path

import aiomqtt
import pytest
from rich.console import Console
from typer.testing import CliRunner

pytest.importorskip("pytriton")

from edgewire import envelopes as env
from edgewire import topics
from edgewire.cli import app
from edgewire.config import load_device_config
from edgewire.demo.models import DemoArtifacts
from edgewire.demo.run import run_demo

from .conftest import BrokerHandle, free_port


async def test_demo_runs_the_whole_system(demo: DemoArtifacts, tmp_path: Path) -> None:
    out = demo.frames_dir.parent
    # A deadline no loaded machine reaches: what is checked is that every escalation is answered
    # and the answers are right, not how fast (the demo's own 2 s deadline is about speed).
    summary = await run_demo(
        out, devices=2, fps=200, cloud_deadline_ms=120_000, console=Console(file=io.StringIO()), quiet=True
    )
    assert summary["frames"] == 2 * 540 == summary["frames_scored"]
    assert summary["mode"] == "joint"
    assert 0.2 < summary["escalation_rate"] < 0.6
    assert summary["timeouts"] == 0
    assert summary["accuracy_joint"] > summary["accuracy_edge"] + 0.05
    assert summary["accuracy_cloud_only"] > 0.95
    assert summary["p99_ms_escalated"] >= summary["p50_ms_escalated"] > summary["p50_ms_local"] > 0
    assert summary["bytes_sent_up"] > summary["escalated"] * 1000
    # The configuration it leaves behind loads from anywhere and finds its model and frames.
    cfg = load_device_config(out / "device.yaml")
    assert cfg.model.path.is_file() and cfg.source.path is not None and cfg.source.path.is_dir()


def test_eval_picks_a_threshold_within_budget(demo: DemoArtifacts) -> None:
    result = CliRunner().invoke(app, ["eval", "--data", str(demo.frames_dir.parent), "--budget", "0.2", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output.strip().splitlines()[-1])
    rows = doc["rows"]
    assert [r["escalation_rate"] for r in rows] == sorted(r["escalation_rate"] for r in rows)
    assert rows[-1]["accuracy"] > doc["accuracy_edge"]
    best = doc["best"]
    assert best["escalation_rate"] <= 0.2
    assert best["accuracy"] == max(r["accuracy"] for r in rows if r["escalation_rate"] <= 0.2)
    assert best["bytes_sent"] > 0


async def test_cloud_command_serves_requests(demo: DemoArtifacts, tmp_path: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    broker = BrokerHandle("mosquitto", "127.0.0.1", mosquitto.port)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgewire.cli",
        "cloud",
        "--broker",
        broker.url,
        "--data",
        str(demo.frames_dir.parent),
        "--workdir",
        str(tmp_path / "cloud"),
        *("--device-rate", "0.1", "--device-burst", "1"),  # one request, then one per 10 s
        *("--device-fetch-rate", "1", "--device-fetch-burst", "4"),
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 120)
        assert b"cloud: Triton" in line, line
        jpeg = sorted(demo.frames_dir.glob("*.jpg"))[0].read_bytes()
        async with aiomqtt.Client(broker.host, broker.port, identifier="cam-z") as c:
            await c.subscribe(topics.RESULT.build(device_id="cam-z"), qos=1)
            req = env.Request(
                trace_id="z1",
                device_id="cam-z",
                created=time.time(),
                deadline=time.time() + 10,
                model_hint="digits",
                payload=jpeg,
                content_type="image/jpeg",
                reply_to="result/cam-z",
            )
            results: list[env.Result] = []
            for trace_id in ("z1", "z2"):  # the second past the device's budget of one
                again = req.model_copy(update={"trace_id": trace_id})
                await c.publish(topics.REQUEST.build(device_id="cam-z", trace_id=trace_id), env.encode(again), qos=1)
                async for m in c.messages:
                    results.append(env.decode(env.Result, m.payload))
                    break
        result, refused = results
        assert result.status == "ok" and result.model == "digits-cloud" and result.trace_id == "z1"
        assert (refused.trace_id, refused.status, refused.reason) == ("z2", "rejected", env.RATE_LIMITED)
        assert (tmp_path / "cloud" / "triton-repository-ngc" / "digits-cloud" / "config.pbtxt").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0


def test_bridge_command_rejects_a_broken_rule_file(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: a\n    route_to: [m]\n    stratgy: parallel\n")
    result = CliRunner().invoke(app, ["bridge", "--triton", f"grpc://127.0.0.1:{free_port()}", "--rules", str(rules)])
    assert result.exit_code == 2
    assert f"{rules}:4" in result.output and "stratgy" in result.output
