"""A device's latency with and without a flooding neighbour, in one run.

victim: a device escalating at a steady, modest rate (open loop: a request every 1/rate s,
        whatever the answers do), measured at the device from publishing a request to
        receiving its result.
flooder: another device (own process) publishing valid requests as fast as its connection
        takes them (or ``--flood-rate`` a second), far past its budget at the bridge. It runs
        SCHED_IDLE: its CPU stands for another device's, not the cloud host's; what its flood
        costs the broker and the bridge is counted in full.

Broker (Mosquitto when installed, with logins, the fleet's ACL and the flood limit plugin,
broker/mosquitto_flood_limit.c, built here; ``--no-flood-limit``: open to anonymous clients as
the other benches run it. Else the embedded one, with logins so that it paces each device's
connection, see edgewire.broker.pacing; ``--device-read-rate`` sets its budget), bridge (own
process, with a per-device budget) and a real Triton are shared.
Phases alternate A (victim alone), B (victim and flooder), A, B, ... so drifts in the machine's
load fall on both alike; between phases the queues drain. The last line is one JSON object:
the victim's p50/p99 alone and flooded, ``p99_ratio`` (flooded / alone; target <= 1.5), what
the flooder sent and got back, and the victim's lost requests (must be 0); where the victim's
time went (to the bridge, in it, back) and the CPU each process used in each phase.
``--flood-nowhere`` is the control: the same flood on a topic no one reads, so what is left is
the host's cost of carrying it (broker, flooder), not the bridge's.

``--no-shield`` runs the bridge without its flood shield (cloud_bridge.flood_shield): it reads
every flooded request and drops it itself.

    python bench/flood.py [--rounds 4] [--phase-s 8] [--victim-rate 20] [--flood-rate 0] [--flood-nowhere] [--no-shield]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from process_cpu import cpu_seconds

from edgewire import envelopes as env
from edgewire import topics
from edgewire.ports import free_port, wait_port
from edgewire.session import MqttSession, NotConnected

ROOT = Path(__file__).resolve().parents[1]
VICTIM, FLOODER, BRIDGE = "cam-victim", "cam-flooder", "bench-bridge"
#: A trace id placeholder in the flooder's one encoded request, replaced per message (same length).
PLACEHOLDER = "X" * 32
#: How the flooder is scheduled on the bench host (see serve_flooder).
sched = {"policy": "normal"}
#: The one password of every login on the embedded broker, handed to the bench's processes.
LOGIN_ENV = "EDGEWIRE_BENCH_FLOOD_LOGIN"


def login(user: str) -> dict[str, str | None]:
    """Username and password for ``user`` where the broker asks for logins (the embedded one)."""
    password = os.environ.get(LOGIN_ENV)
    return {"username": user if password else None, "password": password}


class CpuShare:
    """CPU used by each process (tree) over a phase, as a share of one core: what the flood
    costs the broker and the bridge, and what the flooder itself burns."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.totals: dict[str, dict[str, float]] = {}

    def _cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid, tree=name != "victim") for name, pid in self.pids.items()}

    def start(self) -> tuple[float, dict[str, float]]:
        return time.perf_counter(), self._cpu()

    def add(self, phase: str, started: tuple[float, dict[str, float]]) -> None:
        t0, before = started
        after, seconds = self._cpu(), time.perf_counter() - t0
        acc = self.totals.setdefault(phase, {"s": 0.0})
        acc["s"] += seconds
        for name in self.pids:
            acc[name] = acc.get(name, 0.0) + after[name] - before[name]

    def report(self) -> dict[str, dict[str, float]]:
        return {
            phase: {name: round(v / acc["s"], 3) for name, v in acc.items() if name != "s"}
            for phase, acc in self.totals.items()
        }


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def request(device_id: str, trace_id: str, payload: bytes, deadline_s: float = 30.0) -> env.Request:
    now = time.time()
    return env.Request(
        trace_id=trace_id,
        device_id=device_id,
        created=now,
        deadline=now + deadline_s,
        model_hint="digits",
        payload=payload,
        content_type="image/jpeg",
        reply_to=topics.RESULT.build(device_id=device_id),
    )


