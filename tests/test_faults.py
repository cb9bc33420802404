"""Crashes in the middle of a stream, each a SIGKILL under load: the broker (Mosquitto with
persistence, and the embedded amqtt broker; both reconnect orders), a bridge running as its own
process, Triton, the device while its broker is up, the distributor mid-push; plus a graceful
bridge restart and a 30 s link cut in network namespaces.

A device streams hard frames (every label is "unknown" to its judge) in joint mode with a durable
outbox, and after the fault and a quiet period the exact invariants of tests/invariants.py must
hold for every escalation the outbox accepted: one final outcome each, nothing still queued or
owed, no request run twice (the bridges' and Triton's own counts), no duplicates, and none ended
without the cloud's answer unless its deadline fell inside the outage window measured from the
fault's start to the first fresh request answered after it.

The device is a real process (a small driver around EdgeAgent that writes every outcome it
hands to ``on_result`` as a JSON line, so nothing the device decided is missed even when its
QoS 0 ``local/`` messages are dropped during an outage); a monitor process records what
reaches the broker on ``local/``, ``result/``, ``telemetry/`` and ``presence/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

from edgewire.cloud_bridge.bridge import Bridge
from edgewire.cloud_bridge.dispatch import Dispatcher
from edgewire.cloud_bridge.rules import default_rules
from edgewire.cloud_bridge.triton_server import EmbeddedTriton
from edgewire.config import (
    BrokerSettings,
    CloudSettings,
    DeviceConfig,
    JudgeSettings,
    ModelSettings,
    OutboxSettings,
    SourceSettings,
)
from edgewire.demo.models import LABELS, DemoArtifacts
from edgewire.ports import free_port, wait_port
from edgewire.session import MqttSession, NotConnected

from .conftest import Mosquitto, stop_process
from .invariants import Verdict, Window, check, outage_window, read_outbox, until_quiet
from .test_discovery_netns import HOSTS, Lan, _can_make_namespaces, _ip

# Every test here runs whole processes through a crash and a quiet period: minutes together.
# The default run leaves them out; CI runs them (`pytest -m slow`) and again with every core busy.
pytestmark = pytest.mark.slow

DEVICE = "cam-f"
#: Nothing new from the device or on the broker for this long: the run is over.
QUIET_S = 3.0

# The device process: EdgeAgent from a YAML config, every outcome written as a JSON line.
DRIVER = r'''
import asyncio, dataclasses, json, logging, signal, sys, time
from edgewire.config import load_device_config
from edgewire.edge.agent import EdgeAgent

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
config, out_path, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = open(out_path, "a", buffering=1)


def emit(doc):
    out.write(json.dumps(doc) + "\n")


class HeldOpen:
    """The folder source's first ``count`` frames, then quiet until stopped: a camera that
    stays up after the scene goes still, so the device keeps taking the cloud's late answers
    (a finite source would end the run with answers still owed)."""

    def __init__(self, inner, count, stop):
        self.inner, self.count, self.stop = inner, count, stop

    async def __aiter__(self):
        n = 0
        async for frame in self.inner:
            yield frame
            n += 1
            if n >= self.count:
                break
        emit({"event": "source_done", "t": time.time(), "frames": n})
        await self.stop.wait()


async def main():
    hook = lambda r: emit({"t": time.time(), "r": r.model_dump(mode="json")})
    agent = EdgeAgent(load_device_config(config), on_result=hook)
    stop = asyncio.Event()

    def on_signal():
        stop.set()
        agent.stop()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_signal)
    agent.source = HeldOpen(agent.source, count, stop)
    emit({"event": "started", "t": time.time()})
    summary = await agent.run()
    emit({"summary": dataclasses.asdict(summary), "meter": agent.meter.snapshot()})


asyncio.run(main())
'''

# What reaches the broker, decoded, one JSON line per message; reconnects through outages.
MONITOR = r"""
import asyncio, json, sys, time
import aiomqtt
from edgewire import envelopes as env, topics

host, port, device, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
FILTERS = [f"local/{device}", f"result/{device}", "telemetry/+", "presence/+"]


async def main():
    out = open(out_path, "a", buffering=1)
    while True:
        try:
            async with aiomqtt.Client(
                host, port, identifier=f"monitor-{device}", clean_session=False, keepalive=5, timeout=5
            ) as c:
                for f in FILTERS:
                    await c.subscribe(f, qos=1)
                out.write(json.dumps({"event": "connected", "t": time.time()}) + "\n")
                async for m in c.messages:
                    topic = str(m.topic)
                    try:
                        spec = topics.parse(topic).spec
                        doc = env.decode(spec.payload, bytes(m.payload)).model_dump(mode="json")
                    except Exception as exc:
                        doc = {"error": repr(exc)}
                    out.write(json.dumps({"t": time.time(), "topic": topic, "doc": doc}) + "\n")
        except (aiomqtt.MqttError, OSError) as exc:
            out.write(json.dumps({"event": "disconnected", "t": time.time(), "error": str(exc)}) + "\n")
            await asyncio.sleep(0.2)


