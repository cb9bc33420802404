"""Faults in the middle of a stream: the broker restarts, the bridge restarts, the device's link
is cut for 30 s. Each time a device streams hard frames (every label is "unknown" to its judge)
in joint mode with a durable outbox, and after things settle the same invariants must hold:

* every hard frame has exactly one final outcome and at most one late one;
* no request was run twice by the bridge(s), and Triton did no more work than there were frames;
* nothing acknowledged was lost: the outbox is empty, no answer is still owed, every request the
  broker acknowledged got the bridge's answer, and every frame queued while degraded got its
  late answer.

The device is a real process (a small driver around EdgeAgent that writes every outcome it
hands to ``on_result`` as a JSON line, so nothing the device decided is missed even when its
QoS 0 ``local/`` messages are dropped during an outage); a monitor process records what
reaches the broker on ``local/``, ``result/``, ``telemetry/`` and ``presence/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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

from .conftest import ROOT, open_to_anonymous, stop_process
from .test_discovery_netns import HOSTS, Lan, _can_make_namespaces, _ip

DEVICE = "cam-f"

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


def _mosquitto_exe() -> str:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")
    return exe


def mosquitto_conf(path: Path, host: str, port: int, persist_in: Path | None = None) -> Path:
    """The shipped configuration on another listener; with ``persist_in``, persistence on there."""
    conf = open_to_anonymous((ROOT / "broker" / "mosquitto.conf").read_text())
    conf = re.sub(r"^listener .*$", f"listener {port} {host}", conf, flags=re.M)
    if persist_in is not None:
        persist_in.mkdir(parents=True, exist_ok=True)
        conf = re.sub(r"^persistence false$", f"persistence true\npersistence_location {persist_in}/", conf, flags=re.M)
        assert f"persistence_location {persist_in}/" in conf, "the shipped conf no longer has 'persistence false'"
        # Run as root (as tests do), Mosquitto drops to user mosquitto, which cannot write here.
        conf += "\nuser root\n"
    path.write_text(conf)
    return path


class Broker:
    """Mosquitto on a fixed port, stopped (SIGTERM: it saves its persistence) and started again."""

    def __init__(self, conf: Path, port: int, log: Path) -> None:
        self.exe = _mosquitto_exe()
        self.conf, self.port, self.log = conf, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=log, stderr=log)
        wait_port(self.port)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


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

    def db_counts(self) -> tuple[int, int] | None:
        """(requests still in the outbox, answers still owed), read from the SQLite file."""
        if not self.db.exists():
            return None
        with contextlib.closing(sqlite3.connect(self.db, timeout=5)) as db:
            queued = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            waiting = db.execute("SELECT COUNT(*) FROM owed WHERE state = 'waiting'").fetchone()[0]
        return int(queued), int(waiting)

    def owed(self) -> dict[str, tuple[str, str]]:
        """trace_id -> (owed state, state of the frame's first outcome when it was queued)."""
        from edgewire import envelopes as env

        with contextlib.closing(sqlite3.connect(self.db, timeout=5)) as db:
            rows = db.execute("SELECT key, state, note FROM owed").fetchall()
        return {k: (s, env.decode(env.LocalResults, bytes(n)).results[0].state) for k, s, n in rows}

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"device exited early ({self.proc.returncode}):\n{_tail(self.log)}")

    async def wait_finals(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.finals() < count:
            self.alive()
            assert time.monotonic() < deadline, f"only {self.finals()} of {count} frames answered:\n{_tail(self.log)}"
            await asyncio.sleep(0.05)

    async def settle(self, timeout: float) -> bool:
        """Until the source is done, every frame answered, the outbox empty and nothing owed;
        False if that does not happen in time (the invariants then say what is missing)."""
        deadline = time.monotonic() + timeout
        while True:
            self.alive()
            done = any(line.get("event") == "source_done" for line in self.lines())
            if done and self.finals() >= self.frames and self.db_counts() == (0, 0):
                break
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.25)
        await asyncio.sleep(1.0)  # an answer taken just now is published a moment later
        return True

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
    def __init__(self, host: str, port: int, workdir: Path, netns: str | None = None) -> None:
        self.out = workdir / "monitor.jsonl"
        self.log = workdir / "monitor.log"
        script = workdir / "monitor.py"
        script.write_text(MONITOR)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                _prefix([sys.executable, str(script), host, str(port), DEVICE, str(self.out)], netns),
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


