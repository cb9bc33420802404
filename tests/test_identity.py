"""Identities that hold, on both brokers, each run from the files `edgewire flash` renders: a
wrong password is refused, a device reads and writes only its own topics, and no one takes
over another's client id (with a wrong password, or with their own and the other's id)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from edgewire import acl, topics
from edgewire.broker.embedded import BrokerAuth, EmbeddedBroker
from edgewire.errors import EdgewireError
from edgewire.fleet import flash
from edgewire.passwords import hash_password, read_password_file, verify_password
from edgewire.ports import free_port

from .conftest import Mosquitto, MosquittoFiles

FLEET = """
fleet: lab
broker: {url: "mqtt://127.0.0.1:1883"}
credentials_secret: test-secret
broker_users:
  bridge-1: {role: bridge}
  distributor-1: {role: distributor}
  operator: {role: operator}
  alice: {role: operator}
devices:
  - {id: cam-a}
  - {id: cam-b}
"""


@dataclass
class Fleet:
    host: str
    port: int
    kind: str
    passwords: dict[str, str]

    def client(self, user: str, *, client_id: str | None = None, password: str | None = None) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=client_id or user,
            username=user,
            password=self.passwords[user] if password is None else password,
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=True,
            timeout=5,
        )


def rendered_broker_files(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(FLEET)
    out = tmp_path / "broker"
    flash.write(list(flash.plan([flash.render_broker(fleet_file)], out, per_device_dirs=False)))
    passwords = {p.name: p.read_text().strip() for p in (out / "credentials").iterdir()}
    fleet = flash.load_yaml_model(fleet_file, flash.Fleet)
    for device in ("cam-a", "cam-b"):
        passwords[device] = flash._password(fleet, device, None)  # type: ignore[assignment]
    return out, passwords


@pytest.fixture(params=["amqtt", "mosquitto"])
async def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Fleet]:
    out, passwords = rendered_broker_files(tmp_path)
    if request.param == "amqtt":
        port = free_port()
        auth = BrokerAuth(out / "passwd", out / "roles.yaml")
        async with EmbeddedBroker("127.0.0.1", port, auth=auth):
            yield Fleet("127.0.0.1", port, "amqtt", passwords)
    else:
        m = Mosquitto(tmp_path, files=MosquittoFiles(out / "passwd", out / "acl"))
        await asyncio.to_thread(m.start)
        try:
            yield Fleet("127.0.0.1", m.port, "mosquitto", passwords)
        finally:
            await asyncio.to_thread(m.stop)


async def refused(client: aiomqtt.Client) -> str | None:
    """The broker's refusal of this login, or None if it let the client in."""
    try:
        async with client:
            return None
    except aiomqtt.MqttError as exc:
        return str(exc)


async def next_message(client: aiomqtt.Client, timeout: float) -> aiomqtt.Message | None:
    with contextlib.suppress(asyncio.TimeoutError):
        return await asyncio.wait_for(anext(aiter(client.messages)), timeout)
    return None


def test_rendered_password_file_is_mosquitto_passwd_format(tmp_path: Path) -> None:
    out, passwords = rendered_broker_files(tmp_path)
    users = read_password_file(out / "passwd")
    assert set(users) == {"cam-a", "cam-b", "bridge-1", "distributor-1", "operator", "alice"}
    assert all(verify_password(passwords[u], h) for u, h in users.items())
    assert not verify_password("wrong", users["cam-a"])
    assert (out / "passwd").stat().st_mode & 0o777 == 0o600
    assert (out / "credentials" / "bridge-1").stat().st_mode & 0o777 == 0o600
    # A second render gives the same bytes, so flash reports nothing changed.
    again = flash.render_broker(tmp_path / "fleet.yaml")
    assert list(flash.plan([again], out, per_device_dirs=False)) == []
    # Known answer from `mosquitto_passwd -b` (Mosquitto 2.0.11): salt and hash.
    salt = "/cqucs/wWFHutoxU"
    digest = "X1t1ZMQ3E+gGz64G9Q75Tfg0Rr9gKPTmW0kVT9RJA00VOk76ZXSsN0dOPCDM4FGHSEilFqbntBSPHz0Q6wWtqQ=="
    known = f"$7$101${salt}${digest}"
    assert verify_password("s3cret", known)
    assert hash_password("s3cret", salt=base64.b64decode(salt)) == known


