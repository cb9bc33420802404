"""The session's two ways of speaking MQTT give the same results for the same traffic.

edgewire.mqtt_fastpath patches paho-mqtt's and aiomqtt's internals for throughput; with it off
(``EDGEWIRE_MQTT_FASTPATH=0``, or untested library releases) the session runs on aiomqtt's public
API. Every test here runs once per path, against MQTT 5 (Mosquitto) and MQTT 3.1.1 (the embedded
amqtt broker) where the broker can do what the test needs, and checks the exact outcome, so the
two paths must agree message for message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from edgewire import mqtt_fastpath
from edgewire.mqtt_protocol import MqttVersion
from edgewire.session import InboundMessage, MqttSession, NotConnected

from .conftest import BrokerHandle, Mosquitto, until

# Both sides of the 64 KiB read boundary, megabyte model chunks, and the empty payload.
SIZES = [0, 1, 100, 65_535, 65_536, 65_537, 70_000, 3, 1 << 20, 5, (2 << 20) + 7, 131_072, 2, 600_000]


@pytest.fixture(params=["fast", "plain"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Which path the sessions of a test run on."""
    if request.param == "plain":
        monkeypatch.setenv(mqtt_fastpath.ENV_SWITCH, "0")
    else:
        monkeypatch.delenv(mqtt_fastpath.ENV_SWITCH, raising=False)
    yield request.param


def connected(path: str, *sessions: MqttSession) -> None:
    """Each session is on the path the test asked for: the fast path really installed, or not."""
    for session in sessions:
        assert session.connected
        assert session.fast_path is (path == "fast"), (session.client_id, path)


async def take(messages: AsyncIterator[InboundMessage], n: int, timeout: float = 30) -> list[InboundMessage]:
    return [await asyncio.wait_for(anext(messages), timeout) for _ in range(n)]


def delivered_qos(broker: BrokerHandle, qos: int) -> int:
    """The QoS a QoS 1 subscription receives a message at: amqtt delivers at the subscription's
    QoS, not downgraded to the publish's as MQTT says (a broker trait, the same on both paths)."""
    return 1 if broker.kind == "amqtt" else qos


def observed(got: list[InboundMessage]) -> list[tuple[str, bytes, int, bool]]:
    return [(m.topic, bytes(m.payload), m.qos, m.retain) for m in got]


@contextlib.asynccontextmanager
async def subscribed_pair(
    path: str, broker: BrokerHandle, name: str, topic_filter: str
) -> AsyncIterator[tuple[MqttSession, MqttSession]]:
    """A receiving session subscribed to ``topic_filter`` and a sending one, both on ``path``."""
    async with (
        MqttSession(f"{name}-rx-{path}", broker.host, broker.port) as rx,
        MqttSession(f"{name}-tx-{path}", broker.host, broker.port) as tx,
    ):
        await rx.wait_connected(10)
        await tx.wait_connected(10)
        connected(path, rx, tx)
        await rx.subscribe(topic_filter, qos=1)
        await asyncio.sleep(0.2)
        yield rx, tx


@pytest.mark.parametrize("qos", [0, 1])
async def test_payloads_of_every_size_arrive_whole_and_in_order(path: str, broker: BrokerHandle, qos: int) -> None:
    """Small and large messages interleaved: the fast path receives a large one straight into its
    own buffer and cuts small ones from its read buffer; none may be torn, merged or reordered,
    whichever side of a 64 KiB read a packet boundary falls. QoS 0 and 1 alike (a QoS 0 message
    on loopback with nothing else in flight is not dropped by either broker)."""
    payloads = [os.urandom(n) for n in SIZES]
    async with subscribed_pair(path, broker, "sizes", "sizes/#") as (rx, tx):
        # Queued back to back, so packets share reads.
        sends = [
            asyncio.ensure_future(tx.publish(f"sizes/{i}", body, qos=qos, timeout=30))
            for i, body in enumerate(payloads)
        ]
        got = await take(rx.messages(), len(payloads))
        assert await asyncio.gather(*sends) == [True] * len(payloads)
        assert tx.published == len(payloads)
    assert observed(got) == [(f"sizes/{i}", p, delivered_qos(broker, qos), False) for i, p in enumerate(payloads)]


