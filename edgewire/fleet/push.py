"""Sending a model version to the fleet: the retained announce, then its chunks over QoS 1.

The device and the distributor read what is sent here through the shared contract in
:mod:`edgewire.delivery`; this module is only the operator's sending side.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path

from edgewire import envelopes as env
from edgewire import topics
from edgewire.aio import cancel_and_wait
from edgewire.delivery import DeliveryError, iter_chunks, read_chunk
from edgewire.session import MqttSession

ProgressFn = Callable[[int, int], None]


async def announce(session: MqttSession, manifest: env.Manifest, *, timeout: float = 30.0) -> None:
    """Make ``manifest`` the retained current version, so devices that connect later see it too."""
    topic = topics.MODEL_ANNOUNCE.build(model=manifest.name)
    await session.publish(topic, env.encode(manifest), qos=topics.MODEL_ANNOUNCE.qos, retain=True, timeout=timeout)


async def withdraw(session: MqttSession, name: str, *, timeout: float = 30.0) -> None:
    """Clear the retained announce (an empty retained payload deletes it at the broker)."""
    topic = topics.MODEL_ANNOUNCE.build(model=name)
    await session.publish(topic, b"", qos=topics.MODEL_ANNOUNCE.qos, retain=True, timeout=timeout)


async def publish_chunks(
    session: MqttSession,
    path: str | Path,
    manifest: env.Manifest,
    *,
    progress: ProgressFn | None = None,
    window: int = 16,
    timeout: float = 30.0,
    indices: Iterable[int] | None = None,
) -> int:
    """Publish chunks (all, or ``indices``) at QoS 1 with at most ``window`` unacknowledged.

    A window rather than one-at-a-time keeps the link busy across the broker round trip; a bound
    keeps a large artefact from queueing thousands of messages in the client at once.
    """
    if window < 1:
        raise DeliveryError("window must be at least 1")
    wanted = None if indices is None else sorted(set(indices))
    total = manifest.chunk_count if wanted is None else len(wanted)
    done = 0
    if progress is not None:
        progress(0, total)

    async def send(item: tuple[str, bytes]) -> None:
        nonlocal done
        await session.publish(item[0], item[1], qos=topics.MODEL_CHUNK.qos, timeout=timeout)
        done += 1
        if progress is not None:
            progress(done, total)

    source = iter_chunks(path, manifest) if wanted is None else (read_chunk(path, manifest, i) for i in wanted)

    def encoded() -> tuple[str, bytes] | None:
        chunk = next(source, None)
        if chunk is None:
            return None
        topic = topics.MODEL_CHUNK.build(model=chunk.name, version=chunk.version, index=chunk.index)
        return topic, env.encode(chunk)

    # Reading, hashing and encoding the next chunk runs on a thread (all three release the GIL)
    # while the event loop sends the ones before it, so the two overlap.
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chunks") as reader:

        async def chunks() -> AsyncIterator[tuple[str, bytes]]:
            ahead = loop.run_in_executor(reader, encoded)
            while (item := await ahead) is not None:
                ahead = loop.run_in_executor(reader, encoded)
                yield item

        await _send_windowed(chunks(), send, window)
    return done


async def _send_windowed(
    items: AsyncIterator[tuple[str, bytes]], send: Callable[[tuple[str, bytes]], Awaitable[None]], window: int
) -> None:
    in_flight: set[asyncio.Task[None]] = set()
    try:
        async for chunk in items:
            if len(in_flight) >= window:
                finished, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    task.result()  # the first failed publish ends the push
            in_flight.add(asyncio.create_task(send(chunk)))
        if in_flight:
            finished, in_flight = await asyncio.wait(in_flight)
            for task in finished:
                task.result()
    finally:
        await cancel_and_wait(*in_flight)


async def push(
    session: MqttSession,
    path: str | Path,
    manifest: env.Manifest,
    *,
    progress: ProgressFn | None = None,
    window: int = 16,
) -> int:
    """Announce first, then every chunk: a device must know the manifest (size, chunk size, hash)
    before a chunk is of any use to it, and the distributor stores chunks only for known versions."""
    await announce(session, manifest)
    return await publish_chunks(session, path, manifest, progress=progress, window=window)
