"""What watching the fleet costs: the demo fleet's frames per second with the monitor, the
/metrics endpoint and hop stamping on, against the same fleet with them off, in one run.

The fleet: Mosquitto (else the embedded broker in its own process), the demo cloud (a real
Triton on the cloud model and the bridge, in this process), and ``--devices`` demo devices
(joint mode: hard frames escalate, with a deadline long enough that none times out) playing
their frames as fast as they run.

on:  ``edgewire monitor --json`` running in its own process (subscribed to presence, telemetry,
     model status, reported config and every local result), Prometheus scraping this process's
     /metrics every second (ten times as often as deploy/prometheus/prometheus.yml does), the
     devices and the bridge stamping every escalation's hops.
off: no monitor, nothing scraping, no hop stamps. Telemetry runs at its default 5 s in both.

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
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from edge_pipeline import start_broker
from process_cpu import cpu_seconds

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


def fleet_cpu_s() -> float:
    """CPU seconds of this process and of every process under it (Triton, broker, monitor)."""
    return cpu_seconds()


@dataclass
class Round:
    fps: float
    cpu_us_per_frame: float
    timeouts: int
    #: Of ``cpu_us_per_frame``, what the monitor process spent (an operator's machine in the field).
    monitor_cpu_us_per_frame: float = 0.0


async def fleet_round(
    arts: DemoArtifacts, url: str, triton: EmbeddedTriton, args: argparse.Namespace, frames: int, on: bool
) -> Round:
    dispatcher = Dispatcher([f"grpc://{triton.grpc_url}"])
    bridge = Bridge(
        # One id for every round: a second persistent bridge session would queue each round's
        # requests at the broker while it is away and have them all served at its next start.
        "bench-bridge",
        BrokerSettings(url=url),
        dispatcher,
        default_rules("digits-cloud"),
        hop_stamps=on,
    )
    bridge_task = asyncio.create_task(bridge.run())
    await asyncio.wait_for(bridge.ready.wait(), 30)
    try:
        agents = []
        for k in range(args.devices):
            cfg = demo_device_config(
                arts,
                url,
                device_id=f"cam-{k + 1:02d}",
                frames=frames,
                loop=True,
                fps=args.fps,
                cloud_deadline_ms=60_000,
            )
            cfg.publish = PublishSettings(hop_stamps=on)
            agents.append(EdgeAgent(cfg))
        cpu0 = fleet_cpu_s()
        summaries = await asyncio.gather(*(a.run() for a in agents))
        cpu = fleet_cpu_s() - cpu0
    finally:
        bridge.stop()
        await asyncio.wait_for(bridge_task, 30)
        await dispatcher.close()
    done = sum(s.completed for s in summaries)
    assert done == frames * args.devices, summaries
    return Round(
        fps=done / max(s.busy_s for s in summaries),
        cpu_us_per_frame=cpu / done * 1e6,
        timeouts=sum(s.timeouts for s in summaries),
    )


async def run(args: argparse.Namespace, work: Path) -> dict[str, object]:
    arts = build_demo(args.data or work / "demo")
    write_python_repository(work / "repo", [arts.cloud_model])
    proc, port, broker_kind = start_broker(work)
    url = f"mqtt://127.0.0.1:{port}"
    metrics_port = free_port()
    serve(metrics_port)
    rounds: dict[str, list[Round]] = {"on": [], "off": []}
    scrapes = 0
    try:
        async with EmbeddedTriton(work / "repo", workdir=work) as triton:
            await fleet_round(arts, url, triton, args, 32, on=False)  # warm Triton and the caches

            async def one(on: bool) -> Round:
                nonlocal scrapes
                if not on:
                    return await fleet_round(arts, url, triton, args, args.frames, on=False)
                monitor = await asyncio.to_thread(start_monitor, url)  # started (and imported) before the clock
                try:
                    watcher = psutil.Process(monitor.pid)
                    before = watcher.cpu_times()
                    with Scraper(metrics_port) as scraper:
                        measured = await fleet_round(arts, url, triton, args, args.frames, on=True)
                    after = watcher.cpu_times()
                    spent = after.user + after.system - before.user - before.system
                    measured.monitor_cpu_us_per_frame = spent / (args.frames * args.devices) * 1e6
                    scrapes += scraper.scrapes
                finally:
                    monitor.terminate()
                    monitor.wait(10)
                return measured

            for r in range(args.rounds):
                for name in ("on", "off") if r % 2 == 0 else ("off", "on"):
                    rounds[name].append(await one(name == "on"))
                on, off = rounds["on"][-1], rounds["off"][-1]
                print(
                    f"round {r + 1}: on {on.fps:6.1f} frames/s {on.cpu_us_per_frame:7.0f} us CPU/frame   "
                    f"off {off.fps:6.1f} frames/s {off.cpu_us_per_frame:7.0f} us CPU/frame   "
                    f"throughput ratio {off.cpu_us_per_frame / on.cpu_us_per_frame:5.3f}   "
                    f"(monitor {on.monitor_cpu_us_per_frame:5.0f} us)   timeouts {on.timeouts}/{off.timeouts}"
                )
    finally:
        proc.terminate()
        proc.wait(10)
    pairs = list(zip(rounds["on"], rounds["off"], strict=True))

    def median(values: list[float], digits: int = 1) -> float:
        return round(statistics.median(values), digits)

    return {
        "throughput_ratio": median([off.cpu_us_per_frame / on.cpu_us_per_frame for on, off in pairs], 3),
        "delivered_fps_ratio": median([on.fps / off.fps for on, off in pairs], 3),
        "fps_on": median([r.fps for r in rounds["on"]]),
        "fps_off": median([r.fps for r in rounds["off"]]),
        "cpu_us_per_frame_on": median([r.cpu_us_per_frame for r in rounds["on"]]),
        "cpu_us_per_frame_off": median([r.cpu_us_per_frame for r in rounds["off"]]),
        "monitor_cpu_us_per_frame": median([r.monitor_cpu_us_per_frame for r in rounds["on"]]),
        "timeouts": sum(r.timeouts for rs in rounds.values() for r in rs),
        "devices": args.devices,
        "fps_per_device": args.fps,
        "frames_per_device_per_round": args.frames,
        "rounds": args.rounds,
        "metrics_scrapes": scrapes,
        "broker": broker_kind,
        "target_ratio": 0.95,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--frames", type=int, default=600, help="frames per device per round (loops the set)")
    parser.add_argument("--fps", type=float, default=30.0, help="each device's camera rate (the demo's)")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--data", type=Path, default=None, help="reuse a demo folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
