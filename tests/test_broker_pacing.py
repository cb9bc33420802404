"""The embedded broker reads a device's connection no faster than its budget (edgewire.broker.pacing):
a flooding device is slowed by TCP, loses nothing, and delays no one else; the fleet's own
services are not paced."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import aiomqtt
import pytest
from amqtt.adapters import BufferReader

from edgewire import topics
from edgewire.broker import mosquitto_plugin
from edgewire.broker.embedded import BrokerAuth, EmbeddedBroker
from edgewire.broker.pacing import DevicePacing, PacedReader, ReadBudget
from edgewire.ports import free_port
from edgewire.ratelimit import TokenBucket

from .conftest import Mosquitto, MosquittoFiles, until
from .test_identity import Fleet, refused, rendered_broker_files


def mqtt_packet(kind: int, body: bytes) -> bytes:
    """One MQTT packet: type byte, variable-length remaining length, body."""
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return bytes([kind << 4]) + bytes(encoded) + body


async def bridge_answers(bridge: aiomqtt.Client, device: aiomqtt.Client, device_id: str, count: int) -> None:
    """The bridge publishes ``count`` results to the device, which reads them all."""
    await device.subscribe(topics.RESULT.build(device_id=device_id), qos=0)
    for i in range(count):
        await bridge.publish(topics.RESULT.build(device_id=device_id), f"{i}".encode(), qos=0)
    got = 0
    async for _ in device.messages:
        got += 1
        if got == count:
            return


async def test_each_packet_is_paid_for_once_however_it_is_read() -> None:
    bodies = [b"", b"x" * 5, b"y" * 127, b"z" * 128, b"w" * 20_000, b"", b"v" * 3]
    stream = b"".join(mqtt_packet(3, body) for body in bodies) + mqtt_packet(12, b"")
    paid: list[float] = []

    class CountingBucket(TokenBucket):
        def pace(self, amount: float, now: float) -> float:
            paid.append(amount)
            return 0.0

    reader = PacedReader(BufferReader(stream), CountingBucket.full(1.0, 1.0, 0.0), clock=lambda: 0.0)
    # Read in odd sizes, some within a packet, some across several.
    got = bytearray()
    sizes = [1, 1, 2, 7, 1, 1, 1, 300, 5, 19_000, 1, 1, 4096]
    for i in range(10_000):
        if len(got) == len(stream):
            break
        got += await reader.read(min(sizes[i % len(sizes)], len(stream) - len(got)))
    await reader.read(1)  # the next read pays for what was read before it
    assert bytes(got) == stream
    assert sum(paid) == len(bodies) + 1  # one per packet, none per read within a packet


def test_a_device_past_its_budget_waits_and_only_devices_are_paced() -> None:
    bucket = TokenBucket.full(10.0, 2.0, 0.0)
    pacing = DevicePacing(ReadBudget(10.0, 2), roles={"bridge-1": "bridge"})
    assert pacing.reader(BufferReader(b""), "bridge-1").__class__ is BufferReader  # the fleet's services
    assert pacing.reader(BufferReader(b""), None).__class__ is BufferReader  # anonymous: no role known
    assert isinstance(pacing.reader(BufferReader(b""), "cam-a"), PacedReader)
    # A burst of 2 at once, then one packet per 0.1 s: the wait is the debt over the rate.
    assert [bucket.pace(1, 0.0) for _ in range(3)] == [0.0, 0.0, 0.1]
    assert abs(bucket.pace(1, 0.05) - 0.15) < 1e-9  # 0.5 paid back, 1.5 owed
    assert bucket.pace(1, 0.3) == 0.0  # 2.5 more paid back: even


async def test_a_flooding_device_is_read_at_its_budget_and_delays_no_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out, passwords = rendered_broker_files(tmp_path)
    port = free_port()
    rate, burst, flood = 40.0, 10, 130
    auth = BrokerAuth(out / "passwd", out / "roles.yaml")
    async with EmbeddedBroker("127.0.0.1", port, auth=auth, read_budget=ReadBudget(rate, burst)):
        fleet = Fleet("127.0.0.1", port, "amqtt", passwords)
        arrivals: list[tuple[str, float]] = []
        async with fleet.client("bridge-1") as bridge, fleet.client("cam-a") as a, fleet.client("cam-b") as b:
            await bridge.subscribe(topics.REQUEST.filter(), qos=0)

            async def read(expected: int) -> None:
                async for message in bridge.messages:
                    arrivals.append(((topics.REQUEST.match(str(message.topic)) or {})["device_id"], time.monotonic()))
                    if len(arrivals) == expected:
                        return

            reading = asyncio.create_task(read(flood + 10))
            for i in range(flood):
                await a.publish(topics.REQUEST.build(device_id="cam-a", trace_id=f"a{i}"), b"a", qos=0)
            await asyncio.sleep(0.5)  # cam-a's flood is now waiting in TCP buffers
            for i in range(10):
                await b.publish(topics.REQUEST.build(device_id="cam-b", trace_id=f"b{i}"), b"b", qos=0)
            await asyncio.wait_for(reading, timeout=60)  # nothing is lost

            from_a = [t for who, t in arrivals if who == "cam-a"]
            from_b = [t for who, t in arrivals if who == "cam-b"]
            assert (len(from_a), len(from_b)) == (flood, 10)
            # cam-a is read no faster than its budget: past its burst, one packet per 1/rate s.
            assert from_a[-1] - from_a[0] >= (flood - burst - 1) / rate * 0.9
            # cam-b is not queued behind cam-a's flood.
            assert max(from_b) < from_a[-1]
            # It is said, once (a minute), and counted.
            said = [r.getMessage() for r in caplog.records if r.name == "edgewire.broker.pacing"]
            assert len(said) == 1 and said[0].startswith("embedded broker: cam-a sends past its budget"), said

            # The fleet's own services are not paced: the bridge answers as fast as it likes.
            t0 = time.monotonic()
            await bridge_answers(bridge, a, "cam-a", flood)
            assert time.monotonic() - t0 < (flood - burst - 1) / rate * 0.9


@pytest.fixture(scope="session")
def flood_limit_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return mosquitto_plugin.build(tmp_path_factory.mktemp("plugin"))
    except mosquitto_plugin.PluginBuildError as exc:
        pytest.skip(str(exc))


def test_flash_renders_the_flood_limit_with_the_fleets_services(tmp_path: Path) -> None:
    out, _ = rendered_broker_files(tmp_path)
    lines = (out / "mosquitto-flood-limit.conf").read_text().splitlines()
    assert f"plugin {mosquitto_plugin.INSTALL_PATH}" in lines
    assert "plugin_opt_services alice bridge-1 distributor-1 operator" in lines  # no device


async def test_mosquitto_disconnects_a_flooding_device_and_refuses_it_for_a_cool_off(
    tmp_path: Path, flood_limit_plugin: Path
) -> None:
    out, passwords = rendered_broker_files(tmp_path)
    services = ["bridge-1", "distributor-1", "operator", "alice"]
    rate, burst, cool_off, flood = 40.0, 10, 6.0, 100
    extra = mosquitto_plugin.conf_lines(services, plugin=str(flood_limit_plugin), rate=rate, burst=burst)
    extra += f"plugin_opt_cool_off {cool_off}\n"
    m = Mosquitto(tmp_path, files=MosquittoFiles(out / "passwd", out / "acl", extra=extra))
    await asyncio.to_thread(m.start)
    try:
        fleet = Fleet("127.0.0.1", m.port, "mosquitto", passwords)
        got: list[str] = []  # the trace ids the bridge received
        async with fleet.client("bridge-1") as bridge, fleet.client("cam-b") as b:
            await bridge.subscribe(topics.REQUEST.filter(), qos=1)

            async def read() -> None:
                async for message in bridge.messages:
                    got.append((topics.REQUEST.match(str(message.topic)) or {})["trace_id"])

            reading = asyncio.create_task(read())
            a = fleet.client("cam-a")
            await a.__aenter__()
            t0 = time.monotonic()
            with contextlib.suppress(aiomqtt.MqttError):
                for i in range(flood):
                    await a.publish(topics.REQUEST.build(device_id="cam-a", trace_id=f"a{i}"), b"a", qos=0)
            # The flooding connection is ended ...
            with pytest.raises(aiomqtt.MqttError):
                await asyncio.wait_for(anext(aiter(a.messages)), timeout=30)
            with contextlib.suppress(Exception):
                await a.__aexit__(None, None, None)
            # ... and its logins are refused during the cool-off, its own password or not.
            assert await refused(fleet.client("cam-a")) is not None
            assert time.monotonic() - t0 < cool_off  # (so the refusal above was the cool-off's)
            # The other device is served meanwhile.
            for i in range(10):
                await b.publish(topics.REQUEST.build(device_id="cam-b", trace_id=f"b{i}"), b"b", qos=1)
            await until(lambda: sum(t.startswith("b") for t in got) == 10, timeout=30)
            assert sum(t.startswith("b") for t in got) == 10
            # Of the flood, the burst and what the rate paid for came through, not the rest.
            flooded = sum(t.startswith("a") for t in got)
            assert flooded <= burst + rate * (time.monotonic() - t0) + 1
            assert flooded < flood

            # The fleet's services are not limited: the bridge answers as fast as it likes.
            await bridge_answers(bridge, b, "cam-b", flood)

            # After its cool-off the device logs in again and is heard.
            await asyncio.sleep(max(0.0, t0 + cool_off + 0.5 - time.monotonic()))
            async with fleet.client("cam-a") as again:
                await again.publish(topics.REQUEST.build(device_id="cam-a", trace_id="back"), b"a", qos=1)
            await until(lambda: "back" in got, timeout=30)
            assert "back" in got
            reading.cancel()
    finally:
        await asyncio.to_thread(m.stop)
