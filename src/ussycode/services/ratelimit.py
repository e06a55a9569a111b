"""Per-key token buckets (shared by SSH one-shot commands and the HTTP API)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ussycode.errors import RateLimited


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, per_minute: int, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._buckets: dict[str, _Bucket] = {}
        self._clock = time.monotonic

    def check(self, key: str) -> None:
        """Raise :class:`RateLimited` if ``key`` has no token left, without spending one."""
        b = self._buckets.get(key)
        if b is None:
            return
        tokens = min(self.burst, b.tokens + (self._clock() - b.updated) * self.rate)
        if tokens < 1.0:
            wait = (1.0 - tokens) / self.rate if self.rate > 0 else 60.0
            raise RateLimited(f"too many failed attempts; retry in {wait:.0f}s", retry_after=max(1.0, wait))

    def take(self, key: str) -> None:
        """Spend one token for ``key`` or raise :class:`RateLimited` with the seconds to wait."""
        now = self._clock()
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(self.burst, now)
        b.tokens = min(self.burst, b.tokens + (now - b.updated) * self.rate)
        b.updated = now
        if b.tokens < 1.0:
            wait = (1.0 - b.tokens) / self.rate if self.rate > 0 else 60.0
            raise RateLimited(f"rate limit exceeded; retry in {wait:.0f}s", retry_after=max(1.0, wait))
        b.tokens -= 1.0
        if len(self._buckets) > 100_000:  # bound memory under a flood of distinct keys
            cutoff = now - self.burst / max(self.rate, 1e-9)
            self._buckets = {k: v for k, v in self._buckets.items() if v.updated > cutoff}