# -- the broker -----------------------------------------------------------------------------


def write_logins(work: Path) -> None:
    """One password for every user of the bench (the bridge's role is bridge), in the password
    file both brokers read; the bench's processes find it in their environment."""
    from edgewire.passwords import hash_password

    password = secrets.token_urlsafe(16)
    os.environ[LOGIN_ENV] = password
    hashed = hash_password(password)
    (work / "passwd").write_text("".join(f"{user}:{hashed}\n" for user in (VICTIM, FLOODER, BRIDGE)))
    (work / "roles.yaml").write_text(f"{BRIDGE}: bridge\n")


def start_broker(work: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], int, str]:
    """Mosquitto from the shipped config with logins, the fleet's ACL and the flood limit plugin
    (broker/mosquitto_flood_limit.c, built here), or with ``--no-flood-limit`` open to anonymous
    clients as the other benches run it; or the embedded broker with logins, as a fleet runs it."""
    port = free_port()
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    kind = args.broker
    if kind == "auto":
        kind = "mosquitto" if Path(exe).exists() else "embedded"
    if kind == "mosquitto":
        conf = (ROOT / "broker" / "mosquitto.conf").read_text()
        conf = re.sub(r"^listener .*$", f"listener {port} 127.0.0.1", conf, flags=re.M)
        if args.no_flood_limit:
            conf = re.sub(r"^allow_anonymous false$", "allow_anonymous true", conf, flags=re.M)
            conf = re.sub(r"^(password_file|acl_file|use_username_as_clientid) .*$", "", conf, flags=re.M)
        else:
            from edgewire.acl import mosquitto_acl
            from edgewire.broker import mosquitto_plugin

            write_logins(work)
            (work / "acl").write_text(mosquitto_acl({BRIDGE: "bridge"}))
            conf = re.sub(r"^password_file .*$", f"password_file {work / 'passwd'}", conf, flags=re.M)
            conf = re.sub(r"^acl_file .*$", f"acl_file {work / 'acl'}", conf, flags=re.M)
            plugin = mosquitto_plugin.build(work / "plugin")
            conf += "\n" + mosquitto_plugin.conf_lines([BRIDGE], plugin=str(plugin))
            conf += "\nuser root\n" if os.geteuid() == 0 else ""
        path = work / "mosquitto.conf"
        path.write_text(conf)
        proc = subprocess.Popen([exe, "-c", str(path)], stderr=subprocess.DEVNULL)
    else:
        write_logins(work)
        cmd = [sys.executable, "-m", "edgewire.cli", "broker", "--port", str(port)]
        cmd += ["--password-file", str(work / "passwd"), "--roles", str(work / "roles.yaml")]
        cmd += ["--device-read-rate", str(args.device_read_rate)] if args.device_read_rate else []
        cmd += ["--device-read-burst", str(args.device_read_burst)] if args.device_read_burst else []
        proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    wait_port(port, timeout=30)
    return proc, port, kind


# -- the bridge (own process) ---------------------------------------------------------------


def serve_bridge(args: argparse.Namespace) -> None:
    from edgewire.cloud_bridge.bridge import Bridge
    from edgewire.cloud_bridge.dispatch import Dispatcher
    from edgewire.cloud_bridge.rules import default_rules
    from edgewire.config import BrokerSettings

    async def main() -> None:
        dispatcher = Dispatcher([args.triton])
        bridge = Bridge(
            BRIDGE,
            BrokerSettings(url=f"mqtt://127.0.0.1:{args.port}", **login(BRIDGE)),
            dispatcher,
            default_rules("digits-cloud"),
            device_rate_per_s=args.device_rate,
            device_burst=args.device_burst,
            flood_shield=not args.no_shield,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, bridge.stop)
        lags: list[float] = []

        async def lag() -> None:  # how late the bridge's event loop runs a 10 ms timer
            while True:
                t0 = time.perf_counter()
                await asyncio.sleep(0.01)
                lags.append((time.perf_counter() - t0 - 0.01) * 1000)

        watcher = asyncio.create_task(lag())
        try:
            await bridge.run()
        finally:
            watcher.cancel()
            await dispatcher.close()
        meter = {k: bridge.meter.total(k) for k in ("requests_rate_limited_total", "devices_shut_out_total")}
        print(json.dumps({"meter": meter, "loop_lag_p99_ms": pct(lags, 99), "loop_lag_max_ms": max(lags)}), flush=True)

    asyncio.run(main())


