"""Circuit breakers per (endpoint, model): stop sending work to what is failing or too slow.

A dead or overloaded Triton makes every request wait out its timeout. A breaker notices and
refuses calls at once instead, so requests fail fast with ``unavailable`` (the device answers
locally) and the sick server is not buried under retries while it recovers.

- closed: calls flow and their outcomes fill a rolling window of the last ``window`` calls.
  Once it holds ``min_calls`` outcomes (so that two early failures cannot trip it), the
  breaker opens when the share of failures reaches ``error_rate`` or the share of calls slower
  than ``slow_call_ms`` reaches ``slow_rate``: a server that answers, but too late for any
  deadline, is as useless as one that does not.
- open: every call is refused. After ``open_s`` the breaker turns half-open, lazily, on the
  next look at its state (there is no timer task to manage).
- half_open: exactly one probe is let through at a time. Its success closes the breaker with
  an empty window (old failures say nothing about the recovered server); its failure opens
  it again for another ``open_s``. A probe that reports nothing for ``probe_timeout_s`` counts
  as failed, so a lost caller cannot wedge the breaker half-open, refusing everything, forever.

Every admitted call must end in :meth:`CircuitBreaker.record` or, when it ends with no outcome
(cancelled, e.g. hedged away), :meth:`CircuitBreaker.release`. Breakers are meant for one
event loop and are not thread-safe.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

log = logging.getLogger(__name__)

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(
        self,
        *,
        window: int = 20,
        min_calls: int = 5,
        error_rate: float = 0.5,
        slow_call_ms: float = 1000.0,
        slow_rate: float = 0.8,
        open_s: float = 5.0,
        probe_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[State, State], None] | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if not 1 <= min_calls <= window:
            # More than the window can hold would mean the breaker can never open.
            raise ValueError(f"min_calls must be 1..window ({window}), got {min_calls}")
        for name, rate in (("error_rate", error_rate), ("slow_rate", slow_rate)):
            if not 0 < rate <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {rate}")
        if slow_call_ms <= 0 or open_s < 0 or probe_timeout_s <= 0:
            raise ValueError("slow_call_ms and probe_timeout_s must be positive, open_s not negative")
        self.window = window
        self.min_calls = min_calls
        self.error_rate = error_rate
        self.slow_call_ms = slow_call_ms
        self.slow_rate = slow_rate
        self.open_s = open_s
        self.probe_timeout_s = probe_timeout_s
        self.on_change = on_change
        self._clock = clock
        self._outcomes: deque[tuple[bool, bool]] = deque(maxlen=window)  # (failed, slow)
        self._state: State = "closed"
        self._opened_at: float | None = None
        self._probe_since: float | None = None  # set while a half-open probe is out

    @property
    def state(self) -> State:
        now = self._clock()
        if self._state == "open" and self._opened_at is not None and now - self._opened_at >= self.open_s:
            self._set("half_open")
        elif self._state == "half_open" and self._probe_since is not None:
            if now - self._probe_since >= self.probe_timeout_s:
                log.warning("circuit probe gave no outcome in %.1fs; counting it as failed", self.probe_timeout_s)
                self._open()
        return self._state

    def allow(self) -> bool:
        """Whether a call may go out now; in half-open, True hands out the single probe."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and self._probe_since is None:
            self._probe_since = self._clock()
            return True
        return False

    def record(self, ok: bool, latency_ms: float) -> None:
        """The outcome of an admitted call."""
        state = self.state
        if state == "half_open":
            if self._probe_since is None:
                return  # a straggler admitted before the breaker opened, not the probe
            self._probe_since = None
            if ok:
                self._outcomes.clear()
                self._opened_at = None
                self._set("closed")
            else:
                self._open()
            return
        if state == "open":
            return  # a straggler: the breaker already knows enough to stay open
        self._outcomes.append((not ok, latency_ms > self.slow_call_ms))
        calls = len(self._outcomes)
        if calls < self.min_calls:
            return
        failures, slow = self._counts()
        if failures / calls >= self.error_rate or slow / calls >= self.slow_rate:
            self._open()

    def release(self) -> None:
        """An admitted call ended with no outcome (cancelled): free the probe slot, judge nothing."""
        if self._state == "half_open":
            self._probe_since = None

    def snapshot(self) -> dict[str, Any]:
        """The breaker's state and window, for telemetry and debugging."""
        state = self.state
        calls = len(self._outcomes)
        failures, slow = self._counts()
        return {
            "state": state,
            "calls": calls,
            "failures": failures,
            "slow": slow,
            "failure_share": failures / calls if calls else 0.0,
            "slow_share": slow / calls if calls else 0.0,
            "opened_at": self._opened_at,
            "probing": self._probe_since is not None,
        }

    def _counts(self) -> tuple[int, int]:
        return sum(f for f, _ in self._outcomes), sum(s for _, s in self._outcomes)

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._probe_since = None
        self._set("open")

    def _set(self, new: State) -> None:
        old, self._state = self._state, new
        if old == new or self.on_change is None:
            return
        try:
            self.on_change(old, new)
        except Exception:
            # The hook feeds metrics; a bug there must not break dispatch.
            log.exception("circuit breaker on_change hook failed (%s -> %s)", old, new)


class BreakerBoard:
    """One breaker per (endpoint, model), made on first use, all with the same settings.

    Per pair rather than per endpoint: one broken model must not cut off the healthy models
    served by the same Triton.
    """

    def __init__(self, **breaker_kwargs: Any) -> None:
        CircuitBreaker(**breaker_kwargs)  # refuse bad settings now, not on the first request
        self._kwargs = breaker_kwargs
        self._breakers: dict[tuple[str, str], CircuitBreaker] = {}

    def get(self, endpoint: str, model: str) -> CircuitBreaker:
        key = (endpoint, model)
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = self._breakers[key] = CircuitBreaker(**self._kwargs)
        return breaker

    def states(self) -> dict[tuple[str, str], State]:
        return {key: b.state for key, b in self._breakers.items()}

    def snapshots(self) -> dict[tuple[str, str], dict[str, Any]]:
        return {key: b.snapshot() for key, b in self._breakers.items()}
