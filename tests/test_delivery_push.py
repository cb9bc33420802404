"""Model delivery, operator and cloud side: manifests, push, the distributor, canary rollout and
rollback, against real brokers (amqtt and Mosquitto) wherever MQTT is involved."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgewire import delivery, signing, topics
from edgewire import envelopes as env
from edgewire.cloud_bridge.distributor import Distributor
from edgewire.config import BrokerSettings
from edgewire.delivery import DeliveryError
from edgewire.demo.models import DemoArtifacts
from edgewire.fleet import push, rollout, status
from edgewire.fleet.history import History
from edgewire.session import MqttSession, presence_factory

from .conftest import BrokerHandle

CHUNK = 4 * 1024
SIZE = 5 * CHUNK + 100  # six chunks, the last one short


@pytest.fixture
def artefact(tmp_path: Path) -> Path:
    path = tmp_path / "model-a.plan"
    path.write_bytes(os.urandom(SIZE))
    return path


def manifest_of(path: Path, version: str = "1", **kw: object) -> env.Manifest:
    return delivery.build_manifest(path, name="m", version=version, chunk_size=CHUNK, precision="fp16", **kw)


@contextlib.asynccontextmanager
async def session(broker: BrokerHandle, client_id: str, **kw: object) -> AsyncIterator[MqttSession]:
    async with MqttSession(client_id, broker.host, broker.port, **kw) as s:
        await s.wait_connected(10)
        yield s


async def messages_until_quiet(
    s: MqttSession, *families: topics.TopicSpec, quiet_s: float = 0.7, limit_s: float = 8.0
) -> list[tuple[str, bytes]]:
    """Messages of ``families`` until none arrive for ``quiet_s``. Others are dropped: amqtt 0.12
    hands a connecting client the retained messages of every filter any client subscribed to."""
    got: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        msg = await status.next_message(s, quiet_s)
        if msg is None:
            break
        if any(spec.match(str(msg.topic)) for spec in families):
            got.append((str(msg.topic), bytes(msg.payload)))
    return got


async def until(predicate: object, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def cli(*args: str, env_vars: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgewire.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200", **(env_vars or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# ---- manifests, chunks, targets, history (no broker) ----------------------------------------


def test_manifest_of_the_demo_model_describes_hashes_and_signs_it(demo: DemoArtifacts) -> None:
    private_pem, public_line = signing.generate()
    m = delivery.build_manifest(
        demo.edge_model, name="digits-edge", version="2", chunk_size=1024, private_key=signing.load_private(private_pem)
    )
    data = demo.edge_model.read_bytes()
    assert m.format == "onnx" and m.precision == "fp32"
    assert m.size == len(data) and m.chunk_count == -(-len(data) // 1024)
    assert m.sha256 == hashlib.sha256(data).hexdigest()
    assert m.inputs == [env.TensorSpec(name="image", dtype="float32", shape=[-1, 1, 8, 8])]
    assert m.outputs == [env.TensorSpec(name="probs", dtype="float32", shape=[-1, 10])]
    assert m.signature is not None
    signing.verify(signing.load_public(public_line), bytes.fromhex(m.sha256), m.signature)
    assert env.decode(env.Manifest, env.encode(m)) == m

    chunks = list(delivery.iter_chunks(demo.edge_model, m))
    assert [c.index for c in chunks] == list(range(m.chunk_count))
    assert b"".join(c.data for c in chunks) == data
    assert all(hashlib.sha256(c.data).hexdigest() == c.sha256 for c in chunks)
    assert delivery.read_chunk(demo.edge_model, m, m.chunk_count - 1) == chunks[-1]
    with pytest.raises(DeliveryError, match="out of range"):
        delivery.read_chunk(demo.edge_model, m, m.chunk_count)


def test_manifest_refuses_bad_input_with_a_reason(tmp_path: Path, artefact: Path) -> None:
    with pytest.raises(DeliveryError, match="cannot read"):
        delivery.build_manifest(tmp_path / "missing.onnx", name="m", version="1")
    with pytest.raises(DeliveryError, match="format"):
        delivery.build_manifest(artefact.rename(tmp_path / "model.bin"), name="m", version="1")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(DeliveryError, match="empty"):
        delivery.build_manifest(tmp_path / "empty.onnx", name="m", version="1")
    (tmp_path / "x.onnx").write_bytes(b"not onnx")
    with pytest.raises(DeliveryError, match="version"):
        delivery.build_manifest(tmp_path / "x.onnx", name="m", version="../1")
    with pytest.raises(DeliveryError, match="chunk size"):
        delivery.build_manifest(tmp_path / "x.onnx", name="m", version="1", chunk_size=8 * env.MIB)
    with pytest.raises(DeliveryError, match="precision"):
        delivery.build_manifest(tmp_path / "x.onnx", name="m", version="1", precision="fp8")
    unreadable = delivery.build_manifest(tmp_path / "x.onnx", name="m", version="1")
    assert unreadable.inputs == [] and unreadable.outputs == []  # not loadable as ONNX: says less


def test_targets_parse_and_match() -> None:
    t = delivery.parse_targets("cam-*, gate-01,", "orin-nano", None)
    assert t == env.Targets(devices=["cam-*", "gate-01"], profiles=["orin-nano"], fleets=[])
    assert delivery.targets_match(t, "cam-7", "orin-nano", "lab")
    assert delivery.targets_match(t, "gate-01", "orin-nano", None)
    assert not delivery.targets_match(t, "gate-02", "orin-nano", "lab")
    assert not delivery.targets_match(t, "cam-7", "x86-64-cpu", "lab")
    assert delivery.targets_match(env.Targets(), "anything", None, None)
    fleet = delivery.parse_targets(None, None, ["lab,yard"])
    assert delivery.targets_match(fleet, "d", None, "yard") and not delivery.targets_match(fleet, "d", None, None)
    with pytest.raises(DeliveryError, match="fleets"):
        delivery.parse_targets(None, None, "lab/../x")
    assert rollout.pick_canaries(["d", "a", "c", "b"], 25) == ["a"]
    assert rollout.pick_canaries(["d", "a", "c", "b"], 30) == ["a", "b"]
    assert rollout.pick_canaries(["a"], 1) == ["a"]
    with pytest.raises(DeliveryError, match="canary"):
        rollout.pick_canaries(["a"], 0)


def test_history_latest_previous_get_and_failed(tmp_path: Path, artefact: Path) -> None:
    history = History(tmp_path / "history")
    assert history.latest("m") is None and history.previous("m", "1") is None
    v1, v2, v3 = (manifest_of(artefact, v) for v in ("1", "2", "3"))
    for m in (v1, v2, v3):
        history.save(m)
    assert (tmp_path / "history" / "m" / "2.msgpack").is_file()
    assert history.latest("m") == v3
    assert history.previous("m", "3") == v2 and history.previous("m", "2") == v1
    assert history.previous("m", "1") is None
    assert history.previous("m", "unknown") == v3
    assert history.get("m", "2") == v2
    with pytest.raises(DeliveryError, match=r"no version 9 .*known: 1, 2, 3"):
        history.get("m", "9")
    history.mark_failed("m", "3", "canary rolled back")
    assert history.latest("m") == v2 and history.failed("m", "3") == "canary rolled back"
    assert history.previous("m", "3") == v2
    history.save(v3)  # pushed again: no longer failed
    assert history.latest("m") == v3


def test_history_root_follows_edgewire_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEWIRE_HOME", str(tmp_path))
    assert History().root == tmp_path / "models"
    monkeypatch.delenv("EDGEWIRE_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert History().root == tmp_path / "xdg" / "edgewire" / "models"


# ---- push -----------------------------------------------------------------------------------


async def test_push_announces_first_then_every_chunk(broker: BrokerHandle, artefact: Path) -> None:
    m = manifest_of(artefact)
    seen: list[tuple[int, int]] = []
    async with session(broker, "sub-1") as sub, session(broker, "op-1") as op:
        await sub.subscribe(topics.MODEL_ANNOUNCE.filter(), qos=1)
        await sub.subscribe(topics.MODEL_CHUNK.filter(), qos=1)
        sent = await push.push(op, artefact, m, progress=lambda d, t: seen.append((d, t)), window=2)
        got = await messages_until_quiet(sub, topics.MODEL_ANNOUNCE, topics.MODEL_CHUNK)
    assert sent == m.chunk_count == 6
    assert seen[0] == (0, 6) and seen[-1] == (6, 6)
    assert got[0] == (topics.MODEL_ANNOUNCE.build(model="m"), env.encode(m))
    chunks = [env.decode(env.Chunk, payload) for _, payload in got[1:]]
    assert sorted(c.index for c in chunks) == list(range(6))
    assert b"".join(c.data for c in sorted(chunks, key=lambda c: c.index)) == await asyncio.to_thread(
        artefact.read_bytes
    )
    async with session(broker, "late") as late:  # a device that connects later sees the manifest
        assert await status.current_manifest(late, "m") == m


# ---- the distributor ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(d: Distributor) -> AsyncIterator[Distributor]:
    task = asyncio.create_task(d.run())
    ready = asyncio.create_task(d.ready.wait())
    await asyncio.wait([task, ready], timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    assert d.ready.is_set()
    try:
        yield d
    finally:
        d.stop()
        await asyncio.wait_for(task, 15)


def fetch(device: str, version: str, ranges: list[list[int]], *, topic_device: str | None = None) -> tuple[str, bytes]:
    req = env.FetchRequest(device_id=device, name="m", version=version, ranges=ranges)
    return topics.MODEL_FETCH.build(device_id=topic_device or device, model="m"), env.encode(req)


async def test_distributor_stores_a_push_and_serves_exactly_the_fetched_chunks(
    broker: BrokerHandle, artefact: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    m = manifest_of(artefact)
    data = await asyncio.to_thread(artefact.read_bytes)
    d = Distributor(BrokerSettings(url=broker.url), store, client_id="distributor-t", telemetry_interval_s=60)
    async with running(d):
        async with session(broker, "op-2") as op:
            await rollout.require_distributor(op)  # its presence is what `model push` looks for
            await push.push(op, artefact, m)
        await until(lambda: d.holds("m", "1"))
        assert (store / "m" / "1" / "artefact").read_bytes() == data
        assert env.decode(env.Manifest, (store / "m" / "1" / "manifest.msgpack").read_bytes()) == m

        async with session(broker, "watcher") as sub, session(broker, "cam-1") as dev:
            await sub.subscribe(topics.MODEL_CHUNK.filter(model="m", version="1"), qos=1)
            await sub.subscribe(topics.MODEL_RESEND.filter(model="m", version="1"), qos=1)  # every device's
            await dev.publish(*fetch("cam-1", "1", [[2, 4]]), qos=1)
            answers = await messages_until_quiet(sub, topics.MODEL_CHUNK, topics.MODEL_RESEND)
            # Sent to the device that asked, on its own topic; nothing to the rest of the fleet.
            assert sorted(t for t, _ in answers) == [
                topics.MODEL_RESEND.build(device_id="cam-1", model="m", version="1", index=i) for i in (2, 3)
            ]
            got = [env.decode(env.Chunk, p) for _, p in answers]
            assert sorted(c.index for c in got) == [2, 3]
            for c in got:
                assert c.data == data[c.index * CHUNK : (c.index + 1) * CHUNK]
            assert d.chunks_served == 2

            # Refused, counted, and nothing sent: a device speaking for another, a version not
            # held, ranges past the end, garbage.
            await dev.publish(*fetch("cam-2", "1", [[0, 6]], topic_device="cam-1"), qos=1)
            await dev.publish(*fetch("cam-1", "9", [[0, 1]]), qos=1)
            await dev.publish(*fetch("cam-1", "1", [[3, 99]]), qos=1)
            await dev.publish(topics.MODEL_FETCH.build(device_id="cam-1", model="m"), b"\xc1garbage", qos=1)
            await until(lambda: d.rejected("payload") == 1)
            assert await messages_until_quiet(sub, topics.MODEL_CHUNK, topics.MODEL_RESEND, quiet_s=0.5) == []
            assert d.rejected("fetch_device_mismatch") == 1
            assert d.rejected("fetch_unknown_version") == 1
            assert d.rejected("fetch_bad_ranges") == 1
            assert d.chunks_served == 2

            # A corrupt chunk of a new version is refused; the distributor still serves afterwards.
            m2 = manifest_of(artefact, "2")
            async with session(broker, "op-3") as op:
                await push.announce(op, m2)
                bad = env.Chunk(name="m", version="2", index=0, sha256="0" * 64, data=data[:CHUNK])
                await op.publish(topics.MODEL_CHUNK.build(model="m", version="2", index=0), env.encode(bad), qos=1)
            await until(lambda: d.rejected("chunk_checksum") == 1)
            assert not d.holds("m", "2")

            await dev.publish(*fetch("cam-1", "1", [[0, 1], [5, 6]]), qos=1)
            got = [env.decode(env.Chunk, p) for _, p in await messages_until_quiet(sub, topics.MODEL_RESEND)]
            assert sorted(c.index for c in got) == [0, 5] and d.chunks_served == 4

    # Restarted on the same store, it serves what it verified before without any push; a version
    # whose chunks were all in but whose verification did not finish is verified at start.
    again = Distributor(BrokerSettings(url=broker.url), store, client_id="distributor-t", telemetry_interval_s=60)
    async with running(again):
        assert again.holds("m", "1") and not again.holds("m", "2")
    (store / "m" / "1" / "complete").unlink()
    third = Distributor(BrokerSettings(url=broker.url), store, client_id="distributor-t", telemetry_interval_s=60)
    async with running(third):
        await until(lambda: third.holds("m", "1"))


async def test_distributor_intake_checks_everything_and_takes_chunks_before_their_manifest(
    artefact: Path, tmp_path: Path
) -> None:
    d = Distributor("mqtt://127.0.0.1:9", tmp_path / "store", client_id="distributor-u")
    d._load_store()
    m = manifest_of(artefact)
    chunks = list(delivery.iter_chunks(artefact, m))

    def chunk_topic(c: env.Chunk) -> str:
        return topics.MODEL_CHUNK.build(model=c.name, version=c.version, index=c.index)

    for c in chunks[:2]:  # another client's order across topics is not guaranteed
        d._on_message(chunk_topic(c), env.encode(c))
    d._on_message(topics.MODEL_ANNOUNCE.build(model="m"), env.encode(m))
    for c in chunks[2:]:
        d._on_message(chunk_topic(c), env.encode(c))
    await until(lambda: d.holds("m", "1"))
    assert d.artefact_path("m", "1").read_bytes() == await asyncio.to_thread(artefact.read_bytes)

    broken = m.model_copy(update={"version": "2", "chunk_count": 3})
    d._on_message(topics.MODEL_ANNOUNCE.build(model="m"), env.encode(broken))
    d._on_message(topics.MODEL_ANNOUNCE.build(model="other"), env.encode(m.model_copy(update={"version": "3"})))
    assert d.rejected("manifest") == 2 and d.manifest("m", "2") is None
    m4 = m.model_copy(update={"version": "4"})
    d._on_message(topics.MODEL_ANNOUNCE.build(model="m"), env.encode(m4))
    c0 = chunks[0].model_copy(update={"version": "4"})
    d._on_message(chunk_topic(c0.model_copy(update={"index": 1})), env.encode(c0))  # topic and payload disagree
    d._on_message(chunk_topic(c0), env.encode(c0.model_copy(update={"data": c0.data[:-1]})))  # short
    d._on_message(chunk_topic(c0), b"garbage")
    d._on_message("model/chunk/m/4/x", env.encode(c0))
    assert [d.rejected(r) for r in ("chunk_topic", "chunk_size", "payload", "topic")] == [1, 1, 1, 1]
    assert d.manifest("m", "4") == m4 and not d.holds("m", "4")


async def test_distributor_command_stops_cleanly_on_sigterm(broker: BrokerHandle, tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgewire.cli",
        "distributor",
        "--broker",
        broker.url,
        "--store",
        str(tmp_path / "store"),
        "--id",
        "distributor-cli",
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with session(broker, "op-4") as op:
            for _ in range(40):
                presences = await status.collect_presence(op, quiet_s=0.2)
                if presences.get("distributor-cli") and presences["distributor-cli"].online:
                    break
            else:
                raise AssertionError("the distributor never came online")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        async with session(broker, "op-5") as op:
            presence = (await status.collect_presence(op))["distributor-cli"]
        assert presence.kind == "distributor" and not presence.online
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# ---- the CLI --------------------------------------------------------------------------------


async def test_model_push_refuses_when_no_distributor_is_online(
    broker: BrokerHandle, artefact: Path, tmp_path: Path
) -> None:
    rc, _, err = await cli(
        "model", "push", str(artefact), "--name", "m", "--version", "1", "--broker", broker.url,
        "--history", str(tmp_path / "h"),
    )  # fmt: skip
    assert rc == 2, err
    assert "no distributor is online" in " ".join(err.split())
    async with session(broker, "op-6") as op:
        assert await status.current_manifest(op, "m") is None
    assert History(tmp_path / "h").latest("m") is None


async def test_model_push_signed_through_a_distributor(broker: BrokerHandle, artefact: Path, tmp_path: Path) -> None:
    private_pem, public_line = signing.generate()
    key = tmp_path / "fleet-signing.key"
    key.write_bytes(private_pem)
    d = Distributor(BrokerSettings(url=broker.url), tmp_path / "store", client_id="distributor-p")
    async with running(d):
        rc, out, err = await cli(
            "model", "push", str(artefact), "--name", "m", "--version", "3", "--broker", broker.url,
            "--history", str(tmp_path / "h"), "--key", str(key), "--chunk-size", str(CHUNK),
            "--targets-fleets", "lab",
        )  # fmt: skip
        assert rc == 0, err
        assert "pushed m 3 (6 chunks)" in out
        await until(lambda: d.holds("m", "3"))
    m = History(tmp_path / "h").get("m", "3")
    assert m.targets.fleets == ["lab"] and m.signature is not None
    signing.verify(signing.load_public(public_line), bytes.fromhex(m.sha256), m.signature)

    bad_key = tmp_path / "bad.key"
    bad_key.write_text("not a key")
    rc, _, err = await cli(
        "model", "push", str(artefact), "--name", "m", "--version", "4", "--broker", broker.url,
        "--key", str(bad_key), "--no-distributor",
    )  # fmt: skip
    assert rc == 2 and "bad.key" in err


async def test_model_status_prints_the_retained_statuses(broker: BrokerHandle) -> None:
    now = time.time()
    statuses = [
        env.ModelStatus(device_id="cam-1", name="m", version="2", state="active", progress=1.0, ts=now - 5),
        env.ModelStatus(device_id="cam-2", name="m", version="2", state="downloading", progress=0.42, ts=now),
        env.ModelStatus(
            device_id="cam-3", name="m", version="2", state="failed", progress=1.0, reason="sha256 mismatch", ts=now
        ),
        env.ModelStatus(device_id="cam-1", name="other", version="7", state="active", progress=1.0, ts=now),
    ]
    async with session(broker, "cam-1", presence=presence_factory("cam-1", "device", fleet="lab")) as dev:
        for s in statuses:
            topic = topics.MODEL_STATUS.build(device_id=s.device_id, model=s.name)
            await dev.publish(topic, env.encode(s), qos=1, retain=True)
        rc, out, err = await cli("model", "status", "m", "--broker", broker.url, "--json")
        assert rc == 0, err
        rows = json.loads(out)
        assert [(r["device"], r["version"], r["state"], r["progress"]) for r in rows] == [
            ("cam-1", "2", "active", 100.0),
            ("cam-2", "2", "downloading", 42.0),
            ("cam-3", "2", "failed", 100.0),
        ]
        assert rows[0]["online"] is True and rows[1]["online"] is None and rows[2]["reason"] == "sha256 mismatch"
        rc, out, err = await cli("model", "status", "--broker", broker.url)
        assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["device", "online", "model", "version", "state", "progress", "reason", "age"]
    assert any(line.split()[:6] == ["cam-2", "?", "m", "2", "downloading", "42%"] for line in lines)
    assert any("sha256 mismatch" in line for line in lines)
    assert any(line.split()[:4] == ["cam-1", "yes", "other", "7"] for line in lines)


async def test_model_rollback_republishes_the_previous_manifest(
    broker: BrokerHandle, artefact: Path, tmp_path: Path
) -> None:
    history = History(tmp_path / "h")
    v1, v2 = manifest_of(artefact, "1"), manifest_of(artefact, "2")
    history.save(v1)
    history.save(v2)
    async with session(broker, "op-7") as op:
        await push.announce(op, v2)
    rc, out, err = await cli("model", "rollback", "m", "--broker", broker.url, "--history", str(history.root))
    assert rc == 0, err
    assert "announced 1 (was 2)" in out
    async with session(broker, "op-8") as op:
        assert await status.current_manifest(op, "m") == v1
    assert history.failed("m", "2") is not None and history.latest("m") == v1

    rc, _, err = await cli(
        "model", "rollback", "m", "--to", "9", "--broker", broker.url, "--history", str(history.root)
    )
    assert rc == 2 and "no version 9" in err
    rc, _, err = await cli("model", "rollback", "m", "--broker", broker.url, "--history", str(history.root))
    assert rc == 2 and "no version before 1" in " ".join(err.split())
    rc, _, err = await cli("model", "rollback", "nope", "--broker", broker.url, "--history", str(history.root))
    assert rc == 2 and "no push history for nope" in " ".join(err.split())
    rc, out, err = await cli(
        "model", "rollback", "m", "--to", "2", "--broker", broker.url, "--history", str(history.root)
    )
    assert rc == 0 and "announced 2 (was 1)" in out, err


# ---- canary rollout with simulated devices --------------------------------------------------


class FakeDevice:
    """Stands in for the device side: installs what the retained announce selects it for and
    reports it active; a version listed in ``bad`` it rolls back from shortly after."""

    def __init__(self, broker: BrokerHandle, device_id: str, bad: tuple[str, ...] = ()) -> None:
        self.device_id = device_id
        self.bad = bad
        self.installed: list[str] = []
        self.active: str | None = None
        self.session = MqttSession(
            device_id,
            broker.host,
            broker.port,
            presence=presence_factory(device_id, "device", profile="x86-64-cpu", fleet="lab"),
        )
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FakeDevice:
        await self.session.__aenter__()
        await self.session.wait_connected(10)
        await self.session.subscribe(topics.MODEL_ANNOUNCE.filter(model="m"), qos=1)
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.session.close()

    async def _status(self, version: str, state: str, reason: str | None = None) -> None:
        report = env.ModelStatus(
            device_id=self.device_id,
            name="m",
            version=version,
            state=state,
            progress=1.0,
            reason=reason,
            ts=time.time(),
        )
        topic = topics.MODEL_STATUS.build(device_id=self.device_id, model="m")
        await self.session.publish(topic, env.encode(report), qos=1, retain=True)

    async def _run(self) -> None:
        async for msg in self.session.messages():
            if not msg.payload or topics.MODEL_ANNOUNCE.match(str(msg.topic)) is None:
                continue
            m = env.decode(env.Manifest, bytes(msg.payload))
            if m.version == self.active or not delivery.targets_match(m.targets, self.device_id, "x86-64-cpu", "lab"):
                continue
            previous, self.active = self.active, m.version
            self.installed.append(m.version)
            await self._status(m.version, "active")
            if m.version in self.bad:
                await asyncio.sleep(0.2)
                await self._status(m.version, "rolled_back", "latency regression during probation")
                self.active = previous


async def test_canary_passes_then_everyone_follows(broker: BrokerHandle, artefact: Path, tmp_path: Path) -> None:
    history = History(tmp_path / "h")
    names = ["dev-a", "dev-b", "dev-c", "dev-d"]
    async with contextlib.AsyncExitStack() as stack:
        devices = [await stack.enter_async_context(FakeDevice(broker, n)) for n in names]
        op = await stack.enter_async_context(session(broker, "op-9"))
        m = manifest_of(artefact, "5", targets=delivery.parse_targets(None, None, "lab"))
        lines: list[str] = []
        result = await rollout.push_model(
            op,
            artefact,
            m,
            history=history,
            canary_percent=25,
            probation_s=0.5,
            timeout_s=10,
            require_distributor_online=False,
            say=lines.append,
        )
        assert result.outcome == "promoted", result.reason
        assert result.canaries == ["dev-a"]
        await until(lambda: all(d.active == "5" for d in devices))
        assert await status.current_manifest(op, "m") == m  # full selector retained
    assert devices[0].installed == ["5"]
    assert any("dev-a" in line for line in lines)
    assert history.latest("m") == m


async def test_failed_canary_stops_the_rollout_and_restores_the_previous_version(
    broker: BrokerHandle, artefact: Path, tmp_path: Path
) -> None:
    history = History(tmp_path / "h")
    names = ["dev-a", "dev-b", "dev-c"]
    async with contextlib.AsyncExitStack() as stack:
        devices = [await stack.enter_async_context(FakeDevice(broker, n, bad=("2",))) for n in names]
        op = await stack.enter_async_context(session(broker, "op-10"))
        v1 = manifest_of(artefact, "1")
        await rollout.push_model(op, artefact, v1, history=history, require_distributor_online=False)
        await until(lambda: all(d.active == "1" for d in devices))

        rc, out, err = await cli(
            "model", "push", str(artefact), "--name", "m", "--version", "2", "--broker", broker.url,
            "--history", str(history.root), "--canary", "10", "--probation", "2", "--timeout", "10",
            "--no-distributor", "--chunk-size", str(CHUNK),
        )  # fmt: skip
        assert rc == 1, err
        err = " ".join(err.split())
        assert "canary: dev-a (1 of 3 matching device(s))" in err
        assert "rollout stopped: canary dev-a reported rolled_back: latency regression" in err
        assert "announce restored to 1" in err
        assert any(line.split()[:4] == ["dev-a", "m", "2", "rolled_back"] for line in out.splitlines()), out
        assert await status.current_manifest(op, "m") == v1
        await asyncio.sleep(0.3)
    assert devices[0].installed == ["1", "2"] and devices[0].active == "1"
    assert all(d.installed == ["1"] for d in devices[1:])  # nobody else ever got the bad version
    assert history.latest("m") == v1 and history.failed("m", "2")


async def test_distributor_takes_no_announce_whose_numbers_it_cannot_afford(artefact: Path, tmp_path: Path) -> None:
    """A manifest's size, chunk_size and chunk_count are bounded and must agree before a byte
    or a folder is spent on it; the refusals are counted by reason."""
    store = tmp_path / "store"
    d = Distributor("mqtt://127.0.0.1:9", store, client_id="distributor-l")
    d._load_store()
    m = manifest_of(artefact)
    announce = topics.MODEL_ANNOUNCE.build(model="m")

    n = 300_000_000
    tiny_chunks = m.model_copy(update={"version": "2", "chunk_size": 1, "size": n, "chunk_count": n})
    huge = m.model_copy(update={"version": "3", "size": 10**13, "chunk_count": -(-(10**13) // m.chunk_size)})
    disagree = m.model_copy(update={"version": "4", "chunk_count": m.chunk_count + 1})
    zero = m.model_copy(update={"version": "5", "size": 0, "chunk_count": 0})
    for bad in (tiny_chunks, huge, disagree, zero):
        d._on_message(announce, env.encode(bad))
        assert d.manifest("m", bad.version) is None
    assert d.rejected("manifest_limits") == 3 and d.rejected("manifest") == 1
    assert list(store.iterdir()) == []  # no folder, no file, for any of them

    d._on_message(announce, env.encode(m))  # the genuine one is still taken
    assert d.manifest("m", "1") == m and (store / "m" / "1" / "artefact").stat().st_size == m.size


def test_a_version_the_disk_refuses_leaves_no_folder(artefact: Path, tmp_path: Path) -> None:
    from edgewire.cloud_bridge.artefact_store import StoredArtefact

    store = tmp_path / "store"
    store.mkdir()
    m = manifest_of(artefact).model_copy(update={"size": 2**62, "chunk_count": 1})  # past any file system
    with pytest.raises(OSError):
        StoredArtefact.create(store, m)
    assert list(store.iterdir()) == []


async def test_fetches_resend_no_more_than_the_fetch_budget(broker: BrokerHandle, tmp_path: Path) -> None:
    """Five small fetches for a whole artefact from made-up device ids: without a budget they
    would make the distributor re-broadcast five copies; with one it resends what the per-device
    and overall buckets hold, refuses the rest by reason, and a real device's fetch is still
    served once the buckets refill."""
    from edgewire.cloud_bridge.resends import FetchLimits

    chunk = 4 * 1024
    path = tmp_path / "big.onnx"
    path.write_bytes(os.urandom(128 * chunk))  # 128 chunks, 512 KiB
    m = delivery.build_manifest(path, name="m", version="1", chunk_size=chunk, precision="fp16")
    limits = FetchLimits(
        device_bytes_per_s=chunk,
        device_burst_bytes=48 * chunk,
        total_bytes_per_s=8 * chunk,
        total_burst_bytes=96 * chunk,
    )
    d = Distributor(BrokerSettings(url=broker.url), tmp_path / "store", client_id="distributor-r", fetch_limits=limits)
    async with running(d):
        async with session(broker, "op-r") as op:
            await push.push(op, path, m)
        await until(lambda: d.holds("m", "1"))
        served_before = d.meter.total("distributor_bytes_served_total")
        started = time.monotonic()
        async with session(broker, "nobody") as attacker:
            for i in range(5):
                req = env.FetchRequest(device_id=f"ghost-{i}", name="m", version="1", ranges=[[0, 128]])
                await attacker.publish(
                    topics.MODEL_FETCH.build(device_id=f"ghost-{i}", model="m"), env.encode(req), qos=1
                )
            await until(lambda: d.rejected("fetch_rate_limited") >= 4)
            await until(lambda: d.resends.idle)
        elapsed = time.monotonic() - started
        resent = d.meter.total("distributor_bytes_served_total") - served_before
        unlimited = 5 * m.size
        print(f"re-broadcast by 5 whole-artefact fetches: {resent // 1024} KiB, unbounded {unlimited // 1024} KiB")
        # At most the overall burst plus what it refilled while the test ran.
        assert resent <= limits.total_burst_bytes + limits.total_bytes_per_s * elapsed + chunk
        assert resent < unlimited / 4
        assert d.meter.total("distributor_fetch_chunks_refused_total") > 0

        # A device within its own budget is served once the overall bucket has refilled a chunk.
        await asyncio.sleep(1.5)
        async with session(broker, "watcher-r") as sub, session(broker, "cam-r") as dev:
            await sub.subscribe(topics.MODEL_RESEND.filter(device_id="cam-r", model="m", version="1"), qos=1)
            req = env.FetchRequest(device_id="cam-r", name="m", version="1", ranges=[[7, 8]])
            await dev.publish(topics.MODEL_FETCH.build(device_id="cam-r", model="m"), env.encode(req), qos=1)
            got = [env.decode(env.Chunk, p) for _, p in await messages_until_quiet(sub, topics.MODEL_RESEND)]
        assert [c.index for c in got] == [7]


async def test_a_distributor_with_the_fleet_key_stores_only_signed_announces(artefact: Path, tmp_path: Path) -> None:
    private_pem, public_line = signing.generate()
    d = Distributor(
        "mqtt://127.0.0.1:9", tmp_path / "store", client_id="distributor-k", fleet_key=signing.load_public(public_line)
    )
    d._load_store()
    announce = topics.MODEL_ANNOUNCE.build(model="m")
    d._on_message(announce, env.encode(manifest_of(artefact, "1")))  # unsigned
    other, _ = signing.generate()
    d._on_message(announce, env.encode(manifest_of(artefact, "2", private_key=signing.load_private(other))))
    assert d.rejected("manifest_signature") == 2 and list((tmp_path / "store").iterdir()) == []
    signed = manifest_of(artefact, "3", private_key=signing.load_private(private_pem))
    d._on_message(announce, env.encode(signed))
    assert d.manifest("m", "3") == signed


async def test_many_fetches_at_once_are_answered_once_for_the_fleet(
    broker: BrokerHandle, artefact: Path, tmp_path: Path
) -> None:
    """A canary promoted: the rest of the fleet fetches the whole version at once. From the third
    distinct device on, the chunks go once on the fleet's chunk topic (which every device
    downloading the version reads) instead of one copy per device; one device fetching again and
    again is still answered on its own resend topic alone."""
    from edgewire.cloud_bridge.resends import FleetResend

    rule = FleetResend(min_devices=3, window_s=5.0)  # wide: the fetches of a loaded machine still fall in one
    d = Distributor(BrokerSettings(url=broker.url), tmp_path / "store", client_id="distributor-f", fleet_resend=rule)
    m1, m2 = manifest_of(artefact, "1"), manifest_of(artefact, "2")
    async with running(d):
        async with session(broker, "op-f") as op:
            await push.push(op, artefact, m1)
            await push.push(op, artefact, m2)
        await until(lambda: d.holds("m", "1") and d.holds("m", "2"))
        async with session(broker, "watcher-f") as sub:
            for version in ("1", "2"):
                await sub.subscribe(topics.MODEL_CHUNK.filter(model="m", version=version), qos=1)
                await sub.subscribe(topics.MODEL_RESEND.filter(model="m", version=version), qos=1)

            # One device alone, three times: never a broadcast, only its own copies.
            async with session(broker, "cam-z") as lone:
                for _ in range(3):
                    await lone.publish(*fetch("cam-z", "2", [[0, 6]]), qos=1)
                lone_answers = await messages_until_quiet(sub, topics.MODEL_CHUNK, topics.MODEL_RESEND)
            assert lone_answers and {resent_to(t) for t, _ in lone_answers} == {"cam-z"}, lone_answers
            assert {env.decode(env.Chunk, p).index for _, p in lone_answers} == set(range(6))
            assert d.meter.get("distributor_chunks_served_total", to="fleet") == 0

            # Five devices at once: every chunk once on the fleet's topic; per-device copies only
            # for the devices that asked before the third.
            crowd = [f"cam-{c}" for c in "abcde"]
            async with contextlib.AsyncExitStack() as stack:
                devices = [await stack.enter_async_context(session(broker, c)) for c in crowd]
                await asyncio.gather(
                    *(dev.publish(*fetch(c, "1", [[0, 6]]), qos=1) for dev, c in zip(devices, crowd, strict=True))
                )
                answers = await messages_until_quiet(sub, topics.MODEL_CHUNK, topics.MODEL_RESEND)
        fleet = sorted(env.decode(env.Chunk, p).index for t, p in answers if topics.MODEL_CHUNK.match(t))
        assert fleet == list(range(6)), sorted(t for t, _ in answers)
        copies_to = {resent_to(t) for t, _ in answers} - {None}
        assert copies_to <= set(crowd) and len(copies_to) <= rule.min_devices - 1
        assert d.meter.get("distributor_chunks_served_total", to="fleet") == 6
        for c in answers:
            chunk = env.decode(env.Chunk, c[1])
            assert chunk.version == "1" and hashlib.sha256(chunk.data).hexdigest() == chunk.sha256


def resent_to(topic: str) -> str | None:
    """The device a resend is for; None for a chunk on the fleet's topic."""
    levels = topics.MODEL_RESEND.match(topic)
    return None if levels is None else levels["device_id"]