async def test_bursts_soon_and_retained_messages(path: str, broker: BrokerHandle) -> None:
    """publish_many and publish_soon at both QoS, and a retained message for a later subscriber,
    as the bridge and the distributor use them."""
    async with subscribed_pair(path, broker, "burst", "burst/#") as (rx, tx):
        messages = rx.messages()
        q0 = [(f"burst/q0/{i}", f"zero {i}".encode()) for i in range(50)]
        q1 = [(f"burst/q1/{i}", f"one {i}".encode()) for i in range(200)]
        assert await tx.publish_many(q0, qos=0) == 50
        assert observed(await take(messages, 50)) == [(t, p, delivered_qos(broker, 0), False) for t, p in q0]
        assert await tx.publish_many(q1, qos=1) == 200
        assert observed(await take(messages, 200)) == [(t, p, 1, False) for t, p in q1]
        soon = [tx.publish_soon(f"burst/soon/{i}", b"s" * i, qos=i % 2) for i in range(20)]
        await asyncio.wait_for(asyncio.gather(*soon), 10)
        expected = [(f"burst/soon/{i}", b"s" * i, delivered_qos(broker, i % 2), False) for i in range(20)]
        assert observed(await take(messages, 20)) == expected
        assert await tx.publish("kept/state", b"retained", qos=1, retain=True)
    async with MqttSession(f"late-{path}", broker.host, broker.port) as late:
        await late.wait_connected(10)
        connected(path, late)
        await late.subscribe("kept/#", qos=1)
        assert observed(await take(late.messages(), 1, 10)) == [("kept/state", b"retained", 1, True)]


async def test_a_lone_qos0_message_is_written_at_once_and_a_queued_one_keeps_its_place(
    path: str, mosquitto: Mosquitto
) -> None:
    """The fast path writes a QoS 0 message with nothing queued ahead straight to the socket (its
    wait is over before the loop runs again); a message larger than the socket takes at once is
    finished by paho's writer, and the ones after it wait their turn behind it, on either path."""
    handle = BrokerHandle("mosquitto", "127.0.0.1", mosquitto.port)
    big = os.urandom(8 << 20)  # more than a loopback socket's send buffer
    async with subscribed_pair(path, handle, "lone", "lone/#") as (rx, tx):
        lone = tx.publish_soon("lone/a", b"first", qos=0)
        assert lone.done() is (path == "fast")
        large = tx.publish_soon("lone/b", big, qos=0)
        behind = [tx.publish_soon(f"lone/c{i}", b"after %d" % i, qos=i % 2) for i in range(3)]
        assert not behind[0].done()  # not written ahead of the rest of the large one
        await asyncio.wait_for(asyncio.gather(lone, large, *behind), 30)
        got = await take(rx.messages(), 5)
    expected = [("lone/a", b"first", 0, False), ("lone/b", big, 0, False)]
    expected += [(f"lone/c{i}", b"after %d" % i, i % 2, False) for i in range(3)]
    assert observed(got) == expected


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_away_persistent_session_gets_what_was_published_meanwhile(
    path: str, mosquitto: Mosquitto, protocol: MqttVersion
) -> None:
    """Redelivery from the broker: QoS 1 messages published while a persistent session is away
    reach it, in order, when it returns; its subscriptions were kept for it. On Mosquitto in both
    MQTT versions: amqtt does not keep a session's queue across reconnects."""
    broker = BrokerHandle("mosquitto", "127.0.0.1", mosquitto.port)
    options: dict[str, Any] = {"persistent": True, "protocol": protocol}
    async with MqttSession(f"away-{path}", broker.host, broker.port, **options) as rx:
        await rx.wait_connected(10)
        connected(path, rx)
        await rx.subscribe("away/#", qos=1)
        await asyncio.sleep(0.2)
    sent = [(f"away/{i}", os.urandom(i * 997)) for i in range(30)]
    async with MqttSession(f"away-tx-{path}", broker.host, broker.port) as tx:
        await tx.wait_connected(10)
        assert await tx.publish_many(sent, qos=1) == 30
    back = MqttSession(f"away-{path}", broker.host, broker.port, **options)
    async with back:  # no subscribe: the broker kept it
        got = await take(back.messages(), 30)
        # The queued messages may all arrive before the session has reported itself connected.
        await back.wait_connected(10)
        connected(path, back)
    assert observed(got) == [(t, p, 1, False) for t, p in sent]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_held_acknowledgements_are_redelivered_to_the_next_session(
    path: str, mosquitto: Mosquitto, protocol: MqttVersion
) -> None:
    """hold_acks: what arrives afterwards is neither acknowledged nor delivered, so the broker
    hands it to the session's next connection; what arrived before stays in the inbox."""
    broker = BrokerHandle("mosquitto", "127.0.0.1", mosquitto.port)
    options: dict[str, Any] = {"persistent": True, "protocol": protocol}
    client_id = f"hold-{path}"
    async with (
        MqttSession(client_id, broker.host, broker.port, **options) as rx,
        MqttSession(f"hold-tx-{path}", broker.host, broker.port) as tx,
    ):
        await rx.wait_connected(10)
        await tx.wait_connected(10)
        connected(path, rx, tx)
        await rx.subscribe("hold/#", qos=1)
        await asyncio.sleep(0.2)
        assert await tx.publish("hold/before", b"taken", qos=1)
        assert await until(lambda: rx._inbox.qsize() == 1, 10)
        rx.hold_acks()
        held = [(f"hold/after/{i}", f"held {i}".encode()) for i in range(10)]
        assert await tx.publish_many(held, qos=1) == 10
        assert await until(lambda: rx.meter.get("messages_held_back_total") == 10, 10)
        assert observed(rx.drain_inbox()) == [("hold/before", b"taken", 1, False)]
    again = MqttSession(client_id, broker.host, broker.port, **options)
    async with again:
        got = await take(again.messages(), 10)
        # A persistent session's queued messages can arrive before the session has restored
        # its subscriptions and birth, i.e. before it reports itself connected.
        await again.wait_connected(10)
        connected(path, again)
    assert observed(got) == [(t, p, 1, False) for t, p in held]


