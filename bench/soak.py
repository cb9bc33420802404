"""Chaos soak: a fleet under steady traffic, a random fault every 20-40 s, the exact invariants
over the whole run.

    python bench/soak.py --minutes 10 [--devices 3] [--fps 8] [--seed 1]

Runs Mosquitto (persistence on), a real Triton (from the pytriton wheel), ``edgewire bridge``
and ``edgewire distributor`` as their own processes and several device processes (every frame
hard, durable outboxes, signed model delivery on), with a monitor per device recording what
reaches the broker. Every 20-40 s one fault is injected, drawn from a shuffled rotation so that
each kind comes once in every round:

* ``broker``, ``bridge``, ``device``: a SIGKILL, and the part started again (a device on the same
  outbox); ``triton``: its whole process group SIGKILLed, and started again on the same ports;
* ``distributor``: a model push, with the distributor SIGKILLed a third of the way through it
  and started again before the last third;
* ``push``: a model push (signed, through the broker and the distributor) that every device
  downloads, verifies, validates and activates;
* ``link``: the last device's network link cut for 3-20 s. The device runs in its own network
  namespace, joined to the soak's by a veth pair whose device end is set down (as in
  tests/test_faults.py's link-cut test), so the cut is silent: no reset, no close, only loss.
  The soak runs itself in a private network namespace (``unshare -n``), so nothing appears on
  the machine's own interfaces; without namespaces (not root, no iproute2) there is no link cut.

Each fault's outage is measured, not assumed: it runs from the fault to the moment the part is
back (its presence birth, stamped when it is connected and subscribed again; for the broker,
every client's) and on until the system is whole (tests/invariants.py's outage_window). A push
and a distributor crash open no window: no escalation may end without the cloud's answer for
them. When the time is up the sources stop, everything settles until quiet, and the invariants
are checked for every escalation of every device, and every device must end on the last version
pushed. Prints one JSON object:

    minutes, faults_injected (by kind), escalations, lost, duplicates, expired_outside_outage,
    rss_growth_mib_per_hour, fds (per process, at start and end), rss_mib (idem), model pushes

A bridge or Triton killed takes its counters with it, so across the soak duplicates are
counted from the devices' outcomes (two final outcomes for one escalation); that no request
runs twice is counted exactly, from the bridge's and Triton's own numbers, by each fault's
test in tests/test_faults.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgewire import signing  # noqa: E402
from edgewire.cloud_bridge.model_repository import write_python_repository  # noqa: E402
from edgewire.cloud_bridge.triton_server import EmbeddedTriton  # noqa: E402
from edgewire.config import DeliverySettings  # noqa: E402
from edgewire.delivery import build_manifest  # noqa: E402
from edgewire.demo.models import build_demo  # noqa: E402
from edgewire.fleet.push import announce, publish_chunks  # noqa: E402
from edgewire.ports import free_port  # noqa: E402
from edgewire.session import MqttSession  # noqa: E402
from tests.conftest import Mosquitto, netns_available  # noqa: E402
from tests.invariants import Verdict, Window, check, outage_window, read_outbox  # noqa: E402
from tests.test_faults import (  # noqa: E402
    DeviceProcess,
    Monitor,
    ServiceProcess,
    born_after,
    bridge_process,
    device_config,
)
from tests.test_model_delivery import NAME, variant  # noqa: E402

FAULTS = ("broker", "bridge", "triton", "device", "distributor", "push", "link")
#: Set in the soak's own environment once it runs in its private network namespace.
PRIVATE_NET = "EDGEWIRE_SOAK_PRIVATE_NET"
#: The veth pair between the soak's namespace and the remote device's: (soak end, device end).
LINK_ADDRESSES = ("10.78.0.1", "10.78.0.2")
#: A pushed model's chunk size: the demo model (~5 KiB) goes in ~20 chunks, so a push has a middle.
CHUNK_SIZE = 256
#: Memory and descriptors are first read this long into the traffic, before the first fault.
WARM_UP_S = 15.0


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Link:
    """The remote device's network: its own namespace, joined to the soak's (private) one by a
    veth pair. ``cut`` sets the device's end down: its packets go nowhere and nothing tells it."""

    def __init__(self) -> None:
        self.ns = f"ew-soak-{os.getpid()}"
        self.made = False

    def up(self) -> None:
        _ip("netns", "add", self.ns)
        self.made = True
        _ip("link", "add", "veth-soak", "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        _ip("addr", "add", f"{LINK_ADDRESSES[0]}/30", "dev", "veth-soak")
        _ip("link", "set", "veth-soak", "up")
        _ip("-n", self.ns, "addr", "add", f"{LINK_ADDRESSES[1]}/30", "dev", "eth0")
        _ip("-n", self.ns, "link", "set", "eth0", "up")
        _ip("-n", self.ns, "link", "set", "lo", "up")

    def cut(self) -> None:
        _ip("-n", self.ns, "link", "set", "eth0", "down")

    def restore(self) -> None:
        _ip("-n", self.ns, "link", "set", "eth0", "up")

    def down(self) -> None:
        if self.made:
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
            self.made = False


class Rotation:
    """Fault kinds in a shuffled order, reshuffled once all have come: random, yet every kind
    is injected once a round, so a 10-minute run meets each of them."""

    def __init__(self, kinds: tuple[str, ...], rng: random.Random) -> None:
        self.kinds, self.rng, self.bag = kinds, rng, list[str]()

    def next(self) -> str:
        if not self.bag:
            self.bag = list(self.kinds)
            self.rng.shuffle(self.bag)
        return self.bag.pop()


@dataclass(frozen=True)
class Fault:
    """One injected fault: when it began, when its part was restarted (or the link restored),
    which device it hit (None: the whole fleet) and, after the run, when the part was back."""

    kind: str
    start: float
    restarted: float
    victim: str | None = None


class Fleet:
    def __init__(self, workdir: Path, devices: int, fps: float, minutes: float, link: bool) -> None:
        self.workdir = workdir
        self.demo = build_demo(workdir / "demo")
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.link = Link() if link else None
        hosts = ("127.0.0.1", LINK_ADDRESSES[0]) if link else ("127.0.0.1",)
        self.broker = Mosquitto(
            workdir, self.port, persist_in=workdir / "mosquitto-data", hosts=hosts, log=workdir / "mosquitto.log"
        )
        repo = workdir / "triton-repo"
        write_python_repository(repo, [self.demo.cloud_model])
        self.triton = EmbeddedTriton(repo, workdir=workdir / "triton")
        self.ids = [f"cam-s{i}" for i in range(devices)]
        #: The device behind the link that is cut: in its own network namespace.
        self.remote = self.ids[-1] if link else None
        self.fps = fps
        # Streaming past the end by half a minute, so the last reading is of a working fleet.
        self.frames = int(fps * (60 * minutes + 30))
        self.devices: dict[str, DeviceProcess] = {}
        self.monitors: dict[str, Monitor] = {}
        self.configs: dict[str, Any] = {}
        self.bridge: ServiceProcess | None = None
        dist = [sys.executable, "-m", "edgewire.cli", "distributor", "--broker", self.url]
        dist += ["--store", str(workdir / "distributor-store"), "--id", "distributor-s"]
        self.distributor = ServiceProcess(dist, workdir / "distributor.log")
        pem, public = signing.generate()
        self.signer = signing.load_private(pem)
        self.public_key = workdir / "fleet-signing.pub"
        self.public_key.write_text(public)
        self.operator = MqttSession("operator-soak", "127.0.0.1", self.port, reconnect_min_s=0.05, reconnect_max_s=0.5)
        self.pushed: list[str] = []
        self.faults: list[Fault] = []

    def _dir(self, device_id: str) -> Path:
        path = self.workdir / device_id
        path.mkdir(exist_ok=True)
        return path

    def _device(self, device_id: str, frames: int) -> DeviceProcess:
        netns = self.link.ns if self.link is not None and device_id == self.remote else None
        return DeviceProcess(self.configs[device_id], self._dir(device_id), frames, netns=netns)

    async def start(self) -> None:
        if self.link is not None:
            self.link.up()
        await asyncio.to_thread(self.broker.start)
        await self.triton.start()
        self.bridge = bridge_process(self.url, self.triton, self.workdir)
        for d in self.ids:
            monitor = self.monitors[d] = Monitor("127.0.0.1", self.port, self._dir(d), device_id=d)
            await asyncio.to_thread(monitor.wait, lambda m=monitor: bool(m.lines()), 30, "connection")
        began = time.time()
        self.bridge.start()
        self.distributor.start()
        await self._wait_born(["bridge-f", "distributor-s"], began, 90)
        await self.operator.__aenter__()
        for d in self.ids:
            host = LINK_ADDRESSES[0] if d == self.remote else "127.0.0.1"
            cfg = device_config(self.demo, f"mqtt://{host}:{self.port}", self._dir(d) / "outbox.db", fps=self.fps)
            delivery = DeliverySettings(
                store=self._dir(d) / "models",
                public_key=self.public_key,
                # The soak is about faults, not the probation rule: a loaded machine's latency
                # noise on a sub-millisecond model must not roll a version back.
                max_latency_ratio=10.0,
                min_latency_regression_ms=50.0,
            )
            source = cfg.source.model_copy(update={"loop": True})
            cfg = cfg.model_copy(update={"device_id": d, "source": source, "delivery": delivery})
            self.configs[d] = cfg
            self.devices[d] = self._device(d, self.frames)
        for d in self.ids:
            await self.devices[d].wait_finals(5, 120)

    async def _wait_born(self, clients: list[str], after: float, timeout: float) -> None:
        watch = self.monitors[self.ids[0]]
        await asyncio.to_thread(
            watch.wait, lambda: all(born_after(watch, c, after) is not None for c in clients), timeout, f"{clients}"
        )

    def pids(self) -> dict[str, int]:
        out = {"broker": self.broker.proc.pid if self.broker.proc else 0, "triton": self.triton.pid or 0}
        out["bridge"] = self.bridge.proc.pid if self.bridge and self.bridge.proc else 0
        out["distributor"] = self.distributor.proc.pid if self.distributor.proc else 0
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
        elif kind == "device":
            victim = rng.choice(self.ids)
            old = self.devices[victim]
            sent = len({o["r"]["trace_id"] for o in old.outcomes()})
            old.kill()
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            self.devices[victim] = self._device(victim, max(self.frames - sent, int(self.fps * 10)))
        elif kind == "link":
            assert self.link is not None
            victim = self.remote
            self.link.cut()
            await asyncio.sleep(rng.uniform(3.0, 20.0))
            self.link.restore()
        else:
            await self.push(kill_distributor=kind == "distributor")
        self.faults.append(Fault(kind, start, time.time(), victim))
        # On disk as well, so a run that broke can be judged again from its kept folder.
        (self.workdir / "faults.json").write_text(json.dumps([dataclasses.asdict(f) for f in self.faults]))

    async def push(self, *, kill_distributor: bool) -> None:
        """A new version of the devices' model, signed, announced and sent chunk by chunk; with
        ``kill_distributor``, its distributor SIGKILLed a third of the way through and started
        again before the last third (the middle third reaches it from its persistent session)."""
        version = f"1.0.{len(self.pushed) + 1}"
        path = variant(self.demo.edge_model, self.workdir / f"{NAME}-{version}.onnx", version)
        manifest = build_manifest(path, name=NAME, version=version, chunk_size=CHUNK_SIZE, private_key=self.signer)
        n = manifest.chunk_count
        await self.operator.wait_connected(60)
        await announce(self.operator, manifest)
        if not kill_distributor:
            await publish_chunks(self.operator, path, manifest)
        else:
            await publish_chunks(self.operator, path, manifest, indices=range(n // 3))
            down = time.time()
            await asyncio.to_thread(self.distributor.kill)
            await publish_chunks(self.operator, path, manifest, indices=range(n // 3, 2 * n // 3))
            self.distributor.start()
            await self._wait_born(["distributor-s"], down, 60)
            await publish_chunks(self.operator, path, manifest, indices=range(2 * n // 3, n))
        self.pushed.append(version)

    def back(self, fault: Fault, until: float) -> float:
        """When the part a fault hit was measured back: its presence birth after the fault and
        before ``until`` (the next fault); for the broker, the last of every client's; for a cut
        link, the device's birth if it had to reconnect, else the link's restoring; for Triton,
        when it passed its readiness check again. Where no birth is seen, the restart itself
        (which can only narrow the window)."""
        watch = self.monitors[self.ids[0]]
        if fault.kind == "triton":
            return fault.restarted
        clients = ["bridge-f", *self.ids] if fault.kind == "broker" else ["bridge-f"] if fault.kind == "bridge" else []
        if fault.victim is not None:
            clients = [fault.victim]
        births = [born_after(watch, c, fault.start) for c in clients]
        seen = [b for b in births if b is not None and b < until]
        if fault.kind == "link":
            return max([fault.restarted, *seen])
        return max(seen) if len(seen) == len(clients) else fault.restarted

    async def settle(self) -> None:
        for d in self.ids:
            await self.devices[d].settle(self.monitors[d], 300)
        for d in self.ids:
            self.devices[d].stop()

    def verdicts(self) -> dict[str, Verdict]:
        out = {}
        nexts = [f.start for f in self.faults[1:]] + [float("inf")]
        outages = {id(f): f for f in self.faults if f.kind not in ("push", "distributor")}
        ends = {id(f): self.back(f, until) for f, until in zip(self.faults, nexts, strict=True) if id(f) in outages}
        for d in self.ids:
            device, monitor = self.devices[d], self.monitors[d]
            outcomes, answers = device.outcomes(), monitor.messages("result")
            windows: list[Window] = []
            for f in outages.values():
                if f.victim in (None, d):
                    windows.append(outage_window(f.start, ends[id(f)], outcomes, answers))
            owed, queued = read_outbox(device.db)
            out[d] = check(owed, queued, outcomes, answers, windows, restarts=device.starts())
        return out

    def versions_at_end(self) -> dict[str, str | None]:
        """The version of its own model each device judged its last frames with (an outcome
        the cloud answered names the cloud's model)."""
        out: dict[str, str | None] = {}
        for d in self.ids:
            results = [o["r"] for o in self.devices[d].outcomes() if o["r"]["model"] == NAME]
            out[d] = results[-1]["version"] if results else None
        return out

    async def close(self) -> None:
        for p in self.devices.values():
            p.kill()
        for m in self.monitors.values():
            m.stop()
        with contextlib.suppress(Exception):
            await self.operator.__aexit__(None, None, None)
        self.distributor.stop()
        if self.bridge is not None:
            self.bridge.stop()
        await self.triton.stop()
        self.broker.stop()
        if self.link is not None:
            self.link.down()


def _sample(pids: dict[str, int]) -> dict[str, dict[str, float]]:
    return {k: {"rss_mib": round(_rss_mib(p), 1), "fds": _fds(p)} for k, p in pids.items()}


class Sampler:
    """Every process's memory, every few seconds, kept per incarnation: a killed part starts
    afresh, so growth is read over each incarnation's own life (after its warm-up) and, per
    part, over its longest-lived one."""

    def __init__(self, fleet: Fleet, period_s: float = 5.0) -> None:
        self.fleet, self.period_s = fleet, period_s
        self.rss: dict[tuple[str, int], list[tuple[float, float]]] = {}

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            for kind, pid in self.fleet.pids().items():
                with contextlib.suppress(OSError):  # it died between the listing and the reading
                    self.rss.setdefault((kind, pid), []).append((now, _rss_mib(pid)))
            await asyncio.sleep(self.period_s)

    def growth(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for (kind, _pid), samples in self.rss.items():
            born = samples[0][0]
            settled = [(t, r) for t, r in samples if t >= born + WARM_UP_S]
            if len(settled) < 6:
                continue
            span = settled[-1][0] - settled[0][0]
            # Three readings averaged at each end: one reading is noise (a batch, an allocator).
            first = sum(r for _, r in settled[:3]) / 3
            last = sum(r for _, r in settled[-3:]) / 3
            if span > out.get(kind, {}).get("over_minutes", 0) * 60:
                out[kind] = {
                    "mib_per_hour": round((last - first) / span * 3600, 1),
                    "over_minutes": round(span / 60, 1),
                }
        return out


async def soak(
    minutes: float, devices: int, fps: float, seed: int, kinds: tuple[str, ...], link: str | None
) -> dict[str, Any]:
    """``kinds``: the faults to draw from; ``link``: None when the link can be cut (network
    namespaces), else why not."""
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="edgewire-soak-"))
    verdicts: dict[str, Verdict] = {}
    fleet = Fleet(tmp, devices, fps, minutes, link=link is None)
    rotation = Rotation(kinds if link is None else tuple(k for k in kinds if k != "link"), rng)
    sampler = Sampler(fleet)
    sampling: asyncio.Task[None] | None = None
    problems: list[str] = []
    injected: Counter[str] = Counter()
    try:
        await fleet.start()
        began = time.monotonic()
        sampling = asyncio.create_task(sampler.run())
        await asyncio.sleep(WARM_UP_S)  # imports, first batches, caches: not growth
        start_pids = fleet.pids()
        start_sample = _sample(start_pids)
        ends = began + minutes * 60
        while True:
            wait = rng.uniform(20, 40)
            if time.monotonic() + wait > ends:
                break
            await asyncio.sleep(wait)
            kind = rotation.next()
            await fleet.inject(kind, rng)
            injected[kind] += 1
        await asyncio.sleep(max(0.0, ends - time.monotonic()))
        end_pids = fleet.pids()
        end_sample = _sample(end_pids)
        sampling.cancel()
        await fleet.settle()
        verdicts = fleet.verdicts()
        versions = fleet.versions_at_end()
        latest = fleet.pushed[-1] if fleet.pushed else "1.0.0"
        problems += [
            f"{d} ends on version {v}, not {latest}, the last pushed" for d, v in versions.items() if v != latest
        ]
        problems += [p for v in verdicts.values() for p in v.problems]
    finally:
        if sampling is not None:
            sampling.cancel()
        await fleet.close()
        if verdicts and not problems:
            shutil.rmtree(tmp, ignore_errors=True)  # kept for a look when anything broke
    growth = sampler.growth()
    total = {k: sum(getattr(v, k) for v in verdicts.values()) for k in Verdict().figures()}
    return {
        "minutes": minutes,
        "devices": devices,
        "seed": seed,
        "faults_injected": dict(injected),
        "link_cut": "network namespaces: veth down under the device" if link is None else f"none: {link}",
        "escalations": total["escalations"],
        "answered_ok": total["answered_ok"],
        "ended_in_outage": total["ended_in_outage"],
        "lost": total["lost"],
        "duplicates": total["duplicates"],
        "expired_outside_outage": total["expired_outside_outage"],
        "models_pushed": fleet.pushed,
        "model_versions_at_end": versions,
        "rss_growth_mib_per_hour": round(sum(g["mib_per_hour"] for g in growth.values()), 1),
        "rss_growth_by_process": growth,
        "processes_at_start": start_sample,
        "processes_at_end": end_sample,
        "problems": problems[:20],
        "workdir": str(tmp) if tmp.exists() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--faults", default=",".join(FAULTS), help="the kinds to draw from (comma-separated)")
    args = parser.parse_args()
    kinds = tuple(args.faults.split(","))
    if unknown := set(kinds) - set(FAULTS):
        parser.error(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(FAULTS)}")
    link = _private_network()
    # A stopped soak still takes its fleet down (the finally blocks run on the way out).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(json.dumps(asyncio.run(soak(args.minutes, args.devices, args.fps, args.seed, kinds, link))))


def _private_network() -> str | None:
    """Run the soak in a network namespace of its own (``unshare -n``: this process, the same
    pid), so the link it cuts is joined to nothing but the soak. None once it is there; else
    why the link cannot be cut here."""
    if os.environ.get(PRIVATE_NET) == "1":
        _ip("link", "set", "lo", "up")
        return None
    if not (netns_available() and shutil.which("ip") and os.geteuid() == 0):
        return "no network namespaces here (needs root, unshare and iproute2)"
    os.environ[PRIVATE_NET] = "1"
    os.execvp("unshare", ["unshare", "-n", "--", sys.executable, *sys.argv])


if __name__ == "__main__":
    main()
