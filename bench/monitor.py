"""What watching the fleet costs: the demo fleet's frames per second with the monitor, the
/metrics endpoint and hop stamping on, against the same fleet with them off, in one run.

The fleet: Mosquitto (else the embedded broker in its own process), the demo cloud (a real
Triton on the cloud model and the bridge, in this process), and ``--devices`` demo devices
(joint mode: hard frames escalate, with a deadline long enough that none times out) playing
their frames as fast as they run.

on:  ``edgewire monitor --json`` running in its own process (subscribed to presence, telemetry,
     model status, reported config and every local result), Prometheus scraping this process's
     /metrics every second (ten times as often as deploy/prometheus/prometheus.yml does), the
     devices and the bridge stamping every escalation's hops, telemetry every second.
off: no monitor, nothing scraping, no hop stamps, telemetry at the default 5 s.

The latency histograms themselves are always kept (they are the Meter's, on or off). Rounds
alternate which goes first; the median of the per-round ratio is reported. The last line is one
JSON object.

    python bench/monitor.py [--rounds 5] [--frames 1500] [--devices 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from edge_pipeline import start_broker

from edgewire.cloud_bridge.bridge import Bridge
from edgewire.cloud_bridge.dispatch import Dispatcher
from edgewire.cloud_bridge.model_repository import write_python_repository
from edgewire.cloud_bridge.rules import default_rules
from edgewire.cloud_bridge.triton_server import EmbeddedTriton
from edgewire.config import BrokerSettings, PublishSettings
from edgewire.demo.models import DemoArtifacts, build_demo
from edgewire.demo.run import demo_device_config
from edgewire.edge.agent import EdgeAgent
from edgewire.metrics import serve
from edgewire.ports import free_port


class Scraper:
    """Prometheus stand-in: GET /metrics every ``every_s`` on a thread, as a server would."""

    def __init__(self, port: int, every_s: float = 1.0) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.every_s = every_s
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            urllib.request.urlopen(self.url, timeout=5).read()
            self.scrapes += 1

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def start_monitor(url: str) -> subprocess.Popen[bytes]:
    """``edgewire monitor --json``, returned once it has drawn (it is subscribed by then)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgewire.cli", "monitor", "--broker", url, "--json", "--refresh", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    return proc


async def fleet_fps(
    arts: DemoArtifacts, url: str, triton: EmbeddedTriton, devices: int, frames: int, on: bool
) -> float:
    dispatcher = Dispatcher([f"grpc://{triton.grpc_url}"])
    bridge = Bridge(
        f"bridge-{'on' if on else 'off'}",
        BrokerSettings(url=url),
        dispatcher,
        default_rules("digits-cloud"),
        hop_stamps=on,
        telemetry_interval_s=1.0 if on else 5.0,
    )
    bridge_task = asyncio.create_task(bridge.run())
    await asyncio.wait_for(bridge.ready.wait(), 30)
    try:
        agents = []
        for k in range(devices):
            # A deadline no answer misses here: every round stays in joint mode, so both sides do
            # the same work (a round that went degraded would skip the cloud and look faster).
            cfg = demo_device_config(
                arts, url, device_id=f"cam-{k + 1:02d}", frames=frames, loop=True, cloud_deadline_ms=60_000
            )
            cfg.publish = PublishSettings(telemetry_interval_s=1.0 if on else 5.0, hop_stamps=on)
            agents.append(EdgeAgent(cfg))
        summaries = await asyncio.gather(*(a.run() for a in agents))
    finally:
        bridge.stop()
        await asyncio.wait_for(bridge_task, 30)
        await dispatcher.close()
    assert all(s.completed == frames and s.timeouts == 0 for s in summaries), summaries
    return sum(s.completed for s in summaries) / max(s.busy_s for s in summaries)


async def run(args: argparse.Namespace, work: Path) -> dict[str, object]:
    arts = build_demo(args.data or work / "demo")
    write_python_repository(work / "repo", [arts.cloud_model])
    proc, port, broker_kind = start_broker(work)
    url = f"mqtt://127.0.0.1:{port}"
    metrics_port = free_port()
    serve(metrics_port)
    figures: dict[str, list[float]] = {"on": [], "off": []}
    scrapes = 0
    try:
        async with EmbeddedTriton(work / "repo", workdir=work) as triton:
            await fleet_fps(arts, url, triton, args.devices, 64, on=False)  # warm Triton and the caches

            async def one(on: bool) -> float:
                nonlocal scrapes
                if not on:
                    return await fleet_fps(arts, url, triton, args.devices, args.frames, on=False)
                monitor = await asyncio.to_thread(start_monitor, url)
                try:
                    with Scraper(metrics_port) as scraper:
                        fps = await fleet_fps(arts, url, triton, args.devices, args.frames, on=True)
                    scrapes += scraper.scrapes
                finally:
                    monitor.terminate()
                    monitor.wait(10)
                return fps

            for r in range(args.rounds):
                for name in ("on", "off") if r % 2 == 0 else ("off", "on"):
                    figures[name].append(await one(name == "on"))
                on, off = figures["on"][-1], figures["off"][-1]
                print(f"round {r + 1}: on {on:7.1f} frames/s   off {off:7.1f} frames/s   ratio {on / off:5.3f}")
    finally:
        proc.terminate()
        proc.wait(10)
    return {
        "fps_on": round(statistics.median(figures["on"]), 1),
        "fps_off": round(statistics.median(figures["off"]), 1),
        "throughput_ratio": round(
            statistics.median(a / b for a, b in zip(figures["on"], figures["off"], strict=True)), 3
        ),
        "devices": args.devices,
        "frames_per_device_per_round": args.frames,
        "rounds": args.rounds,
        "metrics_scrapes": scrapes,
        "broker": broker_kind,
        "target_ratio": 0.95,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--frames", type=int, default=1500, help="frames per device per round (loops the set)")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--data", type=Path, default=None, help="reuse a demo folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