async def test_a_link_dropped_mid_publish_fails_or_delivers_each_message(path: str, mosquitto: Mosquitto) -> None:
    """The broker is killed while a burst of QoS 1 publishes is in flight: each one either
    completes or raises NotConnected promptly (the fast path and aiomqtt's publish alike, not
    after the client's 10 s timeout); the session reconnects to the restarted broker and
    publishes again, and QoS 0 while down is dropped and counted."""
    payload = os.urandom(256 * 1024)  # large enough that the burst is still in flight at the kill
    async with MqttSession(f"drop-{path}", "127.0.0.1", mosquitto.port, reconnect_max_s=0.5) as tx:
        await tx.wait_connected(10)
        connected(path, tx)

        async def one(i: int) -> bool | NotConnected:
            try:
                return await tx.publish(f"drop/{i}", payload, qos=1, timeout=0.5)
            except NotConnected as exc:
                return exc

        assert mosquitto.proc is not None
        # Stopped first, so the burst is surely in flight (unacknowledged) when the broker dies,
        # however fast the path moves it: a link this fast sends 50 MiB before a timer fires.
        mosquitto.proc.send_signal(signal.SIGSTOP)
        burst = [asyncio.ensure_future(one(i)) for i in range(200)]
        await asyncio.sleep(0.2)
        mosquitto.proc.send_signal(signal.SIGKILL)
        outcomes = await asyncio.wait_for(asyncio.gather(*burst), 5)
        assert all(o is True or isinstance(o, NotConnected) for o in outcomes)
        assert any(isinstance(o, NotConnected) for o in outcomes), "no publish was in flight at the kill"
        mosquitto.proc.wait()
        assert await until(lambda: not tx.connected, 5)
        assert await tx.publish("drop/lost", b"x", qos=0) is False
        assert tx.meter.get("publish_dropped_total") == 1
        with pytest.raises(NotConnected):
            await tx.publish("drop/late", b"x", qos=1, timeout=0.3)
        with pytest.raises(NotConnected):
            tx.publish_soon("drop/late", b"x")
        await asyncio.to_thread(mosquitto.start)  # same port
        await tx.wait_connected(15)
        connected(path, tx)
        assert await tx.publish("drop/back", b"again", qos=1, timeout=10)
        assert tx.connects == 2


async def test_the_fast_path_stays_off_outside_the_tested_releases(
    path: str, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A paho-mqtt or aiomqtt release the patches were not tested on gets the plain path and one
    log line saying why, however often the session reconnects."""
    monkeypatch.setitem(mqtt_fastpath.TESTED_VERSIONS, "aiomqtt", ((0, 1), (0, 2)))
    mqtt_fastpath._version_refusal.cache_clear()
    monkeypatch.setattr(mqtt_fastpath, "_logged", set())
    caplog.set_level(logging.INFO, logger=mqtt_fastpath.__name__)
    try:
        async with MqttSession(f"untested-{path}", "127.0.0.1", mosquitto.port) as session:
            await session.wait_connected(10)
            assert session.fast_path is False
            assert await session.publish("untested/x", b"y", qos=1)
    finally:
        mqtt_fastpath._version_refusal.cache_clear()
    lines = [r.getMessage() for r in caplog.records if r.name == mqtt_fastpath.__name__]
    expected = "the tested 0.1 to <0.2" if path == "fast" else "EDGEWIRE_MQTT_FASTPATH=0"
    assert len(lines) == 1 and expected in lines[0], lines
