"""Reads remembered until the next write: a small cache whose entries are dropped by any write (no stale allow,
ever).

Each entry carries the store's write generation at the time it was read (:attr:`Store.generation`): any write
since — a share removed, a session revoked, a VM renamed, stopped or removed, a token revoked — makes every
entry a miss, so the first request after a change that returned reads the DB again. Entries also expire after
``ttl`` seconds (a write by another process, such as ``ussycode admin promote``, shows within it) and at their
own deadline (a session's expiry), so time alone never extends access. Forward-auth keeps the inputs of
:func:`ussycode.api.forward_auth.decide` here (the decision itself is made fresh on every request);
:meth:`Store.read_cached` keeps what the cheapest commands show (``whoami``) and whom mail may be delivered to.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class GenerationCache(Generic[V]):
    def __init__(self, max_entries: int = 4096, ttl: float = 5.0) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._entries: OrderedDict[Hashable, tuple[int, float, V]] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: Hashable, generation: int) -> V | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] != generation or entry[1] <= time.monotonic():
            self.misses += 1
            return None
        self.hits += 1
        return entry[2]

    def put(self, key: Hashable, generation: int, value: V, deadline: float | None = None) -> None:
        """Remember ``value`` read at ``generation``; ``deadline`` (monotonic) shortens its life."""
        until = time.monotonic() + self.ttl
        if deadline is not None:
            until = min(until, deadline)
        self._entries[key] = (generation, until, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