def test_rules_bind_each_device_to_its_own_topics() -> None:
    assert acl.allowed("device", "cam-a", "write", topics.REQUEST.build(device_id="cam-a", trace_id="t1"))
    assert not acl.allowed("device", "cam-a", "write", topics.REQUEST.build(device_id="cam-b", trace_id="t1"))
    assert acl.allowed("device", "cam-a", "read", "result/cam-a")
    assert not acl.allowed("device", "cam-a", "read", "result/+")
    assert not acl.allowed("device", "cam-a", "read", "#")
    assert acl.allowed("device", "cam-a", "read", topics.MODEL_CHUNK.filter(model="m"))
    for family in ("model/announce/m", "model/chunk/m/1/0", "result/cam-a", "config/desired/cam-a"):
        assert not acl.allowed("device", "cam-a", "write", family)
    mine = topics.MODEL_RESEND.filter(device_id="cam-a", model="m")
    assert acl.allowed("device", "cam-a", "read", mine)
    assert not acl.allowed("device", "cam-b", "read", mine)
    assert not acl.allowed("device", "cam-a", "read", topics.MODEL_RESEND.filter())  # every device's
    assert not acl.allowed("device", "cam-a", "write", topics.MODEL_RESEND.build(
        device_id="cam-a", model="m", version="1", index=0))  # fmt: skip
    assert acl.allowed("distributor", "distributor-1", "write", topics.MODEL_RESEND.filter())
    # Many devices fetching one version at once are answered once on the fleet's chunk topic;
    # announces (what the fleet runs) stay the operator's.
    assert acl.allowed("distributor", "distributor-1", "write", topics.MODEL_CHUNK.build(
        model="m", version="1", index=0))  # fmt: skip
    assert not acl.allowed("distributor", "distributor-1", "write", topics.MODEL_ANNOUNCE.build(model="m"))
    assert acl.allowed("bridge", "bridge-1", "read", topics.REQUEST.shared_filter("bridges"))
    assert acl.allowed("bridge", "bridge-1", "write", "presence/bridge-1")
    assert not acl.allowed("device", "a+", "read", "result/a+")
    assert acl.identity_ok("device", "cam-a", "cam-a") and not acl.identity_ok("device", "cam-b", "cam-a")
    assert acl.identity_ok("operator", "operator", "operator-4711")
    assert not acl.identity_ok("device", "cam", "cam-1")


async def test_wrong_or_missing_password_is_refused(fleet: Fleet) -> None:
    assert await refused(fleet.client("cam-a", password="not-it")) is not None
    assert await refused(fleet.client("nobody", password="x")) is not None  # type: ignore[arg-type]
    anonymous = aiomqtt.Client(fleet.host, fleet.port, identifier="anon", protocol=aiomqtt.ProtocolVersion.V311)
    assert await refused(anonymous) is not None
    assert await refused(fleet.client("cam-a")) is None


async def test_a_device_reads_and_writes_only_its_own_topics(fleet: Fleet) -> None:
    async with fleet.client("cam-a") as a, fleet.client("cam-b") as b, fleet.client("operator") as op:
        await a.subscribe("result/cam-a", qos=1)
        await op.subscribe("#", qos=1)
        for theirs in ("result/cam-a", "result/+", "#", "req/+/+"):
            granted = await b.subscribe(theirs, qos=1)
            if fleet.kind == "amqtt":  # refused outright; Mosquitto grants it and delivers nothing of it
                assert [int(getattr(g, "value", g)) for g in granted] == [0x80], (theirs, granted)
        # Nothing a device may not publish gets through: another's request, a result, an
        # announce, a chunk, a desired config.
        forged = [
            "req/cam-a/0123456789abcdef",
            "result/cam-a",
            "model/announce/m",
            "model/chunk/m/1/0",
            "model/resend/cam-a/m/1/0",
            "config/desired/cam-a",
        ]
        for topic in forged:
            with contextlib.suppress(aiomqtt.MqttError):
                await b.publish(topic, b"forged", qos=1)
        await b.publish("presence/cam-b", b"mine", qos=1)  # what it may: its own presence
        got = await next_message(op, 3)
        assert got is not None and str(got.topic) == "presence/cam-b"
        assert await next_message(op, 0.5) is None
        assert await next_message(a, 0.2) is None
        async with fleet.client("bridge-1") as bridge:
            await bridge.publish("result/cam-a", b"answer", qos=1)
        got = await next_message(a, 3)
        assert got is not None and got.payload == b"answer"
        with contextlib.suppress(aiomqtt.MqttError):
            await a.publish("req/cam-a/0123456789abcdef", b"a request", qos=1)
        assert await next_message(b, 1.0) is None  # neither cam-a's answer nor its request reached cam-b


