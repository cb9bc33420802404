"""When to try the broker again: capped exponential backoff with full jitter.

A broker restart drops every device at the same instant. If each waited the same delay, they
would all come back in the same instant too, and a thousand CONNECTs in one burst are what
makes a restarted broker fall over again. So every wait is drawn uniformly from zero to a
ceiling ("full jitter"): the first retry after a lost connection is spread over ``base_s``,
and the ceiling doubles with each failed attempt up to ``cap_s``, so a broker that stays down
is asked less and less often but never given up on.
"""

from __future__ import annotations

import random


class Backoff:
    """The retry schedule of one connection; :meth:`next_delay` after each failure,
    :meth:`reset` once connected."""

    def __init__(self, base_s: float, cap_s: float, rng: random.Random | None = None) -> None:
        if base_s <= 0 or cap_s <= 0:
            raise ValueError(f"backoff base and cap must be positive (got {base_s}, {cap_s})")
        self.base_s = base_s
        self.cap_s = max(cap_s, base_s)
        self._rng = rng or random.Random()
        self.attempt = 0

    def ceiling(self, attempt: int) -> float:
        """The longest wait before retry number ``attempt`` (0 is the first retry)."""
        # The exponent is bounded so a device retrying for weeks does not overflow a float.
        return min(self.cap_s, self.base_s * 2.0 ** min(attempt, 64))

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt, and count it."""
        delay = self._rng.uniform(0.0, self.ceiling(self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
