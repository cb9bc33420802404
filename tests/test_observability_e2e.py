"""Hop stamps, latency histograms and /metrics on a real run: embedded broker, real Triton, the
bridge and a device, all in this process and one Prometheus registry (labelled by client)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import urllib.request
from pathlib import Path

import aiomqtt
import pytest

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

from prometheus_client.parser import text_string_to_metric_families

from edgewire import envelopes as env
from edgewire import topics
from edgewire.broker.embedded import EmbeddedBroker
from edgewire.cloud_bridge.triton_server import EmbeddedTriton
from edgewire.demo.models import DemoArtifacts
from edgewire.edge.agent import EdgeAgent
from edgewire.edge.tegrastats import parse
from edgewire.fleet.trace import collect, timeline
from edgewire.hops import BRIDGE_HOPS, HOPS, RELAY_HOPS
from edgewire.metrics import DOCS, serve
from edgewire.ports import free_port
from edgewire.session import MqttSession

from .conftest import BrokerHandle
from .test_bridge_e2e import RunningBridge, device
from .test_machine_telemetry import JETPACK_5_1_ORIN_NANO as JETSON_LINE


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(scraped: dict, name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


class TelemetryReader:
    """The last telemetry each client published, as an operator's monitor would see it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.last: dict[str, dict[str, float]] = {}
        self.ready = asyncio.Event()

    async def run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, identifier="telemetry-reader") as c:
            await c.subscribe(topics.TELEMETRY.filter(), qos=0)
            self.ready.set()
            async for m in c.messages:
                t = env.decode(env.Telemetry, m.payload)
                self.last[t.client_id] = t.metrics


async def test_hops_add_up_and_metrics_match_telemetry(demo: DemoArtifacts, triton: EmbeddedTriton) -> None:
    port, metrics_port = free_port(), free_port()
    serve(metrics_port)
    async with EmbeddedBroker("127.0.0.1", port, allow_anonymous=True):
        url = f"mqtt://127.0.0.1:{port}"
        reader = TelemetryReader(port)
        reading = asyncio.create_task(reader.run())
        await asyncio.wait_for(reader.ready.wait(), 10)
        watcher = MqttSession("trace-watcher", "127.0.0.1", port)
        async with (
            watcher,
            RunningBridge(BrokerHandle("amqtt", "127.0.0.1", port), triton, bridge_id="bridge-obs") as bridge,
        ):
            await watcher.wait_connected(10)
            traces = asyncio.create_task(collect(watcher, device_id="cam-obs", count=5, timeout_s=60))
            await asyncio.sleep(0.2)  # the watcher's subscription is in before the first escalation
            cfg = device(demo, url, "cam-obs", max_frames=60, fps=30)
            cfg.publish.telemetry_interval_s = 0.5
            agent = EdgeAgent(cfg)
            run = asyncio.create_task(agent.run())
            # /metrics is live while the device runs: histograms with counts appear before the end.
            for _ in range(200):
                mid = scrape(metrics_port)
                if sample(mid, "edgewire_frame_latency_ms_count", client="cam-obs", path="local") > 0:
                    break
                await asyncio.sleep(0.05)
            assert sample(mid, "edgewire_frame_latency_ms_count", client="cam-obs", path="local") > 0
            summary = await run
            found = await traces
        await asyncio.sleep(0.5)  # the bridge's and device's last telemetry
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading

    # Hop stamps: every hop present on a cloud answer, and the steps add up to the latency.
    assert summary.escalated >= 5 and len(found) == 5
    for result in found:
        t = timeline(result)
        assert result.answered_by == "cloud" and result.state == "COMPLETE"
        assert set(result.hops or {}) == {h for h, _ in HOPS if h not in RELAY_HOPS}  # no site tier here
        assert abs(t["steps_ms"] - result.latency_ms) < 1.0
        assert all(s["ms"] >= 0 for s in t["steps"])  # one clock here: no step runs backwards
        assert {s["hop"] for s in t["steps"]} >= set(BRIDGE_HOPS)

    # /metrics after the run against what the device and the bridge published on telemetry/+.
    scraped = scrape(metrics_port)
    dev = reader.last["cam-obs"]
    for path in ("local", "escalated"):
        assert (
            sample(scraped, "edgewire_frame_latency_ms_count", client="cam-obs", path=path)
            == dev[f"frame_latency_ms_count{{path={path}}}"]
        )
        assert sample(scraped, "edgewire_frame_latency_ms_sum", client="cam-obs", path=path) == pytest.approx(
            dev[f"frame_latency_ms_sum{{path={path}}}"]
        )
    latencies = dev["frame_latency_ms_count{path=local}"] + dev["frame_latency_ms_count{path=escalated}"]
    assert latencies == dev["frames_completed_total"] == summary.completed == 60
    assert dev["frame_latency_ms_count{path=escalated}"] == summary.escalated
    assert sample(scraped, "edgewire_frames_completed_total", client="cam-obs") == dev["frames_completed_total"]
    assert dev["frame_latency_ms_p50{path=local}"] <= dev["frame_latency_ms_p99{path=local}"]

    brg = reader.last["bridge-obs"]
    ok = brg["requests_total{status=ok}"]
    assert ok == summary.escalated == bridge.meter.get("requests_total", status="ok")
    assert sample(scraped, "edgewire_requests_total", client="bridge-obs", status="ok") == ok
    for step in ("queued", "triton", "total"):
        assert sample(scraped, "edgewire_bridge_step_ms_count", client="bridge-obs", step=step) == ok
        assert brg[f"bridge_step_ms_count{{step={step}}}"] == ok
    assert sample(scraped, "edgewire_triton_latency_ms_count", client="bridge-obs", model="digits-cloud") == ok
    buckets = [
        v
        for (name, labels), v in scraped.items()
        if name == "edgewire_triton_latency_ms_bucket" and ("client", "bridge-obs") in labels
    ]
    assert len(buckets) > 10 and max(buckets) == ok  # millisecond buckets, +Inf holds them all
    check_dashboard(scraped)


