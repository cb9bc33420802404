"""The local results stream: a paced device's batches leave one by one, a backlog's share
messages, and every row arrives once and in order, against a real broker."""

from __future__ import annotations

import asyncio

import aiomqtt
import msgpack

from edgewire import envelopes as env
from edgewire.config import BrokerSettings
from edgewire.edge.local_results import LocalRows
from edgewire.edge.local_stream import LocalStream
from edgewire.edge.write_window import WriteWindow
from edgewire.metrics import Meter
from edgewire.session import MqttSession

from .conftest import BrokerHandle

TOPIC = "local/stream-dev"


def _rows(start: int, n: int) -> LocalRows:
    results = [
        env.LocalResult(
            trace_id=f"run-{seq}",
            device_id="stream-dev",
            seq=seq,
            source_ref=f"{seq}.jpg",
            ts=0.0,
            state="COMPLETE",
            answered_by="edge",
            prediction=env.Prediction(label="1", class_index=1, confidence=0.9, margin=0.5),
            model="m",
            version="1",
            degraded=False,
            latency_ms=1.0,
        )
        for seq in range(start, start + n)
    ]
    return LocalRows.of(results)


async def _run(broker: BrokerHandle, feed: list[tuple[int, float]], interval_s: float) -> list[list[int]]:
    """Feed batches of (rows, pause after) through a stream; the seqs of each message received."""
    received: list[list[int]] = []
    ready = asyncio.Event()

    async def read() -> None:
        async with aiomqtt.Client(broker.host, broker.port, identifier="stream-reader") as client:
            await client.subscribe(TOPIC, qos=0)
            ready.set()
            async for message in client.messages:
                decoded = env.decode(env.LocalResults, bytes(message.payload))  # type: ignore[arg-type]
                received.append([r.seq for r in decoded.results])

    reader = asyncio.create_task(read())
    await asyncio.wait_for(ready.wait(), 10)
    meter = Meter("stream-dev")
    session = MqttSession.from_settings("stream-dev", BrokerSettings(url=broker.url), host=broker.host, meter=meter)
    total = sum(n for n, _ in feed)
    try:
        async with session:
            await session.wait_connected(10)
            stream = LocalStream(WriteWindow(session, meter, 4), TOPIC, 0, "stream-dev", interval_s)
            seq = 0
            for n, pause in feed:
                await stream.add(_rows(seq, n))
                seq += n
                if pause:
                    await asyncio.sleep(pause)
            await stream.drain()
            assert len(stream) == 0
            for _ in range(200):
                if sum(len(m) for m in received) >= total:
                    break
                await asyncio.sleep(0.05)
    finally:
        reader.cancel()
    assert [s for m in received for s in m] == list(range(total))  # every row once, in order
    return received


async def test_batches_further_apart_than_the_interval_leave_one_by_one(broker: BrokerHandle) -> None:
    received = await _run(broker, [(4, 0.15)] * 5, interval_s=0.05)
    assert [len(m) for m in received] == [4] * 5


async def test_a_burst_shares_messages_and_the_rest_leaves_on_drain(broker: BrokerHandle) -> None:
    # 100 batches with no pause at all: the first goes at once, the rest wait for the interval
    # (far longer than the burst) or for the row bound, never one message per batch.
    received = await _run(broker, [(16, 0.0)] * 100, interval_s=5.0)
    assert len(received) < 100 / 4
    assert received[0] == list(range(16))
    assert max(len(m) for m in received) <= 256 + 16


async def test_zero_interval_sends_every_batch(broker: BrokerHandle) -> None:
    received = await _run(broker, [(3, 0.0)] * 10, interval_s=0.0)
    assert [len(m) for m in received] == [3] * 10


def test_rows_pack_as_the_envelope_does() -> None:
    rows = _rows(0, 3)
    packed = msgpack.unpackb(rows.encode("stream-dev"))
    assert packed["results"] == rows.dicts()
