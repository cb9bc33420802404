"""Bridges of one group on one host run each request once, across a broker crash.

The shared dedupe alone (claims raced by two processes on one SQLite file, kept answers, leases
that outlive a dead holder), then two bridge processes on a real Mosquitto sharing the request
stream, the broker SIGKILLed mid-stream and every request sent again after it is back.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from edgewire import envelopes as env
from edgewire import topics
from edgewire.cloud_bridge.shared_dedupe import Answered, Claimed, HeldElsewhere, SharedDedupe
from edgewire.demo.models import DemoArtifacts
from edgewire.ports import free_port
from edgewire.session import MqttSession, NotConnected

from .conftest import Mosquitto, stop_process, until

if TYPE_CHECKING:
    from edgewire.cloud_bridge.triton_server import EmbeddedTriton

RACER = """
import json, sys
from edgewire.cloud_bridge.shared_dedupe import Claimed, SharedDedupe
shared = SharedDedupe(sys.argv[1], sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()  # both processes start claiming together
won = [k for k in range(int(sys.argv[3])) if isinstance(shared.claim("cam-1", f"t{k}"), Claimed)]
print(json.dumps(won), flush=True)
"""


def test_two_processes_racing_for_the_same_requests_claim_each_exactly_once(tmp_path: Path) -> None:
    db, count = tmp_path / "dedupe.db", 400
    SharedDedupe(db, "setup").close()  # the schema in place before the race
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(db), f"bridge-{n}", str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    for racer in racers:
        assert racer.stdout is not None and racer.stdout.readline().strip() == "ready"
    for racer in racers:
        assert racer.stdin is not None
        racer.stdin.write("go\n")
        racer.stdin.flush()
    won = [set(json.loads(racer.communicate(timeout=60)[0])) for racer in racers]
    assert won[0].isdisjoint(won[1])
    assert won[0] | won[1] == set(range(count))


def test_an_answer_is_kept_and_an_unavailable_one_released(tmp_path: Path) -> None:
    first, second = SharedDedupe(tmp_path / "d.db", "bridge-a"), SharedDedupe(tmp_path / "d.db", "bridge-b")
    assert first.claim("cam-1", "t1") == Claimed()
    assert second.claim("cam-1", "t1") == HeldElsewhere(first.holder)
    first.answer("cam-1", "t1", b"the answer")
    assert second.claim("cam-1", "t1") == Answered(b"the answer")
    assert first.claim("cam-2", "t1") == Claimed()  # a trace id is unique only within its device
    first.release("cam-2", "t1")  # unavailable: not kept, so a resend runs afresh
    assert second.claim("cam-2", "t1") == Claimed()


def test_a_dead_holders_claim_is_taken_over_after_its_lease_and_a_live_one_is_not(tmp_path: Path) -> None:
    live = SharedDedupe(tmp_path / "d.db", "bridge-live", lease_s=0.5)
    dead = SharedDedupe(tmp_path / "d.db", "bridge-dead", lease_s=0.5)
    other = SharedDedupe(tmp_path / "d.db", "bridge-other", lease_s=0.5)
    assert live.claim("cam-1", "slow") == Claimed()
    assert dead.claim("cam-1", "lost") == Claimed()
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:  # the live holder renews its claim as a bridge does
        live.renew([("cam-1", "slow")])
        time.sleep(0.1)
    assert other.claim("cam-1", "slow") == HeldElsewhere(live.holder)
    assert other.claim("cam-1", "lost") == Claimed(taken_from=dead.holder)
    other.answer("cam-1", "lost", b"from the bridge that took over")
    dead.answer("cam-1", "lost", b"from the holder that stalled")  # too late: the first answer stays
    assert live.claim("cam-1", "lost") == Answered(b"from the bridge that took over")


def test_old_answers_are_forgotten_after_keep_s(tmp_path: Path) -> None:
    shared = SharedDedupe(tmp_path / "d.db", "bridge-a", keep_s=0.2)
    shared.claim("cam-1", "t1")
    shared.answer("cam-1", "t1", b"answer")
    time.sleep(0.3)
    assert shared.prune() == 1
    assert shared.claim("cam-1", "t1") == Claimed()


# -- two bridge processes, one broker crash ---------------------------------------------------


def bridge_counts(metrics_port: int) -> dict[str, float]:
    """A bridge's metrics by name and labels, from its Prometheus endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("edgewire_"):
            name, value = line.rsplit(" ", 1)
            counts[name] = counts.get(name, 0.0) + float(value)
    return counts


def total(counts: list[dict[str, float]], prefix: str, label: str = "") -> float:
    return sum(v for c in counts for k, v in c.items() if k.startswith(prefix) and label in k)


def start_bridge(k: int, triton_grpc: str, broker_port: int, metrics_port: int, db: Path) -> subprocess.Popen[bytes]:
    """``edgewire bridge`` as an operator runs it, one of a group sharing ``db``."""
    return subprocess.Popen(
        [sys.executable, "-m", "edgewire.cli", "bridge", "--triton", f"grpc://{triton_grpc}",
         "--broker", f"mqtt://127.0.0.1:{broker_port}", "--id", f"bridge-{k}", "--metrics-port", str(metrics_port),
         "--dedupe-db", str(db), "--decode-workers", "0"]
    )  # fmt: skip


class Device:
    """A device stand-in on its own persistent session: requests owed until answered, sent again
    after a reconnect (as a device's forwarder does), every answer kept."""

    def __init__(self, device_id: str, port: int, frames: list[bytes]) -> None:
        self.device_id = device_id
        self.frames = frames
        self.session = MqttSession(
            device_id, "127.0.0.1", port, persistent=True, reconnect_min_s=0.2, reconnect_max_s=1.0
        )
        self.requests: dict[str, bytes] = {}
        self.owed: set[str] = set()
        self.answers: dict[str, list[bytes]] = {}
        self.reply_to = topics.RESULT.build(device_id=device_id)

    async def listen(self) -> None:
        async for message in self.session.messages():
            result = env.decode(env.Result, bytes(message.payload))
            self.answers.setdefault(result.trace_id, []).append(bytes(message.payload))
            self.owed.discard(result.trace_id)

    async def send(self, trace_id: str) -> None:
        topic = topics.REQUEST.build(device_id=self.device_id, trace_id=trace_id)
        while True:
            await self.session.wait_connected(None)
            try:
                await self.session.publish(topic, self.requests[trace_id], qos=1, timeout=10)
                return
            except NotConnected:
                await asyncio.sleep(0.1)

    async def escalate(self, n: int) -> None:
        """The ``n``-th hard frame's request, owed until answered."""
        now = time.time()
        trace_id = secrets.token_hex(16)
        request = env.Request(
            trace_id=trace_id,
            device_id=self.device_id,
            created=now,
            deadline=now + 120,
            model_hint="digits",
            payload=self.frames[n % len(self.frames)],
            content_type="image/jpeg",
            reply_to=self.reply_to,
        )
        self.requests[trace_id] = env.encode(request)
        self.owed.add(trace_id)
        await self.send(trace_id)


@pytest.mark.slow
async def test_two_bridges_sharing_the_stream_run_each_request_once_across_a_broker_crash(
    triton: EmbeddedTriton, demo: DemoArtifacts, tmp_path: Path
) -> None:
    (tmp_path / "broker-data").mkdir()
    broker = Mosquitto(tmp_path, persist_in=tmp_path / "broker-data", autosave_s=1)
    await asyncio.to_thread(broker.start)
    metrics_ports = [free_port(), free_port()]
    db = tmp_path / "dedupe.db"
    bridges = [start_bridge(k, triton.grpc_url, broker.port, port, db) for k, port in enumerate(metrics_ports)]
    frames = [path.read_bytes() for path in sorted(demo.frames_dir.glob("*.jpg"))[:16]]
    devices = [Device(f"cam-{n}", broker.port, frames) for n in range(4)]
    listeners: list[asyncio.Task[None]] = []
    try:

        def both_connected() -> bool:
            try:
                return all(
                    bridge_counts(p).get(f'edgewire_mqtt_connected{{client="bridge-{k}"}}') == 1
                    for k, p in enumerate(metrics_ports)
                )
            except OSError:
                return False

        assert await until(both_connected, 60), "the bridges did not connect"
        for device in devices:
            await device.session.__aenter__()
            await device.session.subscribe(device.reply_to, qos=1)
            listeners.append(asyncio.create_task(device.listen()))
        await asyncio.sleep(3)  # both bridges' shared subscriptions in place

        async def stream(device: Device, count: int, per_s: float) -> None:
            for n in range(count):
                await device.escalate(n)
                await asyncio.sleep(1 / per_s)

        streaming = asyncio.gather(*(stream(d, 60, 10) for d in devices))
        await asyncio.sleep(3)
        broker.proc.kill()  # type: ignore[union-attr] - SIGKILL mid-stream: no goodbye, no final save
        broker.proc.wait()  # type: ignore[union-attr]
        await asyncio.sleep(1)
        await asyncio.to_thread(broker.start)
        await asyncio.wait_for(streaming, 120)
        for device in devices:
            await device.session.wait_connected(30)
        # Every request goes again, answered or not: an owed one as a device replays it after a
        # reconnect, an answered one as a device whose answer was lost. Half land on the bridge
        # that did not run them.
        before = {(d.device_id, t): len(d.answers.get(t, [])) for d in devices for t in d.requests}
        for device in devices:
            for trace_id in list(device.requests):
                await device.send(trace_id)
        made = len(before)

        def answered_again() -> int:
            return sum(1 for d in devices for t in d.requests if len(d.answers.get(t, [])) > before[d.device_id, t])

        assert await until(lambda: answered_again() == made, 120), f"answered again: {answered_again()} of {made}"
        await asyncio.sleep(2)  # a copy still on its way would show as a run below
        counts = [bridge_counts(p) for p in metrics_ports]
    finally:
        for task in listeners:
            task.cancel()
        for device in devices:
            await device.session.close()
        for bridge in bridges:
            stop_process(bridge)  # type: ignore[arg-type]
        await asyncio.to_thread(broker.stop)
    assert not any(d.owed for d in devices), "requests lost"
    runs = total(counts, "edgewire_requests_total{")
    assert runs == made, f"{runs:g} runs for {made} requests"
    assert total(counts, "edgewire_requests_total{", 'status="ok"') == made
    # Both bridges ran requests, and copies of requests run on one were answered by the other
    # from the shared answers: the group really split the stream.
    assert all(total([c], "edgewire_requests_total{") > 0 for c in counts)
    assert total(counts, "edgewire_requests_duplicate_total{", 'state="answered_in_group"') > 0
    for device in devices:  # every copy of an answer is the kept one, byte for byte
        for trace_id, answers in device.answers.items():
            assert len(set(answers)) == 1, f"{device.device_id} {trace_id}: answers differ (run twice)"
