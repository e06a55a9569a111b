"""A small in-process event bus: services announce changes, interested parts (routes, bridges) react.

Listeners are async callables; a failing listener is logged and never breaks the change that announced it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VmEvent:
    kind: str  # "created", "started", "stopped", "removed", "renamed", "changed"
    vm_id: str
    name: str
    old_name: str = ""


Listener = Callable[[VmEvent], Awaitable[None]]


class EventBus:
    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def publish(self, event: VmEvent) -> None:
        for listener in list(self._listeners):
            try:
                await listener(event)
            except Exception:
                log.exception("listener %r failed on %s", listener, event)