@dataclass
class Bridges:
    """What the bridge(s) did over the run."""

    requests_total: float
    duplicates: float
    triton_calls: float
    statuses: Counter[str] = field(default_factory=Counter)


def check_invariants(device: DeviceProcess, end: dict[str, Any], monitor: Monitor, bridges: Bridges) -> dict[str, Any]:
    """The invariants every fault must keep; returns what the fault-specific checks need."""
    results = device.results()
    by_trace: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_trace.setdefault(r["trace_id"], []).append(r)
    hard = {t for t, rs in by_trace.items() if rs[0]["reasons"]}
    assert len(by_trace) == device.frames, f"{len(by_trace)} frames answered, {device.frames} read"
    assert hard == set(by_trace), "every frame should be hard"

    # Exactly one final outcome per hard frame, at most one late one.
    finals: dict[str, dict[str, Any]] = {}
    lates: dict[str, dict[str, Any]] = {}
    for t in hard:
        rs = by_trace[t]
        final = [r for r in rs if r["state"] != "PENDING_CLOUD" and not r["late"]]
        late = [r for r in rs if r["late"]]
        assert len(final) == 1, f"{t}: {len(final)} final outcomes: {final}"
        assert len(late) <= 1, f"{t}: {len(late)} late outcomes: {late}"
        assert [r for r in rs if r["state"] == "PENDING_CLOUD"] in ([], [rs[0]]), f"{t}: pending after an outcome"
        finals[t] = final[0]
        if late:
            lates[t] = late[0]
            assert rs.index(late[0]) > rs.index(final[0]), f"{t}: late outcome before the final one"

    # The durable side: nothing queued, nothing owed, every escalation settled.
    owed = device.owed()
    answers: dict[str, dict[str, Any]] = {}
    for m in monitor.messages("result"):
        answers.setdefault(m["doc"]["trace_id"], m["doc"])
    waiting = sorted(t for t, (state, _) in owed.items() if state == "waiting")
    queued = device.db_counts()
    assert not waiting and queued == (0, 0), (
        f"(outbox, owed) = {queued} after settling: {len(waiting)} answers still owed, "
        f"{len(set(waiting) - set(answers))} of them for requests no bridge ever answered "
        f"(the device's outbox holds {queued[0] if queued else '?'}: the broker acknowledged the rest), "
        f"e.g. {waiting[:5]}"
    )
    assert set(owed) <= hard
    assert set(lates) <= set(owed), "a late outcome for a frame never escalated"
    for t, (state, first) in owed.items():
        final = finals[t]
        if first == "PENDING_CLOUD":  # escalated in joint mode: the cloud's answer or a TIMEOUT
            if state == "answered" and t not in lates:
                assert final["state"] == "COMPLETE" and final["answered_by"] == "cloud" and not final["degraded"], final
            else:
                assert final["state"] == "TIMEOUT" and final["degraded"], (t, state, final)
        else:  # queued while degraded: answered locally at once, the cloud's answer later, once
            assert first == "COMPLETE" and final["degraded"] and final["answered_by"] == "edge", (t, final)
            assert state == "answered" and t in lates, f"{t}: queued while degraded, no late answer ({state})"
        if t in lates and lates[t]["answered_by"] == "cloud":
            assert t in answers and lates[t]["prediction"]["label"] == answers[t]["prediction"]["label"]
    for t, final in finals.items():
        if final["answered_by"] == "cloud":
            assert owed[t][0] == "answered" and final["prediction"]["label"] == answers[t]["prediction"]["label"]

    # No request was run twice, and Triton did no more than one inference per hard frame.
    assert set(answers) <= set(owed), "the bridge answered a request the device never sent"
    assert bridges.requests_total == len(answers), (
        f"bridges ran {bridges.requests_total:.0f} requests for {len(answers)} distinct trace ids"
    )
    assert bridges.triton_calls <= len(hard)
    # A request the broker still held when its deadline passed (across a restart) is answered
    # `expired`, never run; the device did not take that answer as the cloud's.
    assert set(bridges.statuses) <= {"ok", "expired"}, bridges.statuses
    for t, doc in answers.items():
        if doc["status"] == "expired":
            assert finals[t]["answered_by"] != "cloud", (t, finals[t])

    # Nothing acknowledged was lost: every escalation got its answer, except joint-mode frames
    # whose deadline passed while no bridge could take them (a broker restart drops a shared
    # subscription until its bridge is back); those ended TIMEOUT (checked above) and were
    # dropped from the outbox, and every frame queued while degraded was answered.
    meter = end["meter"]
    unanswered = set(owed) - set(answers)
    assert all(owed[t] == ("expired", "PENDING_CLOUD") for t in unanswered), sorted(unanswered)[:10]
    return {"by_trace": by_trace, "finals": finals, "lates": lates, "owed": owed, "answers": answers, "meter": meter}