asyncio.run(main())
"""


# ---- helpers -------------------------------------------------------------------------------


def device_config(
    demo: DemoArtifacts, url: str, outbox: Path, fps: float, backoff: tuple[float, float] = (0.05, 0.5)
) -> DeviceConfig:
    return DeviceConfig(
        device_id=DEVICE,
        fleet="lab",
        broker=BrokerSettings(
            url=url, reconnect_min_s=backoff[0], reconnect_max_s=backoff[1], startup_wait_s=15, keepalive=5
        ),
        source=SourceSettings(kind="folder", path=demo.frames_dir, pattern="*.jpg", fps=fps),
        model=ModelSettings(path=demo.edge_model),
        judge=JudgeSettings(unknown_labels=list(LABELS)),  # every frame is hard
        cloud=CloudSettings(
            deadline_ms=5000, model_hint="digits", offline_deadline_s=600, outbox=OutboxSettings(path=outbox)
        ),
    )


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line still being written
            out.append(json.loads(line))
    return out


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _prefix(cmd: list[str], netns: str | None) -> list[str]:
    return (["ip", "netns", "exec", netns] if netns else []) + cmd


class DeviceProcess:
    """The device driver in its own process (optionally inside a network namespace)."""

    def __init__(self, cfg: DeviceConfig, workdir: Path, frames: int, netns: str | None = None) -> None:
        self.cfg = cfg
        self.frames = frames
        assert cfg.cloud is not None and cfg.cloud.outbox.path is not None
        self.db = cfg.cloud.outbox.path
        self.out = workdir / "device.jsonl"
        self.log = workdir / "device.log"
        conf = workdir / "device.yaml"
        conf.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        script = workdir / "device_driver.py"
        script.write_text(DRIVER)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                _prefix([sys.executable, str(script), str(conf), str(self.out), str(frames)], netns),
                stdout=log,
                stderr=log,
            )

    def lines(self) -> list[dict[str, Any]]:
        return _read_lines(self.out)

    def results(self) -> list[dict[str, Any]]:
        return [line["r"] for line in self.lines() if "r" in line]

    def finals(self) -> int:
        return len({r["trace_id"] for r in self.results() if r["state"] != "PENDING_CLOUD" and not r["late"]})

    def outcomes(self) -> list[dict[str, Any]]:
        """Every outcome the device decided, ``{"t": when, "r": LocalResult}``, across its runs."""
        return [line for line in self.lines() if "r" in line]

    def starts(self) -> list[float]:
        """When each of its runs started."""
        return [line["t"] for line in self.lines() if line.get("event") == "started"]

    def db_counts(self) -> tuple[int, int] | None:
        """(requests still in the outbox, answers still owed), read from the SQLite file."""
        if not self.db.exists():
            return None
        with contextlib.closing(sqlite3.connect(self.db, timeout=5)) as db:
            queued = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            waiting = db.execute("SELECT COUNT(*) FROM owed WHERE state = 'waiting'").fetchone()[0]
        return int(queued), int(waiting)

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"device exited early ({self.proc.returncode}):\n{_tail(self.log)}")

    async def wait_finals(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.finals() < count:
            self.alive()
            assert time.monotonic() < deadline, f"only {self.finals()} of {count} frames answered:\n{_tail(self.log)}"
            await asyncio.sleep(0.05)

    async def settle(self, monitor: Monitor, timeout: float) -> bool:
        """Until this run's source is done, the outbox empty and nothing owed, and then until
        neither the device nor the broker has said anything new for a while (a late duplicate
        has the time to show up); False if that does not happen in time (the invariants then
        say what is missing)."""
        deadline = time.monotonic() + timeout
        while True:
            self.alive()
            lines = self.lines()
            runs = [i for i, line in enumerate(lines) if line.get("event") == "started"]
            done = any(line.get("event") == "source_done" for line in lines[runs[-1] if runs else 0 :])
            if done and self.db_counts() == (0, 0):
                break
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.25)
        return await until_quiet(
            lambda: (len(self.lines()), len(monitor.messages("result")), len(monitor.messages("local"))),
            quiet_s=QUIET_S,
            timeout=deadline - time.monotonic() + QUIET_S,
        )

    def stop(self, timeout: float = 30) -> dict[str, Any]:
        """SIGTERM, wait; returns the run's summary line (summary and meter)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"device did not stop on SIGTERM:\n{_tail(self.log)}") from None
        ends = [line for line in self.lines() if "summary" in line]
        assert self.proc.returncode == 0 and ends, f"device ended badly ({self.proc.returncode}):\n{_tail(self.log)}"
        return ends[-1]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Monitor:
    """What reaches the broker for one device, recorded by its own process (MONITOR)."""

    def __init__(self, host: str, port: int, workdir: Path, netns: str | None = None, device_id: str = DEVICE) -> None:
        self.out = workdir / "monitor.jsonl"
        self.log = workdir / "monitor.log"
        script = workdir / "monitor.py"
        script.write_text(MONITOR)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                _prefix([sys.executable, str(script), host, str(port), device_id, str(self.out)], netns),
                stdout=log,
                stderr=log,
            )

    def lines(self) -> list[dict[str, Any]]:
        return _read_lines(self.out)

    def messages(self, family: str) -> list[dict[str, Any]]:
        return [m for m in self.lines() if m.get("topic", "").startswith(family + "/")]

    def wait(self, what: Callable[[], bool], timeout: float, why: str) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if self.proc.poll() is not None:
                raise AssertionError(f"monitor exited ({self.proc.returncode}):\n{_tail(self.log)}")
            assert time.monotonic() < deadline, f"monitor: {why} not seen within {timeout}s"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_process(self.proc, 5)