async def test_trace_command_shows_a_live_escalation(demo: DemoArtifacts, triton: EmbeddedTriton) -> None:
    port = free_port()
    async with EmbeddedBroker("127.0.0.1", port, allow_anonymous=True):
        url = f"mqtt://127.0.0.1:{port}"
        async with RunningBridge(BrokerHandle("amqtt", "127.0.0.1", port), triton, bridge_id="bridge-tr"):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edgewire.cli", "trace", "--broker", url, "--device", "cam-tr",
                "--last", "2", "--json", "--timeout", "90",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            cfg = device(demo, url, "cam-tr", max_frames=None, loop=True, fps=20)
            agent = EdgeAgent(cfg)
            run = asyncio.create_task(agent.run())
            try:
                stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
            finally:
                agent.stop()
                await asyncio.wait_for(run, 30)
    assert proc.returncode == 0, stderr.decode()
    shown = [json.loads(line) for line in stdout.decode().splitlines()]
    assert len(shown) == 2
    for t in shown:
        assert t["device_id"] == "cam-tr" and t["answered_by"] == "cloud"
        assert [s["hop"] for s in t["steps"]] == [h for h, _ in HOPS[1:] if h not in RELAY_HOPS]
        assert abs(t["steps_ms"] - t["latency_ms"]) < 1.0


DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "edgewire-fleet.json"
#: Series that exist only where the machine has the sensor (a thermal zone, a Jetson): checked
#: against what the machine readers can produce instead of this machine's scrape.
SENSOR_SERIES = {
    "edgewire_temperature_c": "temperature_c",
    "edgewire_gpu_load_percent": "gpu_load_percent",
    "edgewire_emc_load_percent": "emc_load_percent",
    "edgewire_power_mw": "power_mw",
}
#: Counters that come into being with their first event (a failed frame, a refused message).
EVENT_SERIES = {"edgewire_frames_failed_total", "edgewire_messages_rejected_total"}


def dashboard_metric_names() -> set[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in doc["templating"]["list"] if v["type"] == "query"]
    assert len(exprs) > 20
    return {name for e in exprs for name in re.findall(r"\bedgewire_[a-z0-9_]+", e)}


def check_dashboard(scraped: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> None:
    """Every metric name in every dashboard query is one a live /metrics serves."""
    live = {name for name, _ in scraped}
    names = dashboard_metric_names()
    missing = names - live - set(SENSOR_SERIES) - EVENT_SERIES
    assert not missing, f"dashboard queries name metrics /metrics does not serve: {sorted(missing)}"
    assert EVENT_SERIES <= names  # the lists above name only what the dashboard uses
    for series, key in SENSOR_SERIES.items():
        assert key in DOCS and series in names
        assert key in parse(JETSON_LINE) or key == "temperature_c"
    for series in EVENT_SERIES:
        assert series.removeprefix("edgewire_") in DOCS
