"""Per-key token buckets (SSH one-shot commands and the HTTP API per user; registrations per address and overall)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ussycode import telemetry
from ussycode.errors import RateLimited


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """``burst`` tokens per key, refilled at ``per_minute`` tokens a minute. ``clock`` (monotonic seconds) is
    injectable so tests move time instead of sleeping."""

    def __init__(self, per_minute: float, burst: int, *, clock: Callable[[], float] = time.monotonic,
                 name: str = "commands") -> None:
        self.name = name  # the ``limiter`` label of ussycode_rate_limited_total
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._buckets: dict[str, _Bucket] = {}
        self.clock = clock

    @classmethod
    def per_hour(cls, count: int, *, clock: Callable[[], float] = time.monotonic,
                 name: str = "commands") -> RateLimiter:
        """At most ``count`` in a row per key, then one more every ``3600 / count`` seconds."""
        return cls(count / 60.0, count, clock=clock, name=name)

    def _refill(self, key: str) -> _Bucket:
        now = self.clock()
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(self.burst, now)
        b.tokens = min(self.burst, b.tokens + max(0.0, now - b.updated) * self.rate)
        b.updated = now
        return b

    def _refuse(self, b: _Bucket) -> RateLimited:
        telemetry.RATE_LIMITED.labels(self.name).inc()
        wait = (1.0 - b.tokens) / self.rate if self.rate > 0 else 60.0
        return RateLimited(f"rate limit exceeded; retry in {wait:.0f}s", retry_after=max(1.0, wait))

    def check(self, key: str) -> None:
        """Raise :class:`RateLimited` when :meth:`take` would, without spending anything."""
        b = self._refill(key)
        if b.tokens < 1.0:
            raise self._refuse(b)

    def take(self, key: str) -> None:
        """Spend one token for ``key`` or raise :class:`RateLimited` with the seconds to wait."""
        b = self._refill(key)
        if b.tokens < 1.0:
            raise self._refuse(b)
        b.tokens -= 1.0
        if len(self._buckets) > 100_000:  # bound memory under a flood of distinct keys
            cutoff = b.updated - self.burst / max(self.rate, 1e-9)
            self._buckets = {k: v for k, v in self._buckets.items() if v.updated > cutoff}

    def refund(self, key: str) -> None:
        """Give back a token spent by :meth:`take` for work that did not happen after all."""
        b = self._buckets.get(key)
        if b is not None:
            b.tokens = min(self.burst, b.tokens + 1.0)