def _bridge_numbers(*bridges: Bridge) -> Bridges:
    statuses: Counter[str] = Counter()
    for b in bridges:
        for key, value in b.meter.snapshot().items():
            if key.startswith("requests_total{"):
                statuses[key.split("status=")[1].rstrip("}")] += int(value)
    return Bridges(
        requests_total=sum(b.meter.total("requests_total") for b in bridges),
        duplicates=sum(b.meter.total("requests_duplicate_total") for b in bridges),
        triton_calls=sum(b.meter.total("triton_calls_total") for b in bridges),
        statuses=statuses,
    )


# ---- in-process cloud for the broker and bridge faults ---------------------------------------


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


@contextlib.contextmanager
def processes(*procs: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                p.kill() if isinstance(p, DeviceProcess) else p.stop()


# ---- 1. the broker restarts ----------------------------------------------------------------


# Who is back first after the restart is a race; each order is made certain by giving the other
# side a slow reconnect backoff (6 s: its first try comes 3-6 s after the loss, the broker is
# back after 2 s, the fast side retries every 0.05-0.5 s).
SLOW, FAST = (6.0, 6.0), (0.05, 0.5)


@pytest.mark.parametrize("back_first", ["bridge", "device"], ids=["bridge-back-first", "device-back-first"])
async def test_broker_restart_mid_stream(
    demo: DemoArtifacts, triton: EmbeddedTriton, tmp_path: Path, back_first: str
) -> None:
    frames = 240
    port = free_port()
    conf = mosquitto_conf(tmp_path / "mosquitto.conf", "127.0.0.1", port, persist_in=tmp_path / "mosquitto-data")
    broker = Broker(conf, port, tmp_path / "mosquitto.log")
    await asyncio.to_thread(broker.start)
    url = f"mqtt://127.0.0.1:{port}"
    monitor = Monitor("127.0.0.1", port, tmp_path)
    cloud = CloudBridge(url, triton, backoff=FAST if back_first == "bridge" else SLOW)
    cfg = device_config(demo, url, tmp_path / "outbox.db", fps=20, backoff=FAST if back_first == "device" else SLOW)
    try:
        with processes(monitor):
            await asyncio.to_thread(monitor.wait, lambda: bool(monitor.lines()), 10, "connection")
            bridge = await cloud.start()
            device = DeviceProcess(cfg, tmp_path, frames)
            with processes(device):
                await device.wait_finals(30, 30)
                await asyncio.to_thread(broker.stop)
                down = time.time()
                await asyncio.sleep(2.0)
                await asyncio.to_thread(broker.start)  # same port, its saved sessions and queues
                up = time.time()
                await device.settle(25)
                end = device.stop()
            await cloud.stop()
            numbers = _bridge_numbers(bridge)
            seen = check_invariants(device, end, monitor, numbers)
    finally:
        await cloud.stop()
        await asyncio.to_thread(broker.stop)

    # The fault happened and was ridden out: the device went degraded for frames read while
    # the broker was away, queued them, and got each one's late answer once it was back.
    meter = seen["meter"]
    assert _total(meter, "mqtt_reconnects_total") >= 1 and bridge.meter.total("mqtt_reconnects_total") >= 1
    births = monitor.messages("presence")
    back = min(p["t"] for p in births if p["topic"] == f"presence/{DEVICE}" and p["doc"]["online"] and p["t"] > up)
    outage = [f for f in seen["finals"].values() if down + 0.2 < f["ts"] < min(up, back) - 0.2]
    assert outage and all(f["degraded"] and f["answered_by"] == "edge" for f in outage)
    queued = [t for t, (_, first) in seen["owed"].items() if first == "COMPLETE"]
    assert len(queued) >= len(outage) // 2 and all(t in seen["lates"] for t in queued)
    after = [f for f in seen["finals"].values() if f["ts"] > back + 1.0]
    assert any(f["answered_by"] == "cloud" and not f["degraded"] for f in after), "joint mode never came back"


# ---- 2. the bridge restarts ----------------------------------------------------------------


async def test_bridge_restart_mid_stream(demo: DemoArtifacts, triton: EmbeddedTriton, tmp_path: Path) -> None:
    frames = 150
    port = free_port()
    broker = Broker(mosquitto_conf(tmp_path / "mosquitto.conf", "127.0.0.1", port), port, tmp_path / "mosquitto.log")
    await asyncio.to_thread(broker.start)
    url = f"mqtt://127.0.0.1:{port}"
    monitor = Monitor("127.0.0.1", port, tmp_path)
    # The same bridge id; a busy cloud (150 ms an inference), so the graceful stop has requests
    # in flight to finish while the stream keeps coming.
    first, second = CloudBridge(url, triton, latency_s=0.15), CloudBridge(url, triton, latency_s=0.15)
    try:
        with processes(monitor):
            await asyncio.to_thread(monitor.wait, lambda: bool(monitor.lines()), 10, "connection")
            old = await first.start()
            device = DeviceProcess(device_config(demo, url, tmp_path / "outbox.db", fps=30), tmp_path, frames)
            with processes(device):
                await device.wait_finals(40, 30)
                await first.stop()  # graceful: answers what it took, then leaves
                assert old.session is not None
                # Taken from the broker (acknowledged) after the drain began, and never answered.
                left_behind = [str(m.topic) for m in old.session.drain_inbox()]
                new = await second.start()
                await device.settle(25)
                end = device.stop()
            await second.stop()
            assert not left_behind, f"the stopped bridge acknowledged and dropped {len(left_behind)}: {left_behind}"
            numbers = _bridge_numbers(old, new)
            seen = check_invariants(device, end, monitor, numbers)
    finally:
        await first.stop()
        await second.stop()
        await asyncio.to_thread(broker.stop)

    # Both bridges served part of the stream, and the device never noticed: every escalation was
    # answered by the cloud within its deadline (a correctness bound, whatever the machine's load).
    assert old.meter.total("requests_total") > 0 and new.meter.total("requests_total") > 0
    finals = list(seen["finals"].values())
    assert all(f["answered_by"] == "cloud" and not f["degraded"] for f in finals), Counter(
        (f["state"], f["answered_by"], f["degraded"]) for f in finals
    )
    assert not seen["lates"]


# ---- the broker dies with a publish in flight ----------------------------------------------


async def test_publish_in_flight_when_the_broker_dies_ends_with_the_connection(tmp_path: Path) -> None:
    """A QoS 1 publish written but not acknowledged when the connection drops must end then
    (NotConnected), not after the client's 10 s timeout: the forwarder awaits it, and until it
    ends nothing is replayed from the outbox, even after the session has reconnected."""
    port = free_port()
    broker = Broker(mosquitto_conf(tmp_path / "mosquitto.conf", "127.0.0.1", port), port, tmp_path / "mosquitto.log")
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


# ---- 3. the device's link is cut for 30 s --------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(not _can_make_namespaces(), reason="needs root and iproute2 (ip netns)")
def test_link_cut_30s_by_veth_down(demo: DemoArtifacts, tmp_path: Path) -> None:
    frames, fps, cut_s = 240, 6.0, 30.0
    host = HOSTS["broker"]
    lan = Lan()
    lan.up()
    broker_ns, device_ns = lan.ns["broker"], lan.ns["dev1"]
    conf = mosquitto_conf(tmp_path / "mosquitto.conf", host, 1883)
    with (tmp_path / "mosquitto.log").open("ab") as log:
        lan.procs.append(
            subprocess.Popen(_prefix([_mosquitto_exe(), "-c", str(conf)], broker_ns), stdout=log, stderr=log)
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
        asyncio.run(device.settle(40))
        end = device.stop()
        cloud.send_signal(signal.SIGTERM)  # the bridge says its last numbers on telemetry/bridge-1
        cloud.wait(30)

        def last_bridge_telemetry() -> dict[str, float] | None:
            found = [m["doc"]["metrics"] for m in monitor.messages("telemetry") if m["topic"] == "telemetry/bridge-1"]
            return found[-1] if found else None

        monitor.wait(lambda: last_bridge_telemetry() is not None, 10, "the bridge's telemetry")
        metrics = last_bridge_telemetry()
        assert metrics is not None
        statuses = Counter(
            {k.split("status=")[1].rstrip("}"): int(v) for k, v in metrics.items() if k.startswith("requests_total{")}
        )
        numbers = Bridges(
            requests_total=_total(metrics, "requests_total"),
            duplicates=_total(metrics, "requests_duplicate_total"),
            triton_calls=_total(metrics, "triton_calls_total"),
            statuses=statuses,
        )
        seen = check_invariants(device, end, monitor, numbers)
    finally:
        if device is not None:
            device.kill()
        monitor.stop()
        lan.down()

    finals = seen["finals"]
    meter = seen["meter"]
    assert _total(meter, "mqtt_reconnects_total") >= 1
    # While the link was down every frame was answered on the device, flagged degraded: at once
    # once the loss was noticed (keepalive 5 s: within 2 keepalives; or 3 timeouts), by TIMEOUT before.
    during = [f for f in finals.values() if down + 0.5 < f["ts"] < up - 0.5]
    assert len(during) >= cut_s * fps * 0.8
    assert all(f["degraded"] and f["answered_by"] == "edge" for f in during)
    noticed = [f for f in during if f["ts"] > down + 12]
    assert noticed and all(f["state"] == "COMPLETE" and f["latency_ms"] < 1000 for f in noticed)
    # Those answered at once were queued, and their late answers reached monitors after the
    # link came back, each once.
    queued = {t for t, (_, first) in seen["owed"].items() if first == "COMPLETE"}
    assert {f["trace_id"] for f in noticed} <= queued
    late_seen = Counter(
        r["trace_id"] for m in monitor.messages("local") if m["t"] > up for r in m["doc"]["results"] if r["late"]
    )
    assert set(late_seen) == queued and set(late_seen.values()) == {1}, late_seen
    # And joint inference resumed.
    assert any(f["answered_by"] == "cloud" and not f["degraded"] for f in finals.values() if f["ts"] > up + 2)
