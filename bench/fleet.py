"""A simulated fleet against Mosquitto, bridges and the embedded Triton, in one run.

    python bench/fleet.py [--devices 1000] [--rate 0.3] [--phase-s 30] [--data DEMO_DIR]

Phases, each measured on its own:
  connect      every device connects (paced), retained presence and last will in place
  bridges_1    escalations at --rate per device with one bridge: rate, p50/p99, CPU per process
  bridges_2    the same with a second bridge on the shared subscription ($share, MQTT 5); the
               bridges share one dedupe file (--dedupe-db), so a request runs once across them
  storm        Mosquitto SIGKILLed and restarted (persistence on): time until every device is
               back, the broker's peak connection rate (connections accepted in the busiest 1-s
               window, from each device's connect time), escalations continuing throughout
  drain        escalations stop; every owed request must be answered (lost), none run twice
  rollout      a 1 MiB model pushed with a 5% canary: time until every device reports it active,
               the devices' fetches, the chunk publishes (the push's for the fleet, the
               distributor's resends to one device each), the chunk bytes delivered and the
               bytes the broker sent meanwhile (its $SYS/broker/bytes/sent, less the copies
               sent to the bench's own counter)

CPU is read from /proc/<pid>/stat (utime + stime, the process and its children) for the broker,
each bridge, Triton and this process (the simulated fleet). The machine's every core is shared
between them, so the process that saturates first is where the limit is. The last line printed
is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from process_cpu import cpu_seconds

from edgewire import delivery, topics
from edgewire.cloud_bridge.model_repository import write_python_repository
from edgewire.cloud_bridge.triton_server import EmbeddedTriton
from edgewire.demo.models import build_demo
from edgewire.fleet.history import History
from edgewire.fleet.rollout import push_model
from edgewire.fleet.sim import Fleet, anonymous_identities, load_frames, percentile
from edgewire.fleet.sim_device import SimSettings
from edgewire.ports import free_port, wait_port
from edgewire.session import MqttSession

BYTES_SENT = "$SYS/broker/bytes/sent"
FILES = 16_384  # open files for the broker and this process: one socket per device and then some


def raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, FILES), hard), hard))


class Mosquitto:
    """The bench's broker: persistence on, no connection limit."""

    def __init__(self, work: Path) -> None:
        self.exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(self.exe).exists():
            raise SystemExit("this benchmark needs mosquitto (apt-get install -y mosquitto)")
        self.port = free_port()
        self.conf = work / "mosquitto.conf"
        (work / "mosquitto-data").mkdir(exist_ok=True)
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
            "max_connections -1\nmax_inflight_messages 0\nmax_queued_messages 10000\n"
            f"persistence true\npersistence_location {work / 'mosquitto-data'}/\nautosave_interval 5\n"
            "sys_interval 1\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "-c", str(self.conf)], stderr=subprocess.DEVNULL, preexec_fn=raise_file_limit
        )
        wait_port(self.port)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


class BrokerCounter:
    """Chunks published on the broker, one copy each (the push's for the fleet, the
    distributor's resends to one device), and the bytes the broker has sent (its
    ``$SYS/broker/bytes/sent``, every ``sys_interval``), seen on a session of its own."""

    def __init__(self, port: int) -> None:
        self.session = MqttSession("bench-chunks", "127.0.0.1", port, protocol="5")
        self.publishes = 0
        self.resends = 0
        self.received_bytes = 0  # what the broker sent this counter: not part of the rollout's cost
        self.bytes_sent = 0
        self.bytes_updates = 0

    async def follow(self) -> None:
        # QoS 1: a QoS 0 copy of a 512 KiB chunk may be dropped by a busy broker, and go uncounted.
        await self.session.subscribe(topics.MODEL_CHUNK.filter(), qos=1)
        await self.session.subscribe(topics.MODEL_RESEND.filter(), qos=1)
        await self.session.subscribe(BYTES_SENT, qos=0)
        async for message in self.session.messages():
            self.received_bytes += len(message.payload) + len(message.topic) + 4  # + fixed header, id
            if message.topic == BYTES_SENT:
                self.bytes_sent = int(bytes(message.payload))
                self.bytes_updates += 1
            elif message.topic.startswith("model/resend/"):
                self.resends += 1
            else:
                self.publishes += 1

    async def next_bytes_sent(self) -> int:
        """The broker's count published after now (a fresh one, not the last seen)."""
        seen = self.bytes_updates
        deadline = time.monotonic() + 10
        while True:  # the update under way when asked may have been counted before it
            if self.bytes_updates >= seen + 2 or time.monotonic() > deadline:
                return self.bytes_sent
            await asyncio.sleep(0.1)


