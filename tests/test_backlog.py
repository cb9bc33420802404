"""The frames between the source and the micro-batches: bounded, in order, and ending cleanly."""

from __future__ import annotations

import asyncio

from edgewire.edge.backlog import Backlog
from edgewire.edge.sources import Frame


def frames(*seqs: int) -> list[Frame]:
    return [Frame(seq=s, ref=f"f{s}", ts=0.0, data=b"x") for s in seqs]


async def test_batches_come_out_in_order_and_at_most_the_size_asked() -> None:
    backlog = Backlog(8)
    await backlog.put(frames(0, 1, 2))
    await backlog.put(frames(3, 4))
    assert len(backlog) == 5
    assert [f.seq for f in await backlog.take(4)] == [0, 1, 2, 3]
    assert [f.seq for f in await backlog.take(4)] == [4]
    assert len(backlog) == 0


async def test_a_chunk_waits_until_it_fits_under_the_limit() -> None:
    backlog = Backlog(4)
    await backlog.put(frames(0, 1, 2))
    blocked = asyncio.create_task(backlog.put(frames(3, 4)))
    await asyncio.sleep(0.01)
    assert not blocked.done() and len(backlog) == 3
    assert [f.seq for f in await backlog.take(2)] == [0, 1]
    await asyncio.wait_for(blocked, 1)
    assert [f.seq for f in await backlog.take(8)] == [2, 3, 4]


async def test_a_chunk_larger_than_the_limit_goes_in_once_the_backlog_is_empty() -> None:
    backlog = Backlog(2)
    await asyncio.wait_for(backlog.put(frames(0, 1, 2)), 1)
    assert len(backlog) == 3


async def test_take_waits_for_frames_and_gets_an_empty_batch_once_closed_and_drained() -> None:
    backlog = Backlog(4)
    taker = asyncio.create_task(backlog.take(4))
    await asyncio.sleep(0.01)
    assert not taker.done()
    await backlog.put(frames(7))
    assert [f.seq for f in await asyncio.wait_for(taker, 1)] == [7]
    await backlog.put(frames(8))
    backlog.close()
    assert [f.seq for f in await backlog.take(4)] == [8]
    assert await asyncio.wait_for(backlog.take(4), 1) == []


async def test_closing_wakes_a_waiting_taker() -> None:
    backlog = Backlog(4)
    taker = asyncio.create_task(backlog.take(4))
    await asyncio.sleep(0.01)
    backlog.close()
    assert await asyncio.wait_for(taker, 1) == []


async def test_take_now_never_waits_and_arrival_returns_on_frames_or_close() -> None:
    backlog = Backlog(8)
    assert backlog.take_now(4) == [] and not backlog.drained
    waiter = asyncio.create_task(backlog.arrival())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await backlog.put(frames(0, 1, 2))
    await asyncio.wait_for(waiter, 1)
    await asyncio.wait_for(backlog.arrival(), 1)  # frames wait: at once
    assert [f.seq for f in backlog.take_now(2)] == [0, 1]
    assert [f.seq for f in backlog.take_now(2)] == [2]
    waiter = asyncio.create_task(backlog.arrival())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    backlog.close()
    await asyncio.wait_for(waiter, 1)
    assert backlog.drained


async def test_take_now_makes_room_for_a_waiting_chunk() -> None:
    backlog = Backlog(4)
    await backlog.put(frames(0, 1, 2, 3))
    blocked = asyncio.create_task(backlog.put(frames(4, 5)))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    assert [f.seq for f in backlog.take_now(2)] == [0, 1]
    await asyncio.wait_for(blocked, 1)
    assert [f.seq for f in backlog.take_now(8)] == [2, 3, 4, 5]
