"""The escalation round trip against a direct Triton call, on Mosquitto, in one run.

mqtt: device -> Mosquitto -> bridge (own process) -> Triton -> bridge -> Mosquitto -> device,
      measured at the device from publishing the request to receiving its result.
direct: the same image decoded and preprocessed the same way, sent straight to the same Triton
        model with tritonclient (gRPC, asyncio), as an application without edgewire would.

Both run at 1 request in flight (latency) and at 32 in flight (throughput). The last line is
one JSON object.

    python bench/roundtrip.py [--requests 3000] [--concurrent 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from process_cpu import cpu_seconds

from edgewire import envelopes as env
from edgewire import topics
from edgewire.cloud_bridge.model_repository import model_meta_from_config, write_python_repository
from edgewire.cloud_bridge.triton_server import EmbeddedTriton
from edgewire.demo.models import build_demo
from edgewire.modelmeta import ModelMeta
from edgewire.ports import free_port, wait_port
from edgewire.preprocess import Preprocessor, decode
from edgewire.session import MqttSession


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


class CpuMeter:
    """CPU seconds of this process and of each child process tree (bridge, broker, Triton), so
    a phase's cost per request can be read per process; the 2-core hosts this runs on share
    every core between them."""

    def __init__(self, groups: dict[str, int]) -> None:
        self.groups = groups  # name -> pid of the tree's root
        self.totals: dict[str, dict[str, float]] = {}

    def sample(self) -> dict[str, float]:
        return {name: cpu_seconds(pid, tree=name != "bench") for name, pid in self.groups.items()}

    def add(self, phase: str, before: dict[str, float], n: int) -> None:
        after = self.sample()
        acc = self.totals.setdefault(phase, {"n": 0.0})
        acc["n"] += n
        for name in self.groups:
            acc[name] = acc.get(name, 0.0) + after[name] - before[name]

    def report(self) -> dict[str, dict[str, float]]:
        """Microseconds of CPU per request, per process group and phase."""
        return {
            phase: {name: round(v / acc["n"] * 1e6, 1) for name, v in acc.items() if name != "n"}
            for phase, acc in self.totals.items()
        }


class MqttDevice:
    """The device side of the round trip: publishes requests, matches results by trace_id."""

    def __init__(self, session: MqttSession, device_id: str, payload: bytes) -> None:
        self.session = session
        self.device_id = device_id
        self.payload = payload
        self.waiting: dict[str, asyncio.Future[env.Result]] = {}
        self.n = 0
        self.bridge_ms: list[float] = []
        self.reply_to = topics.RESULT.build(device_id=device_id)  # a device's own topic: built once

    async def listen(self) -> None:
        async for msg in self.session.messages():
            result = env.decode(env.Result, msg.payload)
            fut = self.waiting.pop(result.trace_id, None)
            if fut is not None and not fut.done():
                fut.set_result(result)

    async def one(self) -> float:
        self.n += 1
        trace_id = f"b{self.n}"
        now = time.time()
        req = env.Request(
            trace_id=trace_id,
            device_id=self.device_id,
            created=now,
            deadline=now + 30,
            model_hint="digits",
            payload=self.payload,
            content_type="image/jpeg",
            reply_to=self.reply_to,
        )
        fut: asyncio.Future[env.Result] = asyncio.get_running_loop().create_future()
        self.waiting[trace_id] = fut
        t0 = time.perf_counter()
        await self.session.publish(
            topics.REQUEST.build(device_id=self.device_id, trace_id=trace_id), env.encode(req), qos=1
        )
        result = await fut
        self.bridge_ms.append(result.timings.total_ms)
        if result.status != "ok":
            raise RuntimeError(f"{trace_id}: {result.status} {result.reason}")
        return (time.perf_counter() - t0) * 1000


class Direct:
    def __init__(self, url: str, model: str, payload: bytes) -> None:
        import tritonclient.grpc.aio as grpcclient

        self.client = grpcclient.InferenceServerClient(url)
        self.model = model
        self.payload = payload
        self.meta: ModelMeta | None = None

    async def start(self) -> None:
        cfg = await self.client.get_model_config(self.model)
        self.meta = model_meta_from_config(cfg)
        self.pre = Preprocessor(self.meta.input)

    async def one(self) -> float:
        from tritonclient.grpc import InferInput, InferRequestedOutput

        assert self.meta is not None
        t0 = time.perf_counter()
        tensor = self.pre.batch([decode(self.payload, self.pre.gray)])
        inp = InferInput(self.meta.input.name, list(tensor.shape), "FP32")
        inp.set_data_from_numpy(tensor)
        res = await self.client.infer(self.model, [inp], outputs=[InferRequestedOutput(self.meta.output)])
        res.as_numpy(self.meta.output)
        return (time.perf_counter() - t0) * 1000


async def serial(fn, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    return [await fn() for _ in range(n)]


async def concurrent(fn, n: int, width: int) -> float:  # type: ignore[no-untyped-def]
    """Requests per second with ``width`` in flight."""
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:
            await fn()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(width)))
    return n / (time.perf_counter() - t0)


async def main_async(args: argparse.Namespace, work: Path) -> dict[str, object]:
    arts = build_demo(args.data or work / "demo")
    payload = sorted(arts.frames_dir.glob("*.jpg"))[0].read_bytes()
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        raise SystemExit("this benchmark needs mosquitto (apt-get install -y mosquitto)")
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\nmax_inflight_messages 0\n")
    broker = subprocess.Popen([exe, "-c", str(conf)], stderr=subprocess.DEVNULL)
    wait_port(port)
    repo = work / "repo"
    write_python_repository(repo, [arts.cloud_model])
    async with EmbeddedTriton(repo, workdir=work) as triton:
        bridges = [
            subprocess.Popen(
                [
                    sys.executable,
                    *(["-m", "cProfile", "-o", str(args.profile_bridge)] if args.profile_bridge and k == 0 else []),
                    "-m",
                    "edgewire.cli",
                    "bridge",
                    "--triton",
                    triton.http_url if args.http else f"grpc://{triton.grpc_url}",
                    "--broker",
                    f"mqtt://127.0.0.1:{port}",
                    "--id",
                    f"bench-bridge-{k}",
                    # One bench device stands for a fleet's load: its budget must not be what is measured.
                    "--device-rate",
                    "100000",
                    "--device-burst",
                    "1000000",
                    *(["--decode-workers", str(args.decode_workers)] if args.decode_workers is not None else []),
                ],
            )
            for k in range(args.bridges)
        ]
        direct = Direct(triton.grpc_url, "digits-cloud", payload)
        await direct.start()
        try:
            async with MqttSession("bench-dev", "127.0.0.1", port, max_inflight=1000) as session:
                await session.wait_connected(10)
                await session.subscribe(topics.RESULT.build(device_id="bench-dev"), qos=1)
                dev = MqttDevice(session, "bench-dev", payload)
                listener = asyncio.create_task(dev.listen())
                # Warm both paths (and wait for the bridge's subscription to be in place).
                deadline = time.monotonic() + 30
                while True:
                    try:
                        await asyncio.wait_for(dev.one(), 2)
                        break
                    except asyncio.TimeoutError:
                        if time.monotonic() > deadline:
                            raise
                await serial(dev.one, 50)
                await serial(direct.one, 50)
                groups = {"bench": os.getpid(), "broker": broker.pid, "triton": triton._proc.pid}  # noqa: SLF001 - CPU of the server process the bench started
                groups.update({f"bridge{k}": b.pid for k, b in enumerate(bridges)})
                cpu = CpuMeter(groups) if args.cpu else None
                direct_lat, mqtt_lat, tput_direct, tput_mqtt = [], [], [], []
                bridge_serial, bridge_32 = [], []  # time spent inside the bridge, from its own timings
                for _ in range(args.rounds):
                    direct_lat += await serial(direct.one, args.requests // args.rounds)
                    dev.bridge_ms = []
                    mqtt_lat += await serial(dev.one, args.requests // args.rounds)
                    bridge_serial += dev.bridge_ms
                    before = cpu.sample() if cpu else {}
                    tput_direct.append(await concurrent(direct.one, args.requests, args.concurrent))
                    if cpu:
                        cpu.add("direct_32", before, args.requests)
                    dev.bridge_ms = []
                    before = cpu.sample() if cpu else {}
                    tput_mqtt.append(await concurrent(dev.one, args.requests, args.concurrent))
                    if cpu:
                        cpu.add("mqtt_32", before, args.requests)
                    bridge_32 += dev.bridge_ms
                listener.cancel()
        finally:
            await direct.client.close()
            for bridge in bridges:
                bridge.terminate()
            for bridge in bridges:
                bridge.wait(30)
            broker.terminate()
            broker.wait(10)
    d50, m50 = pct(direct_lat, 50), pct(mqtt_lat, 50)
    extra = {"cpu_us_per_request": cpu.report()} if cpu else {}
    return {
        **extra,
        "direct_p50_ms": round(d50, 3),
        "direct_p99_ms": round(pct(direct_lat, 99), 3),
        "mqtt_p50_ms": round(m50, 3),
        "mqtt_p99_ms": round(pct(mqtt_lat, 99), 3),
        "added_p50_ms": round(m50 - d50, 3),
        "added_p99_ms": round(pct(mqtt_lat, 99) - pct(direct_lat, 99), 3),
        "direct_rps_32": round(statistics.median(tput_direct), 1),
        "mqtt_rps_32": round(statistics.median(tput_mqtt), 1),
        "throughput_ratio_32": round(statistics.median(m / d for m, d in zip(tput_mqtt, tput_direct, strict=True)), 3),
        "bridge_ms_serial_p50": round(pct(bridge_serial, 50), 3),
        "bridge_ms_at_32_p50": round(pct(bridge_32, 50), 3),
        "requests": args.requests,
        "rounds": args.rounds,
        "concurrent": args.concurrent,
        "bridges": args.bridges,
        "broker": "mosquitto",
        "targets": {"added_p50_ms": 5.0, "throughput_ratio_32": 0.7},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--requests", type=int, default=3000, help="requests per throughput measurement (a third per latency round)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=32)
    parser.add_argument("--data", type=Path, default=None, help="reuse a demo folder")
    parser.add_argument("--http", action="store_true", help="bridge talks HTTP to Triton")
    parser.add_argument("--bridges", type=int, default=1, help="bridge processes sharing the request subscription")
    parser.add_argument("--decode-workers", type=int, default=None, help="the bridge's (default: its own default)")
    parser.add_argument("--cpu", action="store_true", help="report CPU per request of each process at 32 in flight")
    parser.add_argument("--profile-bridge", type=Path, default=None, help="cProfile the bridge into this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(main_async(args, Path(tmp)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