async def phase(fleet: Fleet, seconds: float, pids: dict[str, int]) -> dict[str, object]:
    """Escalate for ``seconds`` and measure what answered in that window, and who spent the CPU."""
    for device in fleet.devices:
        device.stats.round_trip_ms.clear()
    answered0 = sum(d.stats.answered for d in fleet.devices)
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - t0
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    answered = sum(d.stats.answered for d in fleet.devices) - answered0
    latencies = [ms for d in fleet.devices for ms in d.stats.round_trip_ms]
    per_k = 1000 / max(1, answered)
    return {
        "escalations_per_s": round(answered / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50), 1),
        "p99_ms": round(percentile(latencies, 99), 1),
        "owed_at_end": fleet.owed,
        "cpu_s_per_1000": {name: round(v * per_k, 3) for name, v in cpu.items()},
        "cpu_share_of_one_core": {name: round(v / elapsed, 2) for name, v in cpu.items()},
    }


def bridge_runs(metrics_port: int) -> float:
    """Requests a bridge ran (its requests_total, every status), from its Prometheus endpoint."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    lines = [line for line in text.splitlines() if line.startswith("edgewire_requests_total{")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def start_bridge(triton_grpc: str, port: int, k: int, metrics_port: int, dedupe_db: Path) -> subprocess.Popen[bytes]:
    """One bridge of the group; the group shares ``dedupe_db``, so a request runs once across it."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgewire.cli",
            "bridge",
            "--triton",
            f"grpc://{triton_grpc}",
            "--broker",
            f"mqtt://127.0.0.1:{port}",
            "--id",
            f"bench-bridge-{k}",
            "--metrics-port",
            str(metrics_port),
            "--dedupe-db",
            str(dedupe_db),
        ]
    )


