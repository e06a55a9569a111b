"""Who may do what: every role rule lives here, as pure functions of the actor, the target and the action.

Default deny: an action this module does not name is refused to everyone. Frontends (lobby, API, admin panel)
and services ask :func:`can` / :func:`refusal` and never compare trust levels themselves, so one table holds the
role rules (CONTRACT §10):

- operators see everything, stop and start any VM, revoke anyone's API tokens, and suspend, re-tier (to
  ``newbie``/``citizen``) or change the quota of ``newbie``/``citizen`` users;
- only admins grant or revoke ``operator``/``admin``, act on operators and admins, remove other users' VMs,
  delete accounts and add users;
- nobody acts on their own account (tier, quota, suspension, deletion);
- the last active admin stays an admin (not demoted, suspended or deleted).
"""

from __future__ import annotations

import enum

from ussycode.auth.identity import Actor
from ussycode.store.users import User
from ussycode.types import TrustLevel

STAFF = frozenset({TrustLevel.OPERATOR, TrustLevel.ADMIN})
ADMINS = frozenset({TrustLevel.ADMIN})
# Tiers an operator may give (and take away): anything above needs an admin.
OPERATOR_GRANTABLE = frozenset({TrustLevel.NEWBIE, TrustLevel.CITIZEN})


class Action(enum.StrEnum):
    ADMIN_COMMANDS = "admin.commands"  # see and run the lobby's admin commands, open the admin panel
    ADMIN_VIEW = "admin.view"  # list every user, VM, share, token, the audit log
    USER_ADD = "user.add"  # create an account for someone else's key (the way in when registration is closed)
    VM_POWER_ANY = "vm.power_any"  # stop / start / restart anyone's VM
    VM_REMOVE_ANY = "vm.remove_any"  # remove anyone's VM
    TOKEN_REVOKE_ANY = "token.revoke_any"  # noqa: S105 - an action name: revoke anyone's API token
    # Acting on another account: also go through :func:`refusal` with the target.
    USER_SET_TRUST = "user.set_trust"
    USER_QUOTA = "user.quota"
    USER_SUSPEND = "user.suspend"
    USER_UNSUSPEND = "user.unsuspend"
    USER_DELETE = "user.delete"


_ALLOWED: dict[Action, frozenset[TrustLevel]] = {
    Action.ADMIN_COMMANDS: STAFF,
    Action.ADMIN_VIEW: STAFF,
    Action.USER_ADD: ADMINS,
    Action.VM_POWER_ANY: STAFF,
    Action.VM_REMOVE_ANY: ADMINS,
    Action.TOKEN_REVOKE_ANY: STAFF,
    Action.USER_SET_TRUST: STAFF,
    Action.USER_QUOTA: STAFF,
    Action.USER_SUSPEND: STAFF,
    Action.USER_UNSUSPEND: STAFF,
    Action.USER_DELETE: ADMINS,
}

# What taking each action away from an admin means for the "last admin" rule.
_REMOVES_ADMIN = frozenset({Action.USER_SUSPEND, Action.USER_DELETE})


def can(actor: Actor, action: Action) -> bool:
    """True when ``actor`` may perform ``action`` at all (a suspended account may do nothing)."""
    user = actor.user
    return not user.suspended and user.trust_level in _ALLOWED.get(action, frozenset())


def refusal(actor: User, target: User, action: Action, *, new_level: TrustLevel | None = None,
            active_admins: int = 0) -> str | None:
    """Why ``actor`` may not do ``action`` to ``target``'s account (None: allowed).

    ``actor`` is the acting user as the database has it now; ``new_level`` is the tier asked for by
    ``USER_SET_TRUST``; ``active_admins`` counts admins that are not suspended (the "last admin" rule).
    """
    if actor.suspended or actor.trust_level not in _ALLOWED.get(action, frozenset()):
        return "only operators and admins can do that" if action is not Action.USER_DELETE \
            else "only an admin can delete accounts"
    if actor.id == target.id:
        return "you cannot change your own account this way; ask another admin"
    is_admin = actor.trust_level is TrustLevel.ADMIN
    if target.trust_level in STAFF and not is_admin:
        return f"only an admin can act on {target.trust_level}s"
    if action is Action.USER_SET_TRUST:
        if new_level is None:
            return "no trust tier given"
        if new_level not in OPERATOR_GRANTABLE and not is_admin:
            return f"only an admin can grant {new_level}"
    takes_admin = action in _REMOVES_ADMIN or (action is Action.USER_SET_TRUST and new_level is not TrustLevel.ADMIN)
    if target.trust_level is TrustLevel.ADMIN and not target.suspended and takes_admin and active_admins <= 1:
        return "that is the last admin; make someone else admin first"
    return None
