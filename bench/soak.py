"""Chaos soak: a fleet under steady traffic, a random crash every 20-40 s, the exact invariants
over the whole run.

    python bench/soak.py --minutes 10 [--devices 3] [--fps 8] [--seed 1]

Runs Mosquitto (persistence on), a real Triton (from the pytriton wheel), ``edgewire bridge``
as its own process and several device processes (every frame hard, durable outboxes), with a
monitor per device recording what reaches the broker. Every 20-40 s one fault is injected at
random, each a SIGKILL: the broker, the bridge, Triton (its whole process group), or one
device (started again on the same outbox). When the time is up the sources stop, everything
settles until quiet, and tests/invariants.py checks every escalation of every device against
the measured outage windows. Prints one JSON object:

    minutes, faults_injected (by kind), escalations, lost, duplicates, expired_outside_outage,
    rss_growth_mib_per_hour, fds (per process, at start and end), rss_mib (idem)

A bridge or Triton killed takes its counters with it, so across the soak duplicates are
counted from the devices' outcomes (two final outcomes for one escalation); that no request
runs twice is counted exactly, from the bridge's and Triton's own numbers, by each fault's
test in tests/test_faults.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgewire.cloud_bridge.model_repository import write_python_repository  # noqa: E402
from edgewire.cloud_bridge.triton_server import EmbeddedTriton  # noqa: E402
from edgewire.demo.models import build_demo  # noqa: E402
from edgewire.ports import free_port  # noqa: E402
from tests.invariants import Verdict, Window, check, outage_window, read_outbox  # noqa: E402
from tests.test_faults import (  # noqa: E402
    DeviceProcess,
    Monitor,
    ServiceProcess,
    born_after,
    bridge_process,
    broker_process,
    device_config,
)

FAULTS = ("broker", "bridge", "triton", "device")
#: Memory and descriptors are first read this long into the traffic, before the first fault.
WARM_UP_S = 15.0


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Fleet:
    def __init__(self, workdir: Path, devices: int, fps: float, minutes: float) -> None:
        self.workdir = workdir
        self.demo = build_demo(workdir / "demo")
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.broker = broker_process("mosquitto", workdir, self.port)
        repo = workdir / "triton-repo"
        write_python_repository(repo, [self.demo.cloud_model])
        self.triton = EmbeddedTriton(repo, workdir=workdir / "triton")
        self.ids = [f"cam-s{i}" for i in range(devices)]
        self.fps = fps
        # Streaming past the end by half a minute, so the last reading is of a working fleet.
        self.frames = int(fps * (60 * minutes + 30))
        self.devices: dict[str, DeviceProcess] = {}
        self.monitors: dict[str, Monitor] = {}
        self.configs: dict[str, Any] = {}
        self.bridge: ServiceProcess | None = None
        #: (kind, start, end, device or None): when each fault began and when the part was back.
        self.faults: list[tuple[str, float, float, str | None]] = []

    def _dir(self, device_id: str) -> Path:
        path = self.workdir / device_id
        path.mkdir(exist_ok=True)
        return path

    async def start(self) -> None:
        await asyncio.to_thread(self.broker.start)
        await self.triton.start()
        self.bridge = bridge_process(self.url, self.triton, self.workdir)
        for d in self.ids:
            monitor = self.monitors[d] = Monitor("127.0.0.1", self.port, self._dir(d), device_id=d)
            await asyncio.to_thread(monitor.wait, lambda m=monitor: bool(m.lines()), 30, "connection")
        began = time.time()
        self.bridge.start()
        first = self.monitors[self.ids[0]]
        await asyncio.to_thread(first.wait, lambda: born_after(first, "bridge-f", began) is not None, 90, "bridge")
        for d in self.ids:
            cfg = device_config(self.demo, self.url, self._dir(d) / "outbox.db", fps=self.fps)
            cfg = cfg.model_copy(update={"device_id": d, "source": cfg.source.model_copy(update={"loop": True})})
            self.configs[d] = cfg
            self.devices[d] = DeviceProcess(cfg, self._dir(d), self.frames)
        for d in self.ids:
            await self.devices[d].wait_finals(5, 120)

    def pids(self) -> dict[str, int]:
        out = {"broker": self.broker.proc.pid if self.broker.proc else 0, "triton": self.triton.pid or 0}
        out["bridge"] = self.bridge.proc.pid if self.bridge and self.bridge.proc else 0
        out |= {d: p.proc.pid for d, p in self.devices.items()}
        return {k: v for k, v in out.items() if v}

    async def inject(self, kind: str, rng: random.Random) -> None:
        assert self.bridge is not None
        start = time.time()
        victim: str | None = None
        if kind == "broker":
            await asyncio.to_thread(self.broker.kill)
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            await asyncio.to_thread(self.broker.start)
        elif kind == "bridge":
            await asyncio.to_thread(self.bridge.kill)
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            self.bridge.start()
        elif kind == "triton":
            assert self.triton.pid is not None
            os.killpg(self.triton.pid, signal.SIGKILL)
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            await self.triton.start()
        else:
            victim = rng.choice(self.ids)
            old = self.devices[victim]
            sent = len({o["r"]["trace_id"] for o in old.outcomes()})
            old.kill()
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            left = max(self.frames - sent, int(self.fps * 10))
            self.devices[victim] = DeviceProcess(self.configs[victim], self._dir(victim), left)
        self.faults.append((kind, start, time.time(), victim))

    async def settle(self) -> None:
        for d in self.ids:
            await self.devices[d].settle(self.monitors[d], 300)
        for d in self.ids:
            self.devices[d].stop()

    def verdicts(self) -> dict[str, Verdict]:
        out = {}
        for d in self.ids:
            device, monitor = self.devices[d], self.monitors[d]
            outcomes, answers = device.outcomes(), monitor.messages("result")
            windows: list[Window] = []
            for _kind, start, end, victim in self.faults:
                if victim in (None, d):
                    windows.append(outage_window(start, end, outcomes, answers))
            owed, queued = read_outbox(device.db)
            out[d] = check(owed, queued, outcomes, answers, windows)
        return out

    async def close(self) -> None:
        for p in self.devices.values():
            p.kill()
        for m in self.monitors.values():
            m.stop()
        if self.bridge is not None:
            self.bridge.stop()
        await self.triton.stop()
        self.broker.stop()


def _sample(pids: dict[str, int]) -> dict[str, dict[str, float]]:
    return {k: {"rss_mib": round(_rss_mib(p), 1), "fds": _fds(p)} for k, p in pids.items()}


async def soak(minutes: float, devices: int, fps: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="edgewire-soak-"))
    verdicts: dict[str, Verdict] = {}
    fleet = Fleet(tmp, devices, fps, minutes)
    try:
        await fleet.start()
        began = time.monotonic()
        await asyncio.sleep(WARM_UP_S)  # imports, first batches, caches: not growth
        start_pids = fleet.pids()
        start_sample = _sample(start_pids)
        injected: Counter[str] = Counter()
        ends = began + minutes * 60
        while True:
            wait = rng.uniform(20, 40)
            if time.monotonic() + wait > ends:
                break
            await asyncio.sleep(wait)
            kind = rng.choice(FAULTS)
            await fleet.inject(kind, rng)
            injected[kind] += 1
        await asyncio.sleep(max(0.0, ends - time.monotonic()))
        end_pids = fleet.pids()
        end_sample = _sample(end_pids)
        hours = (time.monotonic() - began - WARM_UP_S) / 3600
        await fleet.settle()
        verdicts = fleet.verdicts()
    finally:
        await fleet.close()
        if verdicts and not any(v.problems for v in verdicts.values()):
            shutil.rmtree(tmp, ignore_errors=True)  # kept for a look when anything broke
    # Memory growth over the processes alive from start to end (a killed one starts afresh).
    same = [k for k, pid in start_pids.items() if end_pids.get(k) == pid]
    growth = sum(end_sample[k]["rss_mib"] - start_sample[k]["rss_mib"] for k in same) / hours
    total = {k: sum(getattr(v, k) for v in verdicts.values()) for k in Verdict().figures()}
    return {
        "minutes": minutes,
        "devices": devices,
        "faults_injected": dict(injected),
        "escalations": total["escalations"],
        "answered_ok": total["answered_ok"],
        "ended_in_outage": total["ended_in_outage"],
        "lost": total["lost"],
        "duplicates": total["duplicates"],
        "expired_outside_outage": total["expired_outside_outage"],
        "rss_growth_mib_per_hour": round(growth, 1),
        "rss_growth_over": same,
        "processes_at_start": start_sample,
        "processes_at_end": end_sample,
        "problems": [p for v in verdicts.values() for p in v.problems][:20],
        "workdir": str(tmp) if tmp.exists() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    # A stopped soak still takes its fleet down (the finally blocks run on the way out).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(json.dumps(asyncio.run(soak(args.minutes, args.devices, args.fps, args.seed))))


if __name__ == "__main__":
    main()
