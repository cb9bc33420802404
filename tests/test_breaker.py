"""Circuit breakers, driven by a fake clock so that open_s passes instantly."""

from __future__ import annotations

import logging

import pytest

from edgewire.cloud_bridge.breaker import BreakerBoard, CircuitBreaker, State


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def breaker(clock: FakeClock, **kw: object) -> tuple[CircuitBreaker, list[tuple[State, State]]]:
    changes: list[tuple[State, State]] = []
    settings: dict[str, object] = {"window": 10, "min_calls": 4, "error_rate": 0.5, "open_s": 5.0, **kw}
    cb = CircuitBreaker(clock=clock, on_change=lambda old, new: changes.append((old, new)), **settings)  # type: ignore[arg-type]
    return cb, changes


def calls(cb: CircuitBreaker, *outcomes: bool, latency_ms: float = 10.0) -> None:
    for ok in outcomes:
        assert cb.allow()
        cb.record(ok, latency_ms)


def trip(cb: CircuitBreaker, clock: FakeClock) -> None:
    calls(cb, False, False, False, False)
    assert cb.state == "open"


def test_starts_closed_and_lets_calls_through(clock: FakeClock) -> None:
    cb, changes = breaker(clock)
    assert cb.state == "closed" and cb.allow()
    calls(cb, *[True] * 50)
    assert cb.state == "closed" and changes == []


def test_opens_when_the_failure_share_reaches_the_rate(clock: FakeClock) -> None:
    cb, changes = breaker(clock)
    calls(cb, True, False, True)
    assert cb.state == "closed"  # under min_calls
    calls(cb, False)  # 2 of 4 failed = 0.5
    assert cb.state == "open" and changes == [("closed", "open")]
    assert not cb.allow() and not cb.allow()


def test_stays_closed_below_min_calls(clock: FakeClock) -> None:
    cb, _ = breaker(clock, min_calls=5)
    calls(cb, False, False, False, False)  # 100% failures, but only 4 calls
    assert cb.state == "closed" and cb.allow()
    calls(cb, False)
    assert cb.state == "open"


def test_stays_closed_below_the_error_rate(clock: FakeClock) -> None:
    cb, _ = breaker(clock)
    calls(cb, True, True, False, True, True, False, True, True, True, False)  # 3 of 10
    assert cb.state == "closed"


def test_opens_on_slowness(clock: FakeClock) -> None:
    cb, changes = breaker(clock, slow_call_ms=200.0, slow_rate=0.75)
    calls(cb, True, True, latency_ms=500.0)
    calls(cb, True, latency_ms=50.0)
    assert cb.state == "closed"
    calls(cb, True, latency_ms=201.0)  # 3 of 4 slow, though every call succeeded
    assert cb.state == "open" and changes == [("closed", "open")]
    assert cb.snapshot()["slow"] == 3 and cb.snapshot()["failures"] == 0


def test_a_call_exactly_at_the_slow_threshold_is_not_slow(clock: FakeClock) -> None:
    cb, _ = breaker(clock, slow_call_ms=200.0, slow_rate=0.5)
    calls(cb, True, True, True, True, latency_ms=200.0)
    assert cb.state == "closed" and cb.snapshot()["slow"] == 0


def test_turns_half_open_after_open_s_and_lets_one_probe_through(clock: FakeClock) -> None:
    cb, changes = breaker(clock)
    trip(cb, clock)
    clock.advance(4.9)
    assert cb.state == "open" and not cb.allow()
    clock.advance(0.1)
    assert cb.state == "half_open" and changes[-1] == ("open", "half_open")
    assert cb.allow()  # the probe
    assert not cb.allow() and not cb.allow()  # nothing else while it is out
    assert cb.snapshot()["probing"] is True


def test_probe_success_closes_with_a_clean_window(clock: FakeClock) -> None:
    cb, changes = breaker(clock)
    trip(cb, clock)
    clock.advance(5)
    assert cb.allow()
    cb.record(True, 20.0)
    assert cb.state == "closed" and changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    snap = cb.snapshot()
    assert (snap["calls"], snap["failures"], snap["opened_at"]) == (0, 0, None)
    # The old failures are gone: a fresh run of min_calls is needed to trip it again.
    calls(cb, False, False, False)
    assert cb.state == "closed"
    calls(cb, False)
    assert cb.state == "open"


def test_probe_failure_opens_again_and_restarts_the_timer(clock: FakeClock) -> None:
    cb, changes = breaker(clock)
    trip(cb, clock)
    clock.advance(5)
    assert cb.allow()
    clock.advance(1)
    cb.record(False, 20.0)
    assert cb.state == "open" and changes[-1] == ("half_open", "open")
    assert cb.snapshot()["opened_at"] == clock.now
    clock.advance(4.9)
    assert cb.state == "open" and not cb.allow()
    clock.advance(0.1)
    assert cb.state == "half_open" and cb.allow()