def test_a_fleet_resend_needs_more_than_one_device() -> None:
    from edgewire.cloud_bridge.resends import FleetResend

    with pytest.raises(ValueError):
        FleetResend(min_devices=1)
    with pytest.raises(ValueError):
        FleetResend(window_s=0)


def open_files(pid: int) -> dict[int, str]:
    """What each descriptor of process ``pid`` points to (a path, ``socket:[...]``, ``pipe:[...]``)."""
    found: dict[int, str] = {}
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed between the listing and the read
            found[int(entry.name)] = os.readlink(entry)
    return found


async def start_distributor(
    broker: BrokerHandle, store: Path, op: MqttSession, *options: str
) -> asyncio.subprocess.Process:
    """``edgewire distributor`` in its own process, returned once its presence says it is online."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgewire.cli", "distributor",
        "--broker", broker.url, "--store", str(store), "--id", "distributor-fd", *options,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(60):  # a process starting on a loaded machine: give it room
        with contextlib.suppress(rollout.NoDistributor):
            await rollout.require_distributor(op, quiet_s=0.2)
            return proc
    proc.kill()
    await proc.wait()
    raise AssertionError("the distributor never came online")


async def test_the_distributor_command_s_device_fetch_budget_holds_one_device_and_serves_another(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    """``edgewire distributor --device-fetch-burst 4 --device-fetch-rate 0.01``, as an operator
    starts it: a device fetching a 6 MiB version whole gets its first 4 MiB resent and no more
    (the rest refused, its budget refilling 10 KiB/s), while another device's fetch, paid from its
    own budget, is served whole."""
    chunk = 256 * 1024
    path = tmp_path / "big.plan"
    path.write_bytes(os.urandom(24 * chunk))
    m = delivery.build_manifest(path, name="m", version="1", chunk_size=chunk, precision="fp16")
    store = tmp_path / "store"
    proc: asyncio.subprocess.Process | None = None
    try:
        async with (
            session(broker, "op-budget") as op,
            session(broker, "cam-greedy") as greedy,
            session(broker, "cam-other") as other,
        ):
            for dev in (greedy, other):
                await dev.subscribe(topics.MODEL_RESEND.filter(device_id=dev.client_id), qos=1)
            budget = ("--device-fetch-burst", "4", "--device-fetch-rate", "0.01")
            proc = await start_distributor(broker, store, op, *budget)
            await push.push(op, path, m)
            await until(lambda: (store / "m" / "1" / "complete").exists(), 30)
            await greedy.publish(*fetch("cam-greedy", "1", [[0, 24]]), qos=1)
            greedy_got = await messages_until_quiet(greedy, topics.MODEL_RESEND, quiet_s=1.0, limit_s=30)
            await other.publish(*fetch("cam-other", "1", [[16, 24]]), qos=1)
            other_got = await messages_until_quiet(other, topics.MODEL_RESEND, quiet_s=1.0, limit_s=30)
    finally:
        if proc is not None and proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)
    assert sorted(env.decode(env.Chunk, p).index for _, p in greedy_got) == list(range(16))  # 4 MiB
    assert sorted(env.decode(env.Chunk, p).index for _, p in other_got) == list(range(16, 24))


async def fetched(dev: MqttSession, version: str) -> None:
    """One chunk of ``version`` fetched and received, so the distributor read its file."""
    await dev.publish(*fetch(dev.client_id, version, [[0, 1]]), qos=1)
    served = await messages_until_quiet(dev, topics.MODEL_RESEND, quiet_s=0.5, limit_s=15)
    assert [env.decode(env.Chunk, p).version for _, p in served] == [version]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads descriptors from /proc (Linux)")
async def test_distributor_holds_no_descriptor_per_version_pushed(broker: BrokerHandle, tmp_path: Path) -> None:
    """A distributor runs for months and stores every version ever pushed: the files it writes
    and serves from must not stay open per version, or a long-lived one runs out of descriptors.
    Checked while versions are pushed and served, and after a restart on the same store (whose
    versions are only read)."""
    store = tmp_path / "store"
    versions = [str(n) for n in range(1, 7)]
    proc: asyncio.subprocess.Process | None = None
    try:
        async with session(broker, "op-fd") as op, session(broker, "cam-fd") as dev:
            await dev.subscribe(topics.MODEL_RESEND.filter(device_id="cam-fd"), qos=1)
            proc = await start_distributor(broker, store, op)
            before = open_files(proc.pid)
            counts: list[int] = []
            for version in versions:
                path = tmp_path / f"v{version}.plan"
                path.write_bytes(os.urandom(SIZE))
                await push.push(op, path, manifest_of(path, version))
                await until(lambda v=version: (store / "m" / v / "complete").exists(), 30)  # type: ignore[misc]
                await fetched(dev, version)
                counts.append(len(open_files(proc.pid)))
            after = open_files(proc.pid)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0

            proc = await start_distributor(broker, store, op)
            restarted_before = len(open_files(proc.pid))
            for version in versions:
                await fetched(dev, version)
            restarted = open_files(proc.pid)
        for listing in (after, restarted):
            store_files = sorted(t for t in listing.values() if t.startswith(str(store)))
            assert store_files == [], f"store files still open with {len(versions)} versions stored: {store_files}"
        # Sockets and the like may come and go by a few; nothing may grow with each version.
        assert max(counts) - len(before) <= 3, f"descriptors {len(before)} -> {counts}: {after}"
        assert len(restarted) - restarted_before <= 3, f"after a restart {restarted_before} -> {restarted}"
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