# -- the flooder (own process) --------------------------------------------------------------


def serve_flooder(args: argparse.Namespace) -> None:
    """Publishes as fast as the connection takes them while switched on (``go`` / ``stop`` on
    stdin), a window of unacknowledged publishes at a time; ``report`` prints its counts."""

    # The flooder stands for another device, whose CPU is its own, not the cloud's: on a bench
    # host whose cores the broker, the bridge and Triton share with it, it runs only on CPU no
    # one else wants (SCHED_IDLE), so its own cost is not counted as the bridge's. What the
    # flood costs the broker and the bridge is counted in full.
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        sched["policy"] = "SCHED_IDLE"

    async def main() -> None:
        payload = Path(args.frame).read_bytes()
        template = env.encode(request(FLOODER, PLACEHOLDER, payload, deadline_s=3600))
        head, tail = template.split(PLACEHOLDER.encode())
        counts: Counter[str] = Counter()
        on = asyncio.Event()
        quit_ = asyncio.Event()
        loop = asyncio.get_running_loop()
        out_lock = threading.Lock()

        def report() -> None:
            with out_lock:
                print(json.dumps({**counts, "sched": sched["policy"]}), flush=True)

        def commands() -> None:
            for line in sys.stdin:
                word = line.strip()
                if word == "go":
                    loop.call_soon_threadsafe(on.set)
                elif word == "stop":
                    loop.call_soon_threadsafe(on.clear)
                elif word == "report":
                    loop.call_soon_threadsafe(report)
            loop.call_soon_threadsafe(quit_.set)

        threading.Thread(target=commands, daemon=True).start()
        async with MqttSession(FLOODER, "127.0.0.1", args.port, max_inflight=args.window, **login(FLOODER)) as session:
            await session.wait_connected(30)
            await session.subscribe(topics.RESULT.build(device_id=FLOODER), qos=1)

            async def listen() -> None:
                async for msg in session.messages():
                    result = env.decode(env.Result, msg.payload)
                    counts["answered"] += 1
                    counts["rate_limited" if result.reason == "rate limited" else f"status_{result.status}"] += 1

            async def flood() -> None:
                seq = 0
                window = asyncio.Semaphore(args.window)
                pace = 1.0 / args.flood_rate if args.flood_rate > 0 else 0.0
                next_at = time.perf_counter()
                while True:
                    await on.wait()
                    await window.acquire()
                    if pace:  # a flood no faster than a device's link would carry
                        next_at = max(next_at + pace, time.perf_counter() - 0.1)
                        if next_at > time.perf_counter():
                            await asyncio.sleep(next_at - time.perf_counter())
                    seq += 1
                    trace = f"{seq:032x}"
                    try:
                        acked = session.publish_soon(
                            f"nowhere/{FLOODER}/{trace}"
                            if args.flood_nowhere
                            else topics.REQUEST.build(device_id=FLOODER, trace_id=trace),
                            head + trace.encode() + tail,
                            qos=topics.REQUEST.qos,
                        )
                    except NotConnected:
                        window.release()
                        await asyncio.sleep(0.05)
                        continue
                    counts["sent"] += 1
                    acked.add_done_callback(lambda f: (window.release(), f.cancelled() or f.exception()))

            tasks = [asyncio.create_task(listen()), asyncio.create_task(flood())]
            await quit_.wait()
            for task in tasks:
                task.cancel()
        report()

    asyncio.run(main())


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def serve_raw_flooder(args: argparse.Namespace) -> None:
    """The same flood from a lean client: MQTT 3.1.1 PUBLISH packets (QoS 1, a window of
    unacknowledged ones) written straight to a socket in batches, PUBACKs counted by their
    bytes. A flooding device's CPU is its own, not the cloud host's; this flooder spends a
    fraction of the asyncio one's per message, so on a bench host that runs everything what
    the flood costs is closer to what the broker and the bridge pay, not the flooder itself."""
    import socket

    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        sched["policy"] = "SCHED_IDLE"
    payload = Path(args.frame).read_bytes()
    template = env.encode(request(FLOODER, PLACEHOLDER, payload, deadline_s=3600))
    head, tail = template.split(PLACEHOLDER.encode())
    sock = socket.create_connection(("127.0.0.1", args.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def field(text: str) -> bytes:
        return len(text.encode()).to_bytes(2, "big") + text.encode()

    credentials = login(FLOODER)
    flags = 0x02 | (0xC0 if credentials["password"] else 0)  # clean session, and a login if asked
    connect = b"\x00\x04MQTT\x04" + bytes([flags]) + b"\x00\x00" + field(FLOODER)
    if credentials["password"]:
        connect += field(FLOODER) + field(credentials["password"])
    sock.sendall(b"\x10" + _varint(len(connect)) + connect)
    if sock.recv(4)[:1] != b"\x20":
        raise SystemExit("the broker refused the flooder")
    on, quit_ = threading.Event(), threading.Event()
    window = threading.Condition()
    counts = {"sent": 0, "acked": 0}

    def read_acks() -> None:  # every packet the broker sends back is a 4-byte PUBACK
        spare = 0
        while not quit_.is_set():
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            spare += len(data)
            with window:
                counts["acked"] += spare // 4
                spare %= 4
                window.notify()

    def flood() -> None:
        topic_prefix = f"nowhere/{FLOODER}/" if args.flood_nowhere else f"req/{FLOODER}/"
        packet_id = 0
        while not quit_.is_set():
            if not on.wait(0.1):
                continue
            with window:
                room = args.window - (counts["sent"] - counts["acked"])
                if room <= 0:
                    window.wait(0.01)
                    continue
            parts = []
            for _ in range(min(room, 64)):
                packet_id = packet_id % 65535 + 1
                trace = f"{counts['sent'] + len(parts):032x}".encode()
                topic = (topic_prefix.encode()) + trace
                body = len(topic).to_bytes(2, "big") + topic + packet_id.to_bytes(2, "big") + head + trace + tail
                parts.append(b"\x32" + _varint(len(body)) + body)
            try:
                sock.sendall(b"".join(parts))
            except OSError:
                return
            with window:
                counts["sent"] += len(parts)

    threads = [threading.Thread(target=read_acks, daemon=True), threading.Thread(target=flood, daemon=True)]
    for thread in threads:
        thread.start()

    def report() -> None:
        print(json.dumps({"sent": counts["sent"], "acked": counts["acked"], "sched": sched["policy"]}), flush=True)

    for line in sys.stdin:
        word = line.strip()
        if word == "go":
            on.set()
        elif word == "stop":
            on.clear()
        elif word == "report":
            report()
    quit_.set()
    report()


class Flooder:
    def __init__(
        self, port: int, frame: Path, window: int, nowhere: bool = False, rate: float = 0.0, raw: bool = False
    ) -> None:
        cmd = [sys.executable, __file__, "--role", "raw-flooder" if raw else "flooder", "--port", str(port)]
        cmd += ["--frame", str(frame)]
        cmd += ["--flood-nowhere"] if nowhere else []
        cmd += ["--flood-rate", str(rate)]
        self.proc = subprocess.Popen(
            [*cmd, "--window", str(window)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def say(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    async def counts(self) -> dict[str, int]:
        self.say("report")
        assert self.proc.stdout is not None
        line = await asyncio.to_thread(self.proc.stdout.readline)
        return json.loads(line)

    def close(self) -> dict[str, int]:
        out, _ = self.proc.communicate(timeout=30)  # closes stdin: the flooder reports and ends
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        return json.loads(lines[-1]) if lines else {}


# -- the victim (this process) --------------------------------------------------------------


class Victim:
    """Sends a request every 1/rate s and times each to its answer."""

    def __init__(self, session: MqttSession, payload: bytes) -> None:
        self.session = session
        self.payload = payload
        self.waiting: dict[str, tuple[float, asyncio.Future[env.Result]]] = {}
        self.statuses: Counter[str] = Counter()
        self.answered_at: dict[str, float] = {}
        self.reasons: Counter[str] = Counter()
        self.sent_at: dict[str, float] = {}  # trace id -> wall time of its publish
        #: (to the bridge, in the bridge, back to the device) per answer, ms, from the hop stamps
        self.legs: list[tuple[float, float, float]] = []

    async def listen(self) -> None:
        async for msg in self.session.messages():
            now, wall = time.perf_counter(), time.time()
            result = env.decode(env.Result, msg.payload)
            entry = self.waiting.pop(result.trace_id, None)
            if entry is not None and not entry[1].done():
                entry[1].set_result(result)
                hops = result.hops
                if "bridge_received" in hops and "bridge_sent" in hops:
                    sent = self.sent_at.pop(result.trace_id, wall)
                    self.legs.append(
                        (
                            (hops["bridge_received"] - sent) * 1000,
                            (hops["bridge_sent"] - hops["bridge_received"]) * 1000,
                            (wall - hops["bridge_sent"]) * 1000,
                        )
                    )
                self.statuses[result.status if result.reason != "rate limited" else "rate_limited"] += 1
                if result.status != "ok":
                    self.reasons[f"{result.status}: {(result.reason or '')[:80]}"] += 1
                self.answered_at[result.trace_id] = now

    async def one(self) -> float | None:
        trace_id = secrets.token_hex(16)
        req = request(VICTIM, trace_id, self.payload)
        fut: asyncio.Future[env.Result] = asyncio.get_running_loop().create_future()
        t0 = time.perf_counter()
        self.waiting[trace_id] = (t0, fut)
        self.sent_at[trace_id] = time.time()
        await self.session.publish(topics.REQUEST.build(device_id=VICTIM, trace_id=trace_id), env.encode(req), qos=1)
        try:
            result = await asyncio.wait_for(fut, 30)
        except asyncio.TimeoutError:
            self.waiting.pop(trace_id, None)
            return None
        if result.status != "ok":
            return None
        return (self.answered_at.pop(trace_id) - t0) * 1000

    async def phase(self, rate: float, seconds: float) -> tuple[list[float], int]:
        """Latencies (ms) of the answered requests, and how many got no ok answer."""
        jobs = []
        start = time.perf_counter()
        n = int(seconds * rate)
        for k in range(n):
            delay = start + k / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            jobs.append(asyncio.create_task(self.one()))
        done = await asyncio.gather(*jobs)
        latencies = [ms for ms in done if ms is not None]
        return latencies, n - len(latencies)

    def take_legs(self) -> list[tuple[float, float, float]]:
        legs, self.legs = self.legs, []
        return legs


async def drained(flooder: Flooder, victim: Victim) -> dict[str, int]:
    """After a flood: wait until the bridge has read everything the flooder sent (a request of
    the victim's sent now is answered only after it), then for the answers to stop coming."""
    await victim.one()
    await asyncio.sleep(1.0)
    victim.take_legs()
    return await flooder.counts()


async def main_async(args: argparse.Namespace, work: Path) -> dict[str, object]:
    from edgewire.cloud_bridge.model_repository import write_python_repository
    from edgewire.cloud_bridge.triton_server import EmbeddedTriton
    from edgewire.demo.models import build_demo

    arts = build_demo(args.data or work / "demo")
    frame = sorted(arts.frames_dir.glob("*.jpg"))[0]
    payload = frame.read_bytes()
    broker, port, broker_kind = start_broker(work, args)
    repo = work / "repo"
    write_python_repository(repo, [arts.cloud_model])
    bridge: subprocess.Popen[str] | None = None
    bridge_said: dict[str, object] = {}
    flooder: Flooder | None = None
    try:
        async with EmbeddedTriton(repo, workdir=work) as triton:
            bridge = subprocess.Popen(
                [
                    sys.executable,
                    *(["-m", "cProfile", "-o", str(args.profile_bridge)] if args.profile_bridge else []),
                    __file__,
                    "--role",
                    "bridge",
                    "--port",
                    str(port),
                    "--triton",
                    f"grpc://{triton.grpc_url}",
                    "--device-rate",
                    str(args.device_rate),
                    "--device-burst",
                    str(args.device_burst),
                    *(["--no-shield"] if args.no_shield else []),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            flooder = Flooder(port, frame, args.window, args.flood_nowhere, args.flood_rate, args.raw_flooder)
            async with MqttSession(VICTIM, "127.0.0.1", port, **login(VICTIM)) as session:
                await session.wait_connected(30)
                await session.subscribe(topics.RESULT.build(device_id=VICTIM), qos=1)
                victim = Victim(session, payload)
                listener = asyncio.create_task(victim.listen())
                # Warm up (and wait for the bridge's subscription to be in place).
                deadline = time.monotonic() + 60
                while await victim.one() is None:
                    if time.monotonic() > deadline:
                        raise SystemExit("the bridge never answered")
                await victim.phase(args.victim_rate, 2)
                alone: list[float] = []
                flooded: list[float] = []
                lost = 0
                per_round = []
                legs: dict[str, list[tuple[float, float, float]]] = {"alone": [], "flooded": []}
                cpu = CpuShare(
                    {
                        "victim": os.getpid(),
                        "bridge": bridge.pid,
                        "broker": broker.pid,
                        "triton": triton._proc.pid,  # noqa: SLF001 - CPU of the server process the bench started
                        "flooder": flooder.proc.pid,
                    }
                )
                for _ in range(args.rounds):
                    victim.take_legs()
                    started = cpu.start()
                    lat_a, lost_a = await victim.phase(args.victim_rate, args.phase_s)
                    cpu.add("alone", started)
                    legs["alone"] += victim.take_legs()
                    flooder.say("go")
                    started = cpu.start()
                    lat_b, lost_b = await victim.phase(args.victim_rate, args.phase_s)
                    cpu.add("flooded", started)
                    flooder.say("stop")
                    legs["flooded"] += victim.take_legs()
                    await drained(flooder, victim)
                    alone += lat_a
                    flooded += lat_b
                    lost += lost_a + lost_b
                    per_round.append(
                        {"alone_p99_ms": round(pct(lat_a, 99), 2), "flooded_p99_ms": round(pct(lat_b, 99), 2)}
                    )
                listener.cancel()
            flood_counts = flooder.close()
            flooder = None
    finally:
        if flooder is not None:
            flooder.proc.kill()
        if bridge is not None:
            bridge.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                said, _ = bridge.communicate(timeout=30)
                bridge_said.update(json.loads(said.splitlines()[-1]) if said.strip() else {})
            if bridge.poll() is None:
                bridge.kill()
        broker.terminate()
        broker.wait(10)
    flood_s = args.rounds * args.phase_s
    return {
        "victim_alone_p50_ms": round(pct(alone, 50), 2),
        "victim_alone_p99_ms": round(pct(alone, 99), 2),
        "victim_flooded_p50_ms": round(pct(flooded, 50), 2),
        "victim_flooded_p99_ms": round(pct(flooded, 99), 2),
        "p99_ratio": round(pct(flooded, 99) / pct(alone, 99), 3),
        "victim_requests": len(alone) + len(flooded) + lost,
        "victim_lost": lost,
        "victim_statuses": dict(victim.statuses),
        "victim_refusals": dict(victim.reasons.most_common(5)),
        "flooder_sent": flood_counts.get("sent", 0),
        "flooder_answered": flood_counts.get("answered", 0),
        "flooder_rate_limited": flood_counts.get("rate_limited", 0),
        "flooder_ok": flood_counts.get("status_ok", 0),
        "flooder_sent_per_s": round(flood_counts.get("sent", 0) / flood_s, 1),
        "per_round": per_round,
        "cpu_cores_used": cpu.report(),
        "bridge": bridge_said,
        # Where the victim's time went (p99 of each leg, ms): device to bridge (broker, the
        # bridge's reading), inside the bridge (checks, decode, Triton), bridge to device.
        "victim_legs_p99_ms": {
            phase: {
                leg: round(pct([x[i] for x in rows], 99), 2)
                for i, leg in enumerate(("to_bridge", "in_bridge", "to_device"))
            }
            for phase, rows in legs.items()
        },
        "rounds": args.rounds,
        "phase_s": args.phase_s,
        "victim_rate_per_s": args.victim_rate,
        "device_budget": {"rate_per_s": args.device_rate, "burst": args.device_burst},
        "flood_rate_cap_per_s": args.flood_rate or None,
        "flood_nowhere": args.flood_nowhere,
        "flood_shield": not args.no_shield,
        "flooder": "raw" if args.raw_flooder else "asyncio",
        "broker": broker_kind,
        "mosquitto_flood_limit": (not args.no_flood_limit) if broker_kind == "mosquitto" else None,
        "broker_device_read_budget": {
            "rate_per_s": args.device_read_rate or "default",
            "burst": args.device_read_burst or "default",
        }
        if broker_kind == "embedded"
        else None,
        "flooder_sched": flood_counts.get("sched"),
        "cores": os.cpu_count(),
        "target": {"p99_ratio": 1.5, "victim_lost": 0},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="A,B pairs")
    parser.add_argument("--phase-s", type=float, default=8.0, help="seconds per phase")
    parser.add_argument("--victim-rate", type=float, default=20.0, help="the victim's requests per second")
    parser.add_argument("--device-rate", type=float, default=25.0, help="the bridge's per-device budget, per second")
    parser.add_argument("--device-burst", type=float, default=50.0, help="the bridge's per-device budget, at once")
    parser.add_argument("--window", type=int, default=256, help="the flooder's unacknowledged publishes")
    parser.add_argument(
        "--flood-rate", type=float, default=0.0, help="the flooder's requests per second (0: as fast as it can)"
    )
    parser.add_argument(
        "--no-shield", action="store_true", help="the bridge reads and drops the flood (no flood shield)"
    )
    parser.add_argument("--broker", choices=["auto", "mosquitto", "embedded"], default="auto")
    parser.add_argument(
        "--device-read-rate", type=float, default=None, help="the embedded broker's packets/s per device login"
    )
    parser.add_argument(
        "--no-flood-limit", action="store_true", help="Mosquitto open to anonymous clients, without the flood limit"
    )
    parser.add_argument(
        "--device-read-burst", type=int, default=None, help="the embedded broker's packets at once per device login"
    )
    parser.add_argument("--data", type=Path, default=None, help="reuse a demo folder")
    parser.add_argument("--profile-bridge", type=Path, default=None, help="cProfile the bridge into this file")
    parser.add_argument(
        "--role", choices=["bench", "bridge", "flooder", "raw-flooder"], default="bench", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--raw-flooder",
        action="store_true",
        help="flood from a lean client writing MQTT packets straight to a socket (no pacing)",
    )
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--triton", help=argparse.SUPPRESS)
    parser.add_argument("--frame", help=argparse.SUPPRESS)
    parser.add_argument("--flood-nowhere", action="store_true", help="control: the flood goes where no one reads it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.role == "bridge":
        serve_bridge(args)
        return
    if args.role == "flooder":
        serve_flooder(args)
        return
    if args.role == "raw-flooder":
        serve_raw_flooder(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(main_async(args, Path(tmp)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
