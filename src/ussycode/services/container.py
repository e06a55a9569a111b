"""The bundle of services a frontend hands to commands. Later features add their service here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ussycode.config import Settings
from ussycode.services.events import EventBus
from ussycode.services.ratelimit import RateLimiter
from ussycode.services.users import UserService
from ussycode.services.vms import VmService
from ussycode.store.db import Store


@dataclass
class Services:
    settings: Settings
    store: Store
    events: EventBus
    users: UserService
    vms: VmService
    limiter: RateLimiter
    extra: dict[str, Any] = field(default_factory=dict)
