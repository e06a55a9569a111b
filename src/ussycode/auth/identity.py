"""Who is acting: a user, through which frontend, with which limits (API tokens narrow what an actor may do)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from ussycode.store.users import User
from ussycode.types import TrustLevel


@dataclass(frozen=True)
class Actor:
    user: User
    source: str  # "ssh", "api", "admin", "system"
    fingerprint: str | None = None
    # An API token may restrict the commands (first word) and the one VM it may touch.
    allowed_commands: frozenset[str] | None = None
    vm_scope: str | None = None
    token_id: str | None = None
    # When the API token this actor came with expires (naive UTC; None: never, or not a token).
    token_expires_at: dt.datetime | None = None

    @property
    def id(self) -> str:
        return self.user.id

    @property
    def handle(self) -> str:
        return self.user.handle

    @property
    def is_admin(self) -> bool:
        return self.user.trust_level is TrustLevel.ADMIN