def test_slow_probe_still_counts_as_a_success(clock: FakeClock) -> None:
    """One slow answer proves the server is back; slowness is judged over a window, once closed."""
    cb, _ = breaker(clock, slow_call_ms=100.0)
    trip(cb, clock)
    clock.advance(5)
    assert cb.allow()
    cb.record(True, 900.0)
    assert cb.state == "closed"


def test_window_rolls_off_old_failures(clock: FakeClock) -> None:
    cb, _ = breaker(clock, window=6, min_calls=5, error_rate=0.5)
    calls(cb, False, False, True, True, True, True)  # 2 of 6
    assert cb.state == "closed"
    calls(cb, True, True)  # the two failures fall out of the 6-call window
    assert cb.snapshot()["calls"] == 6 and cb.snapshot()["failures"] == 0
    calls(cb, False, False)  # 2 of 6: below 0.5
    assert cb.state == "closed"
    calls(cb, False)  # 3 of 6
    assert cb.state == "open"


def test_stragglers_while_open_change_nothing(clock: FakeClock) -> None:
    cb, changes = breaker(clock)
    trip(cb, clock)
    cb.record(True, 5.0)  # a call admitted before the breaker opened
    assert cb.state == "open"
    clock.advance(5)
    assert cb.state == "half_open"
    cb.record(True, 5.0)  # still no probe out: not taken as one
    assert cb.state == "half_open" and cb.allow()
    assert changes == [("closed", "open"), ("open", "half_open")]


def test_release_frees_the_probe_without_judging(clock: FakeClock) -> None:
    cb, _ = breaker(clock)
    trip(cb, clock)
    clock.advance(5)
    assert cb.allow()
    cb.release()  # the probe was cancelled (hedged away)
    assert cb.state == "half_open" and cb.allow()
    cb.release()
    cb.release()  # harmless when nothing is out, and in any state
    assert cb.state == "half_open"


def test_a_lost_probe_counts_as_failed(clock: FakeClock) -> None:
    cb, changes = breaker(clock, probe_timeout_s=10.0)
    trip(cb, clock)
    clock.advance(5)
    assert cb.allow()
    clock.advance(9.9)
    assert cb.state == "half_open" and not cb.allow()
    clock.advance(0.1)
    assert cb.state == "open" and changes[-1] == ("half_open", "open")
    clock.advance(5)
    assert cb.allow()


def test_snapshot(clock: FakeClock) -> None:
    cb, _ = breaker(clock, slow_call_ms=100.0)
    calls(cb, True, False, latency_ms=150.0)
    calls(cb, True)
    snap = cb.snapshot()
    assert snap["state"] == "closed" and snap["calls"] == 3 and snap["failures"] == 1 and snap["slow"] == 2
    assert snap["failure_share"] == pytest.approx(1 / 3) and snap["opened_at"] is None
    calls(cb, False)
    snap = cb.snapshot()
    assert snap["state"] == "open" and snap["opened_at"] == clock.now


def test_a_failing_hook_does_not_break_the_breaker(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    def hook(old: State, new: State) -> None:
        raise RuntimeError("metrics down")

    cb = CircuitBreaker(window=4, min_calls=2, clock=clock, on_change=hook)
    with caplog.at_level(logging.ERROR):
        calls(cb, False, False)
    assert cb.state == "open"
    assert "on_change hook failed" in caplog.text


@pytest.mark.parametrize(
    "kw",
    [
        {"window": 0},
        {"window": 5, "min_calls": 6},
        {"min_calls": 0},
        {"error_rate": 0.0},
        {"slow_rate": 1.5},
        {"open_s": -1.0},
        {"slow_call_ms": 0.0},
    ],
)
def test_settings_that_could_never_work_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(**kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        BreakerBoard(**kw)


def test_board_keeps_one_breaker_per_endpoint_and_model(clock: FakeClock) -> None:
    board = BreakerBoard(window=4, min_calls=2, clock=clock)
    a = board.get("grpc://t1:8001", "digits")
    assert board.get("grpc://t1:8001", "digits") is a
    b = board.get("grpc://t1:8001", "faces")
    c = board.get("grpc://t2:8001", "digits")
    assert len({id(a), id(b), id(c)}) == 3
    calls(a, False, False)
    assert board.states() == {
        ("grpc://t1:8001", "digits"): "open",
        ("grpc://t1:8001", "faces"): "closed",
        ("grpc://t2:8001", "digits"): "closed",
    }
    clock.advance(5)
    assert board.states()[("grpc://t1:8001", "digits")] == "half_open"
    assert board.snapshots()[("grpc://t1:8001", "digits")]["failures"] == 2


def test_board_hook_sees_every_breakers_transitions(clock: FakeClock) -> None:
    seen: list[tuple[State, State]] = []
    board = BreakerBoard(window=4, min_calls=2, clock=clock, on_change=lambda old, new: seen.append((old, new)))
    calls(board.get("e1", "m"), False, False)
    calls(board.get("e2", "m"), False, False)
    assert seen == [("closed", "open"), ("closed", "open")]