async def launch_bridge(triton_grpc: str, port: int, k: int, dedupe_db: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A bridge serving its metrics, and their port. The port is picked just before the bridge
    starts, and picked again if the bridge could not bind it: the fleet's client sockets take
    ephemeral ports, so one picked earlier may be a device's by then."""
    for _ in range(3):
        metrics_port = free_port()
        proc = start_bridge(triton_grpc, port, k, metrics_port, dedupe_db)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", metrics_port)) == 0:
                    return proc, metrics_port
            await asyncio.sleep(0.2)
        proc.kill()
        proc.wait()
    raise RuntimeError(f"bridge {k} did not start")


async def storm(fleet: Fleet, broker: Mosquitto) -> dict[str, object]:
    """SIGKILL the broker under the whole fleet and start it again at once."""
    broker.kill()
    t_kill = time.monotonic()
    while True:  # every session has seen its link drop
        if not fleet.connected:
            break
        await asyncio.sleep(0.02)
    broker.start()
    t_up = time.monotonic()
    while True:
        if fleet.connected == len(fleet.devices) or time.monotonic() - t_up > 180:
            break
        await asyncio.sleep(0.05)
    # Each session notes when the broker accepted it: the storm as the broker saw it.
    back = sorted(d.session.connected_at for d in fleet.devices if d.session.connected_at >= t_up)
    return {
        "reconnect_all_s": round((back[-1] if back else time.monotonic()) - t_up, 2),
        "all_down_after_kill_s": round(t_up - t_kill, 2),
        "devices_back": fleet.connected,
        "peak_connections_per_s": peak_per_window(back, 1.0),
    }


def peak_per_window(times: list[float], window_s: float) -> int:
    """The most of the sorted ``times`` that fall within any one ``window_s``-long window."""
    peak = start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window_s:
            start += 1
        peak = max(peak, end - start + 1)
    return peak


class BridgeRuns:
    """Requests run by the bridges, summed; a stopped bridge keeps the count last read from it."""

    def __init__(self, ports: list[int]) -> None:
        self.last = dict.fromkeys(ports, 0.0)
        self.twice_so_far = 0.0

    def total(self) -> float:
        for port in self.last:
            with contextlib.suppress(OSError):
                self.last[port] = bridge_runs(port)
        return sum(self.last.values())


async def storm_and_drain(fleet: Fleet, broker: Mosquitto, runs: BridgeRuns) -> dict[str, object]:
    """A broker restart under load, then escalations stopped and every owed answer awaited:
    what was lost, what a device got answered twice, what a bridge ran twice."""
    duplicates0 = sum(d.stats.duplicates for d in fleet.devices)
    redelivered0 = sum(d.stats.redelivered for d in fleet.devices)
    out = await storm(fleet, broker)
    await asyncio.sleep(5)  # escalations continue on the restored links
    await fleet.stop_escalating()
    out["drained"] = await fleet.drain(120)
    out["lost"] = fleet.owed
    out["duplicates"] = sum(d.stats.duplicates for d in fleet.devices) - duplicates0
    out["redelivered"] = sum(d.stats.redelivered for d in fleet.devices) - redelivered0
    made = sum(d._seq for d in fleet.devices)  # noqa: SLF001 - requests the fleet made so far
    twice = runs.total() - made
    out["runs_twice"] = twice - runs.twice_so_far
    runs.twice_so_far = twice
    return out


async def rollout(
    fleet: Fleet, port: int, work: Path, counter: BrokerCounter, canary_percent: float, max_rss_mib: int
) -> dict[str, object]:
    artefact = work / "fleet-model.plan"
    artefact.write_bytes(os.urandom(1 << 20))
    manifest = delivery.build_manifest(artefact, name="fleet-model", version="1")
    chunks0, resends0 = counter.publishes, counter.resends
    sent0 = await counter.next_bytes_sent()
    counted0 = counter.received_bytes
    t0 = time.monotonic()
    async with MqttSession("bench-operator", "127.0.0.1", port, protocol="5") as operator:
        await operator.wait_connected(10)
        result = await push_model(
            operator,
            artefact,
            manifest,
            history=History(work / "history"),
            canary_percent=canary_percent,
            probation_s=2.0,
            timeout_s=120,
            quiet_s=2.0,
        )
    pushed_s = time.monotonic() - t0
    deadline = time.monotonic() + 180
    stopped = None
    while time.monotonic() < deadline:
        if all(d.models.get("fleet-model") == "1" for d in fleet.devices):
            break
        if fleet_rss_kib() > max_rss_mib * 1024:  # the machine is shared: never run it out of memory
            stopped = f"simulator past {max_rss_mib} MiB"
            break
        await asyncio.sleep(0.1)
    all_active_s = time.monotonic() - t0
    return {
        "rollout_outcome": result.outcome,
        "rollout_stopped": stopped,
        "canaries": len(result.canaries),
        "rollout_promoted_s": round(pushed_s, 2),
        "rollout_all_active_s": round(all_active_s, 2),
        "devices_active": sum(1 for d in fleet.devices if d.models.get("fleet-model") == "1"),
        "chunks_received_by_devices": sum(d.stats.chunks for d in fleet.devices),
        "chunk_mib_delivered": round(sum(d.stats.chunks for d in fleet.devices) * manifest.chunk_size / (1 << 20), 1),
        "fetch_requests": sum(d.stats.fetches for d in fleet.devices),
        "chunk_publishes": counter.publishes - chunks0,
        "resend_publishes": counter.resends - resends0,
        "broker_mib_sent": round(
            (await counter.next_bytes_sent() - sent0 - (counter.received_bytes - counted0)) / (1 << 20), 1
        ),
    }


async def main_async(args: argparse.Namespace, work: Path) -> dict[str, object]:
    raise_file_limit()
    frames = load_frames(build_demo(args.data or work / "demo").frames_dir)
    repo = work / "repo"
    write_python_repository(repo, [build_demo(args.data or work / "demo").cloud_model])
    broker = Mosquitto(work)
    broker.start()
    bridges: list[subprocess.Popen[bytes]] = []
    distributor = subprocess.Popen(
        [sys.executable, "-m", "edgewire.cli", "distributor", "--broker", f"mqtt://127.0.0.1:{broker.port}",
         "--store", str(work / "store"), "--id", "bench-distributor"]
    )  # fmt: skip
    settings = SimSettings(
        port=broker.port,
        escalations_per_s=args.rate,
        deadline_ms=args.deadline_ms,
        telemetry_interval_s=5.0,
        reconnect_min_s=args.reconnect_window_s,
        reconnect_max_s=30.0,
        connect_per_s=args.connect_per_s,
        replay=args.replay,
        fetch_after_s=args.fetch_after_s,
    )
    fleet = Fleet(anonymous_identities(args.devices, "fleet-"), settings, frames)
    chunk_counter = BrokerCounter(broker.port)
    out: dict[str, object] = {"devices": args.devices, "rate_per_device": args.rate, "replay": args.replay}
    async with EmbeddedTriton(repo, workdir=work) as triton, chunk_counter.session:
        follower = asyncio.create_task(chunk_counter.follow())
        try:
            bridge, metrics_port = await launch_bridge(triton.grpc_url, broker.port, 0, work / "dedupe.db")
            bridges.append(bridge)
            metrics_ports = [metrics_port]
            await asyncio.sleep(args.settle_s)  # the bridge's subscription in place before any request
            t0 = time.monotonic()
            connect_s = await fleet.start(connect_timeout_s=300)
            out["connect_all_s"] = round(connect_s, 2)
            out["devices_connected"] = fleet.connected
            out["rss_kib_per_device"] = round((fleet_rss_kib() - fleet._rss0) / args.devices, 1)  # noqa: SLF001
            pids = {"broker": broker.proc.pid, "bridge0": bridges[0].pid, "triton": triton._proc.pid,  # noqa: SLF001
                    "fleet": os.getpid()}  # fmt: skip
            await asyncio.sleep(3)  # first escalations in flight: the warm-up is not measured
            out["bridges_1"] = await phase(fleet, args.phase_s, pids)
            bridge, metrics_port = await launch_bridge(triton.grpc_url, broker.port, 1, work / "dedupe.db")
            bridges.append(bridge)
            metrics_ports.append(metrics_port)
            await asyncio.sleep(args.settle_s)
            pids["bridge1"] = bridges[1].pid
            out["bridges_2"] = await phase(fleet, args.phase_s, pids)
            # The storm twice: with both bridges on the shared subscription, then with one.
            runs = BridgeRuns(metrics_ports)
            out["storm_2_bridges"] = await storm_and_drain(fleet, broker, runs)
            runs.total()  # the second bridge's count, read before it stops
            bridges[1].terminate()
            bridges[1].wait(30)
            fleet.start_escalating()
            await asyncio.sleep(5)
            out["storm_1_bridge"] = await storm_and_drain(fleet, broker, runs)
            summary = fleet.summary(time.monotonic() - t0)
            one = out["storm_1_bridge"]
            assert isinstance(one, dict)
            for key in ("reconnect_all_s", "peak_connections_per_s", "lost", "duplicates", "runs_twice"):
                out[key] = one[key]
            out["escalations_total"] = summary["escalations_answered"]
            out["statuses"] = summary["statuses"]
            out["not_ok_reasons"] = summary["not_ok_reasons"]
            out["fleet_cpu_ms_per_device_s"] = summary["cpu_ms_per_device_s"]
            if not args.no_rollout:
                pushed = await rollout(fleet, broker.port, work, chunk_counter, args.canary_percent, args.max_rss_mib)
                out.update(pushed)
        finally:
            follower.cancel()
            await fleet.close()
            for bridge in bridges:
                bridge.terminate()
            distributor.terminate()
            for proc in [*bridges, distributor]:
                proc.wait(30)
            broker.stop()
    steady = out["bridges_1"]
    assert isinstance(steady, dict)
    out["escalations_per_s"] = steady["escalations_per_s"]
    out["p50_ms"] = steady["p50_ms"]
    out["p99_ms"] = steady["p99_ms"]
    out["broker_cpu_s"] = steady["cpu_s_per_1000"]["broker"]
    out["bridge_cpu_s"] = steady["cpu_s_per_1000"]["bridge0"]
    return out


def fleet_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=0.3, help="escalations per device per second")
    parser.add_argument("--deadline-ms", type=int, default=60_000)
    parser.add_argument("--phase-s", type=float, default=30.0, help="seconds of each measured phase")
    parser.add_argument("--settle-s", type=float, default=4.0, help="wait for a new bridge's subscription")
    parser.add_argument("--connect-per-s", type=float, default=500.0, help="paced connects at start")
    parser.add_argument("--reconnect-window-s", type=float, default=2.0, help="the devices' reconnect_min_s")
    parser.add_argument(
        "--replay", choices=["all", "unacknowledged"], default="all", help="owed requests sent again on reconnect"
    )
    parser.add_argument("--fetch-after-s", type=float, default=5.0, help="the devices' wait before fetching chunks")
    parser.add_argument("--canary-percent", type=float, default=5.0)
    parser.add_argument("--no-rollout", action="store_true")
    parser.add_argument("--max-rss-mib", type=int, default=3072, help="stop the rollout if the simulator grows past")
    parser.add_argument("--data", type=Path, default=None, help="reuse a demo folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(main_async(args, Path(tmp)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
