"""Who may do what: every role check goes through :func:`can`, a pure function of the actor and the action.

Default deny: an action this module does not name is refused to everyone. Frontends (lobby, API, admin panel) and
services ask ``can`` and never compare trust levels themselves, so one table holds the role rules.
"""

from __future__ import annotations

import enum

from ussycode.auth.identity import Actor
from ussycode.types import TrustLevel


class Action(enum.StrEnum):
    ADMIN_COMMANDS = "admin.commands"  # see and run the lobby's admin-only commands
    USER_ADD = "user.add"  # create an account for someone else's key (the way in when registration is closed)


_ALLOWED: dict[Action, frozenset[TrustLevel]] = {
    Action.ADMIN_COMMANDS: frozenset({TrustLevel.ADMIN}),
    Action.USER_ADD: frozenset({TrustLevel.ADMIN}),
}


def can(actor: Actor, action: Action) -> bool:
    """True when ``actor`` may perform ``action``."""
    return actor.user.trust_level in _ALLOWED.get(action, frozenset())
