"""Token buckets: how much one requester may ask of a shared service, and all of them together.

A bridge answers every device from one Triton and a distributor resends chunks to every device
over one broker; without a bound per requester one device (or one that makes up ids) can take
what the fleet shares. A bucket holds up to ``burst`` tokens and gains ``rate`` a second; asking
for more than it holds is refused, not queued, so the asker learns at once. Where there is no
one to tell (the broker reading a connection), :meth:`TokenBucket.pace` says how long to wait.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class TokenBucket:
    rate: float  # tokens gained per second
    burst: float  # most tokens held
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def available(self, now: float) -> float:
        self._refill(now)
        return self.tokens

    def take(self, amount: float, now: float) -> bool:
        """Take ``amount`` tokens if the bucket holds them; otherwise take none."""
        self._refill(now)
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True

    def pace(self, amount: float, now: float) -> float:
        """Take ``amount`` tokens whether or not the bucket holds them; the seconds until the
        debt is paid back are the caller's to wait (0 when there was none). A rate of 0 never
        pays a debt back: refuse with :meth:`take` instead."""
        self._refill(now)
        self.tokens -= amount
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class BucketsPerKey:
    """One bucket per requester, at most ``max_keys`` remembered (the least recently used is
    forgotten, so made-up ids cannot grow the memory; a forgotten key starts full again, which
    is why a shared bucket over all keys goes with it where amplification matters)."""

    def __init__(
        self, rate: float, burst: float, *, max_keys: int = 65536, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate < 0 or burst <= 0:
            raise ValueError(f"a token bucket needs rate >= 0 and burst > 0, got rate={rate}, burst={burst}")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def bucket(self, key: str) -> TokenBucket:
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket.full(self.rate, self.burst, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def take(self, key: str, amount: float = 1.0) -> bool:
        return self.bucket(key).take(amount, self.clock())