def _total(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def bridge_runs(*bridges: Bridge) -> float:
    """Requests the bridge(s) ran: every answer but ``unavailable``, which says no model served
    the request (a device asks again later for a queued one; that is a retry, not a rerun)."""
    return sum(b.meter.total("requests_total") - b.meter.get("requests_total", status="unavailable") for b in bridges)


async def triton_inferences(triton: EmbeddedTriton, model: str = "digits-cloud") -> int:
    """Inferences Triton did since it started (every item of every batch), from its own statistics."""
    from tritonclient.grpc import aio as grpc_aio

    client = grpc_aio.InferenceServerClient(triton.grpc_url)
    try:
        return int((await client.get_inference_statistics(model)).model_stats[0].inference_count)
    finally:
        await client.close()


def verdict(
    device: DeviceProcess,
    monitor: Monitor,
    windows: list[Window],
    *,
    runs: float | None,
    inferences: float | None,
    reruns_allowed: int = 0,
) -> Verdict:
    """The exact invariants (tests/invariants.py) over what the device, the broker and the
    cloud recorded; fails naming every escalation that broke one."""
    owed, queued = read_outbox(device.db)
    found = check(
        owed,
        queued,
        device.outcomes(),
        monitor.messages("result"),
        windows,
        bridge_runs=runs,
        triton_inferences=inferences,
        reruns_allowed=reruns_allowed,
        restarts=device.starts(),
    )
    found.assert_exact()
    assert found.escalations > 0 and found.answered_ok > 0, found.figures()
    return found


# ---- the cloud: in process, or the bridge as its own process -------------------------------


class CloudBridge:
    """One bridge on the embedded Triton; started and stopped (gracefully) at will."""

    def __init__(
        self,
        url: str,
        triton: EmbeddedTriton,
        bridge_id: str = "bridge-f",
        latency_s: float = 0.0,
        backoff: tuple[float, float] = (0.05, 0.5),
    ) -> None:
        self.dispatcher = Dispatcher([f"grpc://{triton.grpc_url}"])
        if latency_s:  # a busy cloud: each inference takes this much longer
            run = self.dispatcher.run

            async def slowed(*args: Any, **kw: Any) -> Any:
                await asyncio.sleep(latency_s)
                return await run(*args, **kw)

            self.dispatcher.run = slowed  # type: ignore[method-assign]
        settings = BrokerSettings(url=url, reconnect_min_s=backoff[0], reconnect_max_s=backoff[1])
        self.bridge = Bridge(bridge_id, settings, self.dispatcher, default_rules("digits-cloud"))
        self.task: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> Bridge:
        self.task = asyncio.create_task(self.bridge.run())
        ready = asyncio.create_task(self.bridge.ready.wait())
        await asyncio.wait([ready, self.task], timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if self.task.done():
            self.task.result()
        assert self.bridge.ready.is_set(), "bridge not ready within 15 s"
        return self.bridge

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.bridge.stop()
            await asyncio.wait_for(self.task, 30)
        if not self._closed:
            self._closed = True
            await self.dispatcher.close()


class ServiceProcess:
    """A broker or a bridge in its own process, to be killed with SIGKILL mid-stream: nothing
    saved on the way out, no goodbye, sockets closed by the kernel."""

    def __init__(self, cmd: list[str], log: Path, port: int | None = None) -> None:
        self.cmd, self.log, self.port = cmd, log, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=log)
        if self.port is not None:
            wait_port(self.port, timeout=30)

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, f"{self.cmd[0]} already gone:\n{_tail(self.log)}"
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        stop_process(self.proc)


def broker_process(kind: str, workdir: Path, port: int) -> Mosquitto | ServiceProcess:
    """Mosquitto with persistence (the shipped conf; it saves every 30 s, so a SIGKILL loses
    the sessions and queues since), or the embedded amqtt broker (``edgewire broker``)."""
    if kind == "mosquitto":
        return plain_mosquitto(workdir, port, persist=True)
    cmd = [sys.executable, "-m", "edgewire.cli", "broker", "--host", "127.0.0.1", "--port", str(port)]
    return ServiceProcess([*cmd, "--allow-anonymous"], workdir / f"{kind}.log", port)


def plain_mosquitto(workdir: Path, port: int, *, persist: bool = False) -> Mosquitto:
    """The shipped Mosquitto on ``port``, logging to the test's folder; with ``persist``, saving
    its sessions there."""
    data = workdir / "mosquitto-data" if persist else None
    return Mosquitto(workdir, port, persist_in=data, log=workdir / "mosquitto.log")


def bridge_process(url: str, triton: EmbeddedTriton, workdir: Path, bridge_id: str = "bridge-f") -> ServiceProcess:
    cmd = [sys.executable, "-m", "edgewire.cli", "bridge", "--triton", f"grpc://{triton.grpc_url}", "--broker", url]
    return ServiceProcess([*cmd, "--id", bridge_id, "--decode-workers", "0"], workdir / "bridge.log")


@contextlib.contextmanager
def processes(*procs: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                p.kill() if isinstance(p, DeviceProcess) else p.stop()


def born_after(monitor: Monitor, client: str, t: float) -> float | None:
    """When ``client`` first said it was online after ``t``: the stamp of its first presence
    birth made after ``t`` (made once it is connected and subscribed), if one reached the broker.
    The birth's own stamp decides, not its arrival: a broker restarted from its saved state hands
    out the retained birth of a connection that is gone, and a monitor that reconnects late gets
    a birth long after it was made."""
    births = [
        m["doc"]["ts"]
        for m in monitor.messages("presence")
        if m["topic"] == f"presence/{client}" and m["doc"]["online"] and m["doc"]["ts"] > t
    ]
    return min(births) if births else None


# ---- 1. the broker is killed ---------------------------------------------------------------


def bridge_runs_said(monitor: Monitor, bridge_id: str) -> float:
    """Requests a bridge process ran, from the telemetry it publishes as it stops (SIGTERM)."""
    topic = f"telemetry/{bridge_id}"
    monitor.wait(lambda: any(m["topic"] == topic for m in monitor.messages("telemetry")), 15, "bridge telemetry")
    return _total(
        [m for m in monitor.messages("telemetry") if m["topic"] == topic][-1]["doc"]["metrics"], "requests_total"
    )


# Which side is back first matters for a broker that lost its sessions: the bridge back first
# has subscribed again before any request is resent; the device back first resends into a
# broker with no subscriber yet. The order is made certain, not raced: the side that is to be
# second is stopped (SIGSTOP) before the kill and let go once the other is back.
@pytest.mark.parametrize(
    ("kind", "back_first"),
    [("mosquitto", "bridge"), ("mosquitto", "device"), ("amqtt", "device")],
    ids=["mosquitto-bridge-back-first", "mosquitto-device-back-first", "amqtt-device-back-first"],
)
async def test_broker_killed_mid_stream(
    demo: DemoArtifacts, triton: EmbeddedTriton, tmp_path: Path, kind: str, back_first: str
) -> None:
    frames = 240
    port = free_port()
    broker = broker_process(kind, tmp_path, port)
    await asyncio.to_thread(broker.start)
    url = f"mqtt://127.0.0.1:{port}"
    monitor = Monitor("127.0.0.1", port, tmp_path)
    bridge = bridge_process(url, triton, tmp_path)
    cfg = device_config(demo, url, tmp_path / "outbox.db", fps=20)
    try:
        with processes(monitor, bridge):
            await asyncio.to_thread(monitor.wait, lambda: bool(monitor.lines()), 20, "connection")
            began = time.time()
            bridge.start()
            await asyncio.to_thread(
                monitor.wait, lambda: born_after(monitor, "bridge-f", began) is not None, 60, "bridge"
            )
            device = DeviceProcess(cfg, tmp_path, frames)
            with processes(device):
                await device.wait_finals(30, 60)
                first, second = ("bridge-f", device.proc) if back_first == "bridge" else (DEVICE, bridge.proc)
                assert second is not None
                down = time.time()
                second.send_signal(signal.SIGSTOP)
                try:
                    await asyncio.to_thread(broker.kill)  # mid-stream, with requests and answers in flight
                    await asyncio.sleep(1.0)
                    # A client may be back before the start is seen done (its retry can beat the
                    # port check): a birth made after the restart began is one made after the outage.
                    restarted = time.time()
                    await asyncio.to_thread(broker.start)  # same port; what it saved, if anything
                    up = time.time()
                    await asyncio.to_thread(
                        monitor.wait, lambda: born_after(monitor, first, restarted) is not None, 60, f"{first} back"
                    )
                finally:
                    second.send_signal(signal.SIGCONT)
                await device.settle(monitor, 90)
                end = device.stop()
            bridge.stop()
            runs = bridge_runs_said(monitor, "bridge-f")
            window = outage_window(down, up, device.outcomes(), monitor.messages("result"))
            found = verdict(device, monitor, [window], runs=runs, inferences=await triton_inferences(triton))
    finally:
        await asyncio.to_thread(broker.stop)

    # The fault happened and was ridden out: the device went degraded for frames read while
    # the broker was away, and joint mode came back.
    assert _total(end["meter"], "mqtt_reconnects_total") >= 1
    back = born_after(monitor, DEVICE, restarted)
    bridge_back = born_after(monitor, "bridge-f", restarted)
    assert back is not None and bridge_back is not None
    assert (back < bridge_back) == (back_first == "device"), (back - up, bridge_back - up)
    finals = [o["r"] for o in device.outcomes() if o["r"]["state"] != "PENDING_CLOUD" and not o["r"]["late"]]
    outage = [f for f in finals if down + 0.2 < f["ts"] < min(up, back) - 0.2]
    assert all(f["degraded"] and f["answered_by"] == "edge" for f in outage)
    assert any(f["answered_by"] == "cloud" and not f["degraded"] for f in finals if f["ts"] > window.end)
    print(f"broker {kind} killed, {back_first} back first: {found.figures()}, window {window.end - window.start:.1f} s")


# ---- 2. the bridge is killed, and a bridge stops gracefully -------------------------------


async def test_bridge_process_killed_mid_stream(demo: DemoArtifacts, triton: EmbeddedTriton, tmp_path: Path) -> None:
    """``edgewire bridge`` as its own process, SIGKILLed with requests taken and unanswered (Triton
    held still for half a second before, so calls are in flight):
    the broker keeps its persistent session, the device resends what is unanswered, and the
    next bridge with the same id runs each request once more at most if the first had it in
    hand when it died."""
    frames = 150
    port = free_port()
    broker = plain_mosquitto(tmp_path, port)
    await asyncio.to_thread(broker.start)
    url = f"mqtt://127.0.0.1:{port}"
    monitor = Monitor("127.0.0.1", port, tmp_path)
    bridge = bridge_process(url, triton, tmp_path)
    try:
        with processes(monitor, bridge):
            await asyncio.to_thread(monitor.wait, lambda: bool(monitor.lines()), 20, "connection")
            began = time.time()
            bridge.start()
            await asyncio.to_thread(
                monitor.wait, lambda: born_after(monitor, "bridge-f", began) is not None, 60, "bridge"
            )
            device = DeviceProcess(device_config(demo, url, tmp_path / "outbox.db", fps=30), tmp_path, frames)
            with processes(device):
                await device.wait_finals(40, 60)
                # Triton held still for a moment first, so the bridge dies with calls in hand.
                assert triton.pid is not None
                os.killpg(triton.pid, signal.SIGSTOP)
                try:
                    await asyncio.sleep(0.5)
                    down = time.time()
                    await asyncio.to_thread(bridge.kill)
                finally:
                    os.killpg(triton.pid, signal.SIGCONT)
                await asyncio.sleep(1.0)
                bridge.start()
                await asyncio.to_thread(
                    monitor.wait, lambda: born_after(monitor, "bridge-f", down) is not None, 60, "bridge back"
                )
                up = born_after(monitor, "bridge-f", down)
                assert up is not None
                await device.settle(monitor, 60)
                device.stop()
            inferences = await triton_inferences(triton)
    finally:
        await asyncio.to_thread(broker.stop)

    outcomes, answers = device.outcomes(), monitor.messages("result")
    # A request the dead bridge had in hand may run again: only one made before the kill and
    # answered after it, each at most once more.
    made = {o["r"]["trace_id"]: o["t"] for o in reversed(outcomes)}
    in_hand = {a["doc"]["trace_id"] for a in answers if a["t"] > down and made.get(a["doc"]["trace_id"], down) < down}
    window = outage_window(down, up, outcomes, answers)
    found = verdict(device, monitor, [window], runs=None, inferences=inferences, reruns_allowed=len(in_hand))
    assert in_hand, "the bridge had nothing in hand when it was killed"
    print(f"bridge process killed: {found.figures()}, {len(in_hand)} in its hands, window {window.end - down:.1f} s")


async def test_bridge_restart_mid_stream(demo: DemoArtifacts, triton: EmbeddedTriton, tmp_path: Path) -> None:
    """A graceful stop answers everything it acknowledged: nothing may end without the cloud."""
    frames = 150
    port = free_port()
    broker = plain_mosquitto(tmp_path, port)
    await asyncio.to_thread(broker.start)
    url = f"mqtt://127.0.0.1:{port}"
    monitor = Monitor("127.0.0.1", port, tmp_path)
    # The same bridge id; a busy cloud (150 ms an inference), so the graceful stop has requests
    # in flight to finish while the stream keeps coming.
    first, second = CloudBridge(url, triton, latency_s=0.15), CloudBridge(url, triton, latency_s=0.15)
    try:
        with processes(monitor):
            await asyncio.to_thread(monitor.wait, lambda: bool(monitor.lines()), 20, "connection")
            old = await first.start()
            device = DeviceProcess(device_config(demo, url, tmp_path / "outbox.db", fps=30), tmp_path, frames)
            with processes(device):
                await device.wait_finals(40, 60)
                await first.stop()  # graceful: answers what it took, then leaves
                assert old.session is not None
                # Taken from the broker (acknowledged) after the drain began, and never answered.
                left_behind = [str(m.topic) for m in old.session.drain_inbox()]
                new = await second.start()
                await device.settle(monitor, 60)
                device.stop()
            await second.stop()
            assert not left_behind, f"the stopped bridge acknowledged and dropped {len(left_behind)}: {left_behind}"
            found = verdict(device, monitor, [], runs=bridge_runs(old, new), inferences=await triton_inferences(triton))
    finally:
        await first.stop()
        await second.stop()
        await asyncio.to_thread(broker.stop)

    # Both bridges served part of the stream, and the device never noticed: every escalation was
    # answered by the cloud within its deadline (a correctness bound, whatever the machine's load).
    assert old.meter.total("requests_total") > 0 and new.meter.total("requests_total") > 0
    assert found.answered_ok == found.escalations == frames, found.figures()


# ---- 3. Triton is killed -------------------------------------------------------------------


async def test_triton_killed_mid_stream(demo: DemoArtifacts, triton: EmbeddedTriton, tmp_path: Path) -> None:
    """The tritonserver process (and its python stubs) SIGKILLed under load, started again on
    the same ports: calls in flight fail, the bridge answers unavailable, the device degrades,
    queues, and takes the late answers when Triton is back."""
    frames = 200
    port = free_port()
    broker = plain_mosquitto(tmp_path, port)
    await asyncio.to_thread(broker.start)
    url = f"mqtt://127.0.0.1:{port}"
    monitor = Monitor("127.0.0.1", port, tmp_path)
    cloud = CloudBridge(url, triton)
    try:
        with processes(monitor):
            await asyncio.to_thread(monitor.wait, lambda: bool(monitor.lines()), 20, "connection")
            bridge = await cloud.start()
            device = DeviceProcess(device_config(demo, url, tmp_path / "outbox.db", fps=20), tmp_path, frames)
            with processes(device):
                await device.wait_finals(30, 60)
                before = await triton_inferences(triton)
                assert triton.pid is not None
                down = time.time()
                os.killpg(triton.pid, signal.SIGKILL)
                await asyncio.sleep(1.0)
                await triton.start()  # the same ports, a new process
                up = time.time()
                await device.settle(monitor, 90)
                device.stop()
            await cloud.stop()
            after = await triton_inferences(triton)
    finally:
        await cloud.stop()
        await asyncio.to_thread(broker.stop)

    window = outage_window(down, up, device.outcomes(), monitor.messages("result"))
    # Triton's own count restarts with it; those done between the first reading and the kill
    # are not counted, so it is a lower bound here, and the bridge's count is the exact one.
    found = verdict(device, monitor, [window], runs=bridge_runs(bridge), inferences=before + after)
    statuses = Counter(a["doc"]["status"] for a in monitor.messages("result") if down <= a["t"] <= window.end)
    assert statuses["unavailable"] + statuses["expired"] > 0, f"Triton's death went unnoticed: {statuses}"
    owed, _ = read_outbox(device.db)
    finals = {o["r"]["trace_id"]: o["r"] for o in device.outcomes() if o["r"]["state"] != "PENDING_CLOUD"}
    without = Counter(row.first_state for k, row in owed.items() if finals[k]["answered_by"] != "cloud")
    print(
        f"Triton killed: {found.figures()}, answers in the outage {dict(statuses)}, window {window.end - down:.1f} s, "
        f"ended without the cloud by first state {dict(without)}"
    )


# ---- 4. the device is killed while its broker is up ----------------------------------------


async def test_device_killed_mid_stream(demo: DemoArtifacts, triton: EmbeddedTriton, tmp_path: Path) -> None:
    """kill -9 of the device with escalations waiting (a busy cloud, 300 ms an inference): the
    next run finds them in its outbox, and each ends once, by its answer (which waited at the
    broker in the device's persistent session) or by its deadline."""
    port = free_port()
    broker = plain_mosquitto(tmp_path, port)
    await asyncio.to_thread(broker.start)
    url = f"mqtt://127.0.0.1:{port}"
    monitor = Monitor("127.0.0.1", port, tmp_path)
    cloud = CloudBridge(url, triton, latency_s=0.3)
    cfg = device_config(demo, url, tmp_path / "outbox.db", fps=20)
    try:
        with processes(monitor):
            await asyncio.to_thread(monitor.wait, lambda: bool(monitor.lines()), 20, "connection")
            bridge = await cloud.start()
            first = DeviceProcess(cfg, tmp_path, 200)
            with processes(first):
                await first.wait_finals(30, 60)
                down = time.time()
                first.kill()
            await asyncio.sleep(1.0)
            second = DeviceProcess(cfg, tmp_path, 60)
            with processes(second):
                await asyncio.to_thread(
                    monitor.wait, lambda: born_after(monitor, DEVICE, down) is not None, 60, "the device back"
                )
                up = born_after(monitor, DEVICE, down)
                assert up is not None
                await second.settle(monitor, 60)
                second.stop()
            await cloud.stop()
            inferences = await triton_inferences(triton)
    finally:
        await cloud.stop()
        await asyncio.to_thread(broker.stop)

    outcomes = second.outcomes()
    decided = {o["r"]["trace_id"] for o in outcomes if o["t"] < down and o["r"]["state"] != "PENDING_CLOUD"}
    cut_short = {o["r"]["trace_id"] for o in outcomes if o["t"] < down and o["r"]["state"] == "PENDING_CLOUD"} - decided
    assert cut_short, "no escalation was waiting when the device was killed"
    window = outage_window(down, up, outcomes, monitor.messages("result"))
    found = verdict(second, monitor, [window], runs=bridge_runs(bridge), inferences=inferences)
    ended = Counter(
        (o["r"]["state"], o["r"]["answered_by"]) for o in outcomes if o["r"]["trace_id"] in cut_short and o["t"] > down
    )
    assert sum(ended.values()) == len(cut_short), (len(cut_short), ended)
    print(f"device killed with {len(cut_short)} waiting, ended {dict(ended)}: {found.figures()}")


# ---- the broker dies with a publish in flight ----------------------------------------------


async def test_publish_in_flight_when_the_broker_dies_ends_with_the_connection(tmp_path: Path) -> None:
    """A QoS 1 publish written but not acknowledged when the connection drops must end then
    (NotConnected), not after the client's 10 s timeout: the forwarder awaits it, and until it
    ends nothing is replayed from the outbox, even after the session has reconnected."""
    port = free_port()
    broker = plain_mosquitto(tmp_path, port)
    await asyncio.to_thread(broker.start)
    session = MqttSession("stall-probe", "127.0.0.1", port, reconnect_min_s=0.05, reconnect_max_s=0.2)
    publish: asyncio.Task[bool] | None = None
    try:
        async with session:
            await session.wait_connected(10)
            assert broker.proc is not None
            broker.proc.send_signal(signal.SIGSTOP)  # takes the PUBLISH, never answers it
            publish = asyncio.create_task(session.publish("probe/x", b"1", qos=1))
            await asyncio.sleep(0.5)
            assert not publish.done()
            broker.proc.kill()  # the broker dies: its socket closes under the session
            await asyncio.to_thread(broker.proc.wait)
            await asyncio.to_thread(broker.start)
            deadline = time.monotonic() + 10
            while session.connects < 2:
                assert time.monotonic() < deadline, "the session did not reconnect"
                await asyncio.sleep(0.05)
            back = time.monotonic()
            done, _ = await asyncio.wait([publish], timeout=2.0)
            waited = time.monotonic() - back
            assert done, f"publish still waiting {waited:.1f} s after the session reconnected"
            assert isinstance(publish.exception(), NotConnected)
    finally:
        if publish is not None and not publish.done():
            publish.cancel()
        await asyncio.to_thread(broker.stop)


# ---- 5. the device's link is cut for 30 s --------------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.skipif(not _can_make_namespaces(), reason="needs root and iproute2 (ip netns)")
def test_link_cut_30s_by_veth_down(demo: DemoArtifacts, tmp_path: Path) -> None:
    frames, fps, cut_s = 240, 6.0, 30.0
    host = HOSTS["broker"]
    lan = Lan()
    lan.up()
    broker_ns, device_ns = lan.ns["broker"], lan.ns["dev1"]
    conf = Mosquitto(tmp_path, 1883, hosts=(host,)).write_config()
    with (tmp_path / "mosquitto.log").open("ab") as log:
        lan.procs.append(
            subprocess.Popen(_prefix([Mosquitto.exe(), "-c", str(conf)], broker_ns), stdout=log, stderr=log)
        )
    monitor = Monitor(host, 1883, tmp_path, netns=broker_ns)
    cloud_log = tmp_path / "cloud.log"
    device: DeviceProcess | None = None
    try:
        monitor.wait(lambda: any(m.get("event") == "connected" for m in monitor.lines()), 20, "connection")
        with cloud_log.open("ab") as log:
            cmd = [sys.executable, "-m", "edgewire.cli", "cloud", "--broker", f"mqtt://{host}:1883"]
            cmd += ["--model", str(demo.cloud_model), "--workdir", str(tmp_path / "cloud")]
            cloud = subprocess.Popen(_prefix(cmd, broker_ns), stdout=log, stderr=log)
        lan.procs.append(cloud)

        def bridge_online() -> bool:
            assert cloud.poll() is None, f"cloud exited:\n{_tail(cloud_log)}"
            return any(m["topic"] == "presence/bridge-1" and m["doc"]["online"] for m in monitor.messages("presence"))

        monitor.wait(bridge_online, 90, "the bridge's birth")
        cfg = device_config(demo, f"mqtt://{host}:1883", tmp_path / "outbox.db", fps=fps)
        device = DeviceProcess(cfg, tmp_path, frames, netns=device_ns)
        asyncio.run(device.wait_finals(30, 60))
        _ip("link", "set", "eth0", "down", ns=device_ns)
        down = time.time()
        time.sleep(cut_s)
        _ip("link", "set", "eth0", "up", ns=device_ns)
        up = time.time()
        asyncio.run(device.settle(monitor, 60))
        end = device.stop()
        cloud.send_signal(signal.SIGTERM)  # the bridge says its last numbers on telemetry/bridge-1
        cloud.wait(30)

        def last_bridge_telemetry() -> dict[str, float] | None:
            found = [m["doc"]["metrics"] for m in monitor.messages("telemetry") if m["topic"] == "telemetry/bridge-1"]
            return found[-1] if found else None

        monitor.wait(lambda: last_bridge_telemetry() is not None, 10, "the bridge's telemetry")
        metrics = last_bridge_telemetry()
        assert metrics is not None
        window = outage_window(down, up, device.outcomes(), monitor.messages("result"))
        found = verdict(device, monitor, [window], runs=_total(metrics, "requests_total"), inferences=None)
    finally:
        if device is not None:
            device.kill()
        monitor.stop()
        lan.down()

    finals = {
        o["r"]["trace_id"]: o["r"]
        for o in device.outcomes()
        if o["r"]["state"] != "PENDING_CLOUD" and not o["r"]["late"]
    }
    assert _total(end["meter"], "mqtt_reconnects_total") >= 1
    # While the link was down every frame was answered on the device, flagged degraded: at once
    # once the loss was noticed (keepalive 5 s: within 2 keepalives; or 3 timeouts), by TIMEOUT before.
    during = [f for f in finals.values() if down + 0.5 < f["ts"] < up - 0.5]
    assert len(during) >= cut_s * fps * 0.8
    assert all(f["degraded"] and f["answered_by"] == "edge" for f in during)
    noticed = [f for f in during if f["ts"] > down + 12]
    assert noticed and all(f["state"] == "COMPLETE" for f in noticed)
    # Those answered at once were queued, and their late answers reached monitors after the
    # link came back, each once.
    owed, _ = read_outbox(device.db)
    queued = {t for t, row in owed.items() if row.first_state == "COMPLETE"}
    assert {f["trace_id"] for f in noticed} <= queued
    late_seen = Counter(
        r["trace_id"] for m in monitor.messages("local") if m["t"] > up for r in m["doc"]["results"] if r["late"]
    )
    assert set(late_seen) == queued and set(late_seen.values()) == {1}, late_seen
    # And joint inference resumed.
    assert any(f["answered_by"] == "cloud" and not f["degraded"] for f in finals.values() if f["ts"] > up + 2)
    print(f"link cut {cut_s:.0f} s: {found.figures()}, window {window.end - down:.1f} s")


# ---- 6. the distributor is killed mid-push -------------------------------------------------


async def test_distributor_killed_mid_push(demo: DemoArtifacts, tmp_path: Path) -> None:
    """``edgewire distributor`` SIGKILLed while a push streams past it, then started again: the
    chunks it had stored survive, those pushed while it was dead wait at the broker in its
    persistent session, and a device that was away for the whole push gets the model from it,
    every chunk exactly once."""
    from edgewire import signing
    from edgewire.delivery import build_manifest
    from edgewire.fleet.push import announce, publish_chunks

    from .conftest import BrokerHandle, until
    from .test_model_delivery import NAME, Fleet, Running, variant

    port = free_port()
    broker = plain_mosquitto(tmp_path, port)
    await asyncio.to_thread(broker.start)
    url = f"mqtt://127.0.0.1:{port}"
    watcher = Monitor("127.0.0.1", port, tmp_path, device_id="nobody")  # presence births
    cmd = [sys.executable, "-m", "edgewire.cli", "distributor", "--broker", url, "--store", str(tmp_path / "store")]
    distributor = ServiceProcess([*cmd, "--id", "distributor-f"], tmp_path / "distributor.log")
    pem, public = signing.generate()
    (tmp_path / "fleet-signing.pub").write_text(public)
    variant(demo.edge_model, tmp_path / "v1.onnx", "1.0.0")
    fleet = Fleet(
        BrokerHandle("mosquitto", "127.0.0.1", port),
        tmp_path,
        signing.load_private(pem),
        tmp_path / "fleet-signing.pub",
        None,
    )  # type: ignore[arg-type]
    v2 = variant(demo.edge_model, tmp_path / "v2.onnx", "2.0.0", slow=1)  # ~256 KiB of weights
    manifest = build_manifest(v2, name=NAME, version="2.0.0", chunk_size=4096, private_key=fleet.private)
    n = manifest.chunk_count
    try:
        with processes(watcher, distributor):
            began = time.time()
            distributor.start()
            await asyncio.to_thread(
                watcher.wait, lambda: born_after(watcher, "distributor-f", began) is not None, 60, "distributor"
            )
            async with fleet.operator() as op:
                await op.wait_connected(10)
                await announce(op, manifest)
                await publish_chunks(op, v2, manifest, indices=range(n // 3))
                down = time.time()
                await asyncio.to_thread(distributor.kill)  # while it is still storing that third
                await publish_chunks(op, v2, manifest, indices=range(n // 3, 2 * n // 3))
                distributor.start()
                await asyncio.to_thread(
                    watcher.wait, lambda: born_after(watcher, "distributor-f", down) is not None, 60, "distributor back"
                )
                await publish_chunks(op, v2, manifest, indices=range(2 * n // 3, n))
            # A device away for the whole push: the retained announce, then every chunk from the distributor.
            async with Running(fleet.device("cam-away")) as agent:
                assert await until(lambda: agent.meta.version == "2.0.0", 90), agent.meter.snapshot()
    finally:
        await asyncio.to_thread(broker.stop)
    assert agent.meter.get("model_chunks_received_total") == n
    assert agent.meter.get("model_chunks_duplicate_total") == 0
