"""A token bucket that holds work back instead of refusing it (docs/architecture.md §5).

Behind Tor every client has the same address, so a spray cannot be singled out; but a spray
of unknown ids is a closed loop: each connection sends its next request when its answer
comes. Holding answers about unknown ids back once they pass a rate makes the spray slow
itself down, while requests about recorded ids (an honest payer's) never wait here.
"""

from __future__ import annotations


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; time is given, never read."""

    __slots__ = ("_at", "_tokens", "burst", "max_wait", "rate")

    def __init__(self, rate: float, burst: float, max_wait: float, now: float = 0.0) -> None:
        if rate <= 0 or burst < 1 or max_wait < 0:
            raise ValueError("rate > 0, burst >= 1 and max_wait >= 0 are needed")
        self.rate = rate
        self.burst = burst
        self.max_wait = max_wait
        self._tokens = burst
        self._at = now

    def reserve(self, now: float) -> float | None:
        """Take a token: the seconds to wait until it is due (0.0: at once), or None when it
        would be due later than `max_wait` (nothing is taken then)."""
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
        self._tokens -= 1
        if self._tokens >= 0:
            return 0.0
        wait = -self._tokens / self.rate
        if wait > self.max_wait:
            self._tokens += 1
            return None
        return wait