async def test_a_resent_chunk_reaches_only_the_device_it_is_for(fleet: Fleet) -> None:
    """The distributor answers cam-a's fetch on cam-a's resend topic: cam-b, asking for it by
    name or by wildcard, never receives it."""
    async with fleet.client("cam-a") as a, fleet.client("cam-b") as b:
        await a.subscribe(topics.MODEL_RESEND.filter(device_id="cam-a"), qos=1)
        for theirs in (topics.MODEL_RESEND.filter(device_id="cam-a"), topics.MODEL_RESEND.filter(), "model/#"):
            granted = await b.subscribe(theirs, qos=1)
            if fleet.kind == "amqtt":  # refused outright; Mosquitto grants it and delivers nothing of it
                assert [int(getattr(g, "value", g)) for g in granted] == [0x80], (theirs, granted)
        await b.subscribe(topics.MODEL_RESEND.filter(device_id="cam-b"), qos=1)
        async with fleet.client("distributor-1") as distributor:
            await distributor.publish(
                topics.MODEL_RESEND.build(device_id="cam-a", model="m", version="1", index=0), b"chunk", qos=1
            )
        got = await next_message(a, 3)
        assert got is not None and got.payload == b"chunk"
        assert await next_message(b, 1.0) is None


async def test_the_distributor_may_answer_the_whole_fleet_on_the_chunk_topic(fleet: Fleet) -> None:
    """Many devices fetching one version at once get one broadcast on the fleet's chunk topic:
    the broker lets the distributor publish it, and every device reading the version gets it."""
    async with fleet.client("cam-a") as a, fleet.client("cam-b") as b:
        for device in (a, b):
            await device.subscribe(topics.MODEL_CHUNK.filter(model="m", version="1"), qos=1)
        async with fleet.client("distributor-1") as distributor:
            await distributor.publish(topics.MODEL_CHUNK.build(model="m", version="1", index=0), b"chunk", qos=1)
        for device in (a, b):
            got = await next_message(device, 3)
            assert got is not None and got.payload == b"chunk"


async def test_no_one_takes_over_another_client_id(fleet: Fleet) -> None:
    async with fleet.client("cam-a") as a, fleet.client("operator") as op:
        await a.subscribe("config/desired/cam-a", qos=1)
        # A wrong password with cam-a's client id, then cam-b's own password with cam-a's id.
        assert await refused(fleet.client("cam-a", password="guess")) is not None
        thief = fleet.client("cam-b", client_id="cam-a")
        if fleet.kind == "amqtt":
            assert await refused(thief) is not None
        else:
            async with thief:  # Mosquitto takes the username as the client id: it is cam-b
                await asyncio.sleep(0.3)
        await asyncio.sleep(0.3)
        await op.publish("config/desired/cam-a", b"still here?", qos=1)
        got = await next_message(a, 5)  # raises MqttError if cam-a was knocked off
        assert got is not None and got.payload == b"still here?"


def test_shipped_acl_is_the_rendered_rules() -> None:
    from .conftest import ROOT

    example = {"bridge-1": "bridge", "distributor-1": "distributor", "operator": "operator", "monitor": "monitor"}
    assert (ROOT / "broker" / "mosquitto.acl").read_text() == acl.mosquitto_acl(example)  # type: ignore[arg-type]


async def test_a_bridge_takes_requests_through_the_acl(fleet: Fleet) -> None:
    """The bridge's own subscription (shared on MQTT 5, plain on 3.1.1) passes the rules."""
    from edgewire.session import MqttSession

    async with MqttSession(
        "bridge-1", fleet.host, fleet.port, username="bridge-1", password=fleet.passwords["bridge-1"]
    ) as bridge:
        await bridge.wait_connected(10)
        shared = bridge.protocol == "5"
        await bridge.subscribe(topics.REQUEST.shared_filter("bridges") if shared else topics.REQUEST.filter(), qos=1)
        async with fleet.client("cam-a") as a:
            await a.publish("req/cam-a/0123456789abcdef", b"request", qos=1)
        got = await asyncio.wait_for(anext(aiter(bridge.messages())), 5)
        assert str(got.topic) == "req/cam-a/0123456789abcdef" and bytes(got.payload) == b"request"
        assert shared == (fleet.kind == "mosquitto")


async def test_the_flood_shields_subscriptions_pass_the_rules(fleet: Fleet) -> None:
    """While a device is shut out (cloud_bridge.flood_shield) the bridge reads one device's
    requests (shared on MQTT 5) and every device's presence: both pass the rules."""
    from edgewire.session import MqttSession

    async with MqttSession(
        "bridge-1", fleet.host, fleet.port, username="bridge-1", password=fleet.passwords["bridge-1"]
    ) as bridge:
        await bridge.wait_connected(10)
        one = {"device_id": "cam-a"}
        shared = bridge.protocol == "5"
        per_device = topics.REQUEST.shared_filter("bridges", **one) if shared else topics.REQUEST.filter(**one)
        await bridge.subscribe_all([per_device, topics.PRESENCE.filter()], qos=1)
        async with fleet.client("cam-a") as a:
            await a.publish("presence/cam-a", b"online", qos=1)
            await a.publish("req/cam-a/0123456789abcdef", b"request", qos=1)
        got: set[tuple[str, bytes]] = set()

        async def both() -> None:
            async for message in bridge.messages():
                got.add((str(message.topic), bytes(message.payload)))
                if len(got) == 2:
                    return

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(both(), 10)
        assert got == {("presence/cam-a", b"online"), ("req/cam-a/0123456789abcdef", b"request")}


