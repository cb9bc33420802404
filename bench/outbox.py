"""Durable outbox throughput: enqueues per second and replay rate to Mosquitto, in one run.

enqueue: escalation-sized messages (8 KiB) appended with group commit (one fsync per batch)
         to a WAL SQLite file on disk, against the same appends to an in-memory database
         with no durability.
replay:  the device's Forwarder sends everything queued to a real Mosquitto at QoS 1, a window
         of messages in flight, marking each sent as its acknowledgement arrives (the messages
         are escalations owed an answer, as on a device). Its pace limit is lifted here to
         measure what it can do; devices pace replay with cloud.outbox.replay_per_s.

The last line is one JSON object.   python bench/outbox.py [--messages 20000] [--batch 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edgewire.aio import cancel_and_wait
from edgewire.config import OutboxSettings
from edgewire.edge.forwarder import Forwarder
from edgewire.edge.outbox import Outbox, OutboxEntry
from edgewire.ports import free_port, wait_port
from edgewire.session import MqttSession


def enqueue_rate(box: Outbox, n: int, batch: int, payload: bytes) -> float:
    t0 = time.perf_counter()
    deadline = time.time() + 3600
    for start in range(0, n, batch):
        box.put_many(
            OutboxEntry(
                topic=f"req/bench/t{start + k}", payload=payload, deadline=deadline, key=f"t{start + k}", note=b"n"
            )
            for k in range(min(batch, n - start))
        )
    return n / (time.perf_counter() - t0)


async def replay_rate(box: Outbox, port: int, window: int) -> float:
    async with MqttSession("bench-outbox", "127.0.0.1", port, max_inflight=window) as session:
        await session.wait_connected(10)
        total = len(box)
        with ThreadPoolExecutor(1) as io:
            settings = OutboxSettings(replay_per_s=1e9)

            async def nothing(_: object) -> None:
                return None

            forwarder = Forwarder(box, session, settings, box.meter, on_expired=nothing, io=io, window=window)
            t0 = time.perf_counter()
            task = asyncio.create_task(forwarder.run())
            while not await forwarder.wait_empty(60):
                pass
            elapsed = time.perf_counter() - t0
            await cancel_and_wait(task)
        assert forwarder.forwarded == total, (forwarder.forwarded, total)
        return total / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=64, help="messages per group commit")
    parser.add_argument("--window", type=int, default=256, help="QoS 1 messages in flight during replay")
    parser.add_argument("--size", type=int, default=8192, help="payload bytes")
    args = parser.parse_args()
    payload = b"j" * args.size
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        durable = Outbox(work / "outbox.db", max_count=10**7, max_bytes=1 << 40)
        memory = Outbox(":memory:", durable=False, max_count=10**7, max_bytes=1 << 40)
        enqueue_rate(durable, 1000, args.batch, payload)  # warm up, then start from empty
        durable.settle_many((i.topic.rsplit("/", 1)[1], "answered") for i in durable.peek(10**6))
        durable_rate = enqueue_rate(durable, args.messages, args.batch, payload)
        memory_rate = enqueue_rate(memory, args.messages, args.batch, payload)
        single = Outbox(work / "single.db")
        single_rate = enqueue_rate(single, min(args.messages, 2000), 1, payload)
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        port = free_port()
        conf = work / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n")
        broker = subprocess.Popen([exe, "-c", str(conf)], stderr=subprocess.DEVNULL)
        try:
            wait_port(port)
            replay = asyncio.run(replay_rate(durable, port, args.window))
        finally:
            broker.terminate()
            broker.wait(10)
    print(
        json.dumps(
            {
                "enqueue_per_s": round(durable_rate, 1),
                "memory_enqueue_per_s": round(memory_rate, 1),
                "durable_vs_memory_ratio": round(durable_rate / memory_rate, 3),
                "enqueue_per_s_commit_each": round(single_rate, 1),
                "replay_per_s": round(replay, 1),
                "messages": args.messages,
                "batch": args.batch,
                "payload_bytes": args.size,
                "targets": {"enqueue_per_s": 5000, "replay_per_s": 2000},
            }
        )
    )


if __name__ == "__main__":
    main()
