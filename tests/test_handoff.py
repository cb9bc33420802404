"""Work run on a thread pool and settled back on the event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from edgewire.edge.handoff import Workers, run_on


async def test_result_comes_back_from_a_worker_thread() -> None:
    with ThreadPoolExecutor(2, thread_name_prefix="work") as pool:
        futures = [run_on(pool, lambda x: (x * 2, threading.current_thread().name), i) for i in range(8)]
        results = await asyncio.wait_for(asyncio.gather(*futures), 5)
    assert [value for value, _ in results] == [i * 2 for i in range(8)]
    assert all(name.startswith("work") for _, name in results)


async def test_exception_is_raised_where_the_future_is_awaited() -> None:
    def fail() -> None:
        raise ValueError("bad batch")

    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(ValueError, match="bad batch"):
            await asyncio.wait_for(run_on(pool, fail), 5)


async def test_a_cancelled_future_is_left_alone_when_the_work_ends() -> None:
    release = threading.Event()
    done = threading.Event()

    def slow() -> int:
        release.wait(5)
        done.set()
        return 1

    with ThreadPoolExecutor(1) as pool:
        future = run_on(pool, slow)
        future.cancel()
        release.set()
        assert await asyncio.to_thread(done.wait, 5)
        await asyncio.sleep(0.05)  # the settle callback runs, and must not raise InvalidStateError
    assert future.cancelled()


def hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)


async def test_results_finished_before_the_loop_wakes_are_settled_together_and_in_full() -> None:
    """Workers that finish while the loop is busy ride on one wake-up; none is lost."""
    gate = threading.Barrier(5)

    def work(i: int) -> int:
        gate.wait(5)
        return i

    with ThreadPoolExecutor(4) as pool:
        futures = [run_on(pool, work, i) for i in range(4)]
        # The loop stays busy until all four are done, so they settle in one pass.
        await asyncio.to_thread(gate.wait, 5)
        hold_the_loop(0.2)
        assert await asyncio.wait_for(asyncio.gather(*futures), 5) == [0, 1, 2, 3]
        more = [run_on(pool, lambda i=i: i * 10) for i in range(20)]
        assert await asyncio.wait_for(asyncio.gather(*more), 5) == [i * 10 for i in range(20)]


async def test_together_a_result_waits_for_the_next_in_flight_and_never_when_alone() -> None:
    release = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        alone = run_on(pool, lambda: "alone", together=2)
        assert await asyncio.wait_for(alone, 5) == "alone"
        slow = run_on(pool, lambda: release.wait(5) and "slow", together=2)
        quick = run_on(pool, lambda: "quick", together=2)
        await asyncio.sleep(0.2)
        assert not quick.done()  # finished on its worker, settled with the next result
        release.set()
        assert await asyncio.wait_for(asyncio.gather(slow, quick), 5) == ["slow", "quick"]


async def test_workers_run_handed_work_on_their_own_threads_and_settle_it() -> None:
    pool = Workers(2, "lean")
    try:
        futures = [run_on(pool, lambda x: (x + 1, threading.current_thread().name), i) for i in range(10)]
        results = await asyncio.wait_for(asyncio.gather(*futures), 5)
    finally:
        pool.shutdown()
    assert [value for value, _ in results] == list(range(1, 11))
    assert {name for _, name in results} <= {"lean_0", "lean_1"}


async def test_workers_hand_exceptions_to_the_loop_and_keep_serving() -> None:
    def fail() -> None:
        raise ValueError("bad batch")

    pool = Workers(1, "lean")
    try:
        with pytest.raises(ValueError, match="bad batch"):
            await asyncio.wait_for(run_on(pool, fail), 5)
        assert await asyncio.wait_for(run_on(pool, lambda: "next"), 5) == "next"
    finally:
        pool.shutdown()


def test_workers_finish_the_queued_work_before_shutting_down_and_take_none_after() -> None:
    done: list[int] = []
    gate = threading.Event()
    pool = Workers(1, "lean")
    pool.submit(lambda: gate.wait(5))
    for i in range(5):
        pool.submit(lambda i=i: done.append(i))
    pool.submit(lambda: 1 / 0)  # logged; the thread goes on to the next
    pool.submit(lambda: done.append(5))
    gate.set()
    pool.shutdown(wait=True)
    assert done == [0, 1, 2, 3, 4, 5]
    assert not any(t.name.startswith("lean_") and t.is_alive() for t in threading.enumerate())
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)


def test_workers_start_no_thread_until_given_work() -> None:
    before = {t.name for t in threading.enumerate()}
    pool = Workers(2, "idle-pool")
    pool.shutdown()
    assert not any(t.name.startswith("idle-pool") for t in threading.enumerate() if t.name not in before)


async def test_together_n_results_wait_until_n_are_ready_or_nothing_else_is_in_flight() -> None:
    first, second = threading.Event(), threading.Event()
    with ThreadPoolExecutor(3) as pool:
        slow = run_on(pool, lambda: first.wait(5) and "slow", together=3)
        slower = run_on(pool, lambda: second.wait(5) and "slower", together=3)
        quick = run_on(pool, lambda: "quick", together=3)
        await asyncio.sleep(0.2)
        assert not quick.done()  # one of three ready
        first.set()
        await asyncio.sleep(0.2)
        assert not slow.done() and not quick.done()  # two of three ready, one still in flight
        second.set()
        assert await asyncio.wait_for(asyncio.gather(slow, slower, quick), 5) == ["slow", "slower", "quick"]