async def test_commands_log_in_from_the_environment_and_a_refusal_is_a_warning(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import typer

    from edgewire.cli.common import PASSWORD_FILE_ENV, broker_settings, operator_session

    secret = tmp_path / "operator.password"
    secret.write_text(fleet.passwords["operator"] + "\n")
    monkeypatch.setenv(PASSWORD_FILE_ENV, str(secret))
    settings = broker_settings(f"mqtt://operator@{fleet.host}:{fleet.port}")
    assert settings.username == "operator" and settings.host == fleet.host
    async with operator_session(settings, "config") as op:
        await op.wait_connected(10)
    with pytest.raises(typer.Exit):
        broker_settings(f"mqtt://operator:{fleet.passwords['operator']}@{fleet.host}:{fleet.port}")

    secret.write_text("wrong\n")
    caplog.set_level("WARNING", logger="edgewire.session")
    async with operator_session(broker_settings(f"mqtt://operator@{fleet.host}:{fleet.port}"), "config") as op:
        with pytest.raises(EdgewireError, match="last error"):
            await op.wait_connected(2)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("connect to" in w and "failed" in w for w in warnings), warnings


async def test_each_tool_run_has_a_client_id_of_its_own(fleet: Fleet) -> None:
    """Two operator tools at once (``edgewire watch`` while ``edgewire config set`` runs): each
    run's client id is the username, the tool and a random suffix, which the embedded broker
    lets an operator use, so one user's tools do not knock each other off there. Mosquitto
    (``use_username_as_clientid``) makes every client id the username: there each tool run at
    the same time logs in as a user of its own (SECURITY.md), and both stay connected."""
    from edgewire.cli.common import operator_session, tool_client_id
    from edgewire.config import BrokerSettings

    def login(user: str) -> BrokerSettings:
        url = f"mqtt://{fleet.host}:{fleet.port}"
        return BrokerSettings(url=url, username=user, password=fleet.passwords[user])

    ids = {tool_client_id(login("alice"), "watch") for _ in range(3)}
    assert len(ids) == 3 and all(i.startswith("alice-watch-") and acl.identity_ok("operator", "alice", i) for i in ids)
    assert acl.identity_ok("monitor", "alice", tool_client_id(login("alice"), "monitor"))
    assert not acl.identity_ok("device", "alice", tool_client_id(login("alice"), "watch"))
    second = "alice" if fleet.kind == "amqtt" else "operator"
    async with operator_session(login("alice"), "watch") as watch, operator_session(login(second), "config") as config:
        await watch.wait_connected(10)
        await config.wait_connected(10)
        await watch.subscribe("config/desired/cam-a", qos=1)
        await asyncio.sleep(0.5)
        await config.publish("config/desired/cam-a", b"from the other tool", qos=1, timeout=5)
        got = await asyncio.wait_for(anext(aiter(watch.messages())), 5)
        await asyncio.sleep(0.5)  # room for a knock-off and its reconnect to show
        assert bytes(got.payload) == b"from the other tool"
        assert watch.connects == 1 and config.connects == 1  # neither was knocked off


async def test_the_embedded_broker_reads_a_rotated_password_file_without_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out, passwords = rendered_broker_files(tmp_path)
    port = free_port()
    async with EmbeddedBroker("127.0.0.1", port, auth=BrokerAuth(out / "passwd", out / "roles.yaml")):
        fleet = Fleet("127.0.0.1", port, "amqtt", passwords)
        assert await refused(fleet.client("cam-a")) is None
        # cam-a's password rotated: the new file installed over the old one.
        new = "rotated-" + passwords["cam-a"]
        lines = (out / "passwd").read_text().splitlines()
        rotated = [f"cam-a:{hash_password(new)}" if ln.startswith("cam-a:") else ln for ln in lines]
        (out / "passwd").write_text("\n".join(rotated) + "\n")
        assert await refused(fleet.client("cam-a")) is not None  # the old password
        assert await refused(fleet.client("cam-a", password=new)) is None
        assert await refused(fleet.client("cam-b")) is None  # everyone else as before
        # A broken file is said and changes nothing: the logins read before stay.
        (out / "passwd").write_text("cam-a:not-a-hash\n")
        assert await refused(fleet.client("cam-b")) is None
        assert await refused(fleet.client("cam-a", password=new)) is None
        assert any("cannot be read" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
