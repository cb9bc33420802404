"""Result messages handed over without waiting for each write, against a real broker."""

from __future__ import annotations

import asyncio

import aiomqtt

from edgewire.config import BrokerSettings
from edgewire.edge.write_window import WriteWindow
from edgewire.metrics import Meter
from edgewire.session import MqttSession

from .conftest import BrokerHandle


async def test_every_message_arrives_in_order_and_drain_leaves_none_unwritten(broker: BrokerHandle) -> None:
    received: list[bytes] = []
    ready = asyncio.Event()

    async def read() -> None:
        async with aiomqtt.Client(broker.host, broker.port, identifier="window-reader") as client:
            await client.subscribe("local/window", qos=0)
            ready.set()
            async for message in client.messages:
                received.append(bytes(message.payload))  # type: ignore[arg-type]

    reader = asyncio.create_task(read())
    await asyncio.wait_for(ready.wait(), 10)
    meter = Meter("window-dev")
    session = MqttSession.from_settings("window-dev", BrokerSettings(url=broker.url), host=broker.host, meter=meter)
    try:
        async with session:
            await session.wait_connected(10)
            window = WriteWindow(session, meter, size=2)
            for i in range(200):
                await window.publish("local/window", f"m{i}".encode(), 0)
                assert len(window) <= 2
            await window.drain()
            assert len(window) == 0
            assert session.published == 200
            for _ in range(100):
                if len(received) == 200:
                    break
                await asyncio.sleep(0.05)
    finally:
        reader.cancel()
    assert received == [f"m{i}".encode() for i in range(200)]
    assert meter.total("publish_dropped_total") == 0


async def test_without_a_link_a_qos0_message_is_dropped_and_counted_at_once() -> None:
    meter = Meter("window-off")
    session = MqttSession.from_settings(
        "window-off", BrokerSettings(url="mqtt://127.0.0.1:1"), host="127.0.0.1", meter=meter
    )
    window = WriteWindow(session, meter, size=2)
    await asyncio.wait_for(window.publish("local/window", b"x", 0), 5)
    await window.drain()
    assert meter.total("publish_dropped_total") == 1
    assert session.published == 0
