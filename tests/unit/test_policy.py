"""The role rules of CONTRACT §10, as the one pure policy module states them (every frontend asks it)."""

from __future__ import annotations

import datetime as dt

import pytest

from ussycode.auth.identity import Actor
from ussycode.auth.policy import Action, can, refusal
from ussycode.store.users import User
from ussycode.types import TrustLevel

N, C, OP, A = TrustLevel.NEWBIE, TrustLevel.CITIZEN, TrustLevel.OPERATOR, TrustLevel.ADMIN
T0 = dt.datetime(2026, 1, 1)


def person(uid: str, level: TrustLevel, suspended: bool = False) -> User:
    return User(uid, uid, None, level, T0, suspended_at=T0 if suspended else None)


@pytest.mark.parametrize("level", list(TrustLevel))
def test_what_each_tier_may_do_at_all(level: TrustLevel) -> None:
    staff = level in (OP, A)
    actor = Actor(person("me", level), "ssh")
    assert can(actor, Action.ADMIN_COMMANDS) is staff
    assert can(actor, Action.ADMIN_VIEW) is staff
    assert can(actor, Action.VM_POWER_ANY) is staff
    assert can(actor, Action.TOKEN_REVOKE_ANY) is staff
    assert can(actor, Action.VM_REMOVE_ANY) is (level is A)
    assert can(actor, Action.USER_DELETE) is (level is A)
    assert can(actor, Action.USER_ADD) is (level is A)


def test_a_suspended_admin_may_do_nothing() -> None:
    actor = Actor(person("me", A, suspended=True), "ssh")
    assert not any(can(actor, a) for a in Action)
    assert refusal(actor.user, person("x", N), Action.USER_SUSPEND, active_admins=3) is not None


@pytest.mark.parametrize(("target", "new", "allowed"), [
    (N, C, True), (C, N, True), (N, OP, False), (N, A, False), (OP, N, False), (A, C, False), (OP, A, False),
])
def test_an_operator_re_tiers_only_newbies_and_citizens_within_their_tiers(
        target: TrustLevel, new: TrustLevel, allowed: bool) -> None:
    why = refusal(person("op", OP), person("t", target), Action.USER_SET_TRUST, new_level=new, active_admins=2)
    assert (why is None) is allowed, why


@pytest.mark.parametrize("action", [Action.USER_SUSPEND, Action.USER_UNSUSPEND, Action.USER_QUOTA])
def test_an_operator_acts_on_newbies_and_citizens_only(action: Action) -> None:
    op = person("op", OP)
    assert refusal(op, person("n", N), action, active_admins=1) is None
    assert refusal(op, person("c", C), action, active_admins=1) is None
    assert "only an admin" in (refusal(op, person("o", OP), action, active_admins=1) or "")
    assert "only an admin" in (refusal(op, person("a", A), action, active_admins=2) or "")


def test_only_admins_delete_accounts() -> None:
    assert refusal(person("op", OP), person("n", N), Action.USER_DELETE, active_admins=1) is not None
    assert refusal(person("ad", A), person("n", N), Action.USER_DELETE, active_admins=1) is None


@pytest.mark.parametrize("action", [Action.USER_SET_TRUST, Action.USER_SUSPEND, Action.USER_QUOTA,
                                    Action.USER_DELETE])
@pytest.mark.parametrize("level", [OP, A])
def test_nobody_changes_their_own_account(action: Action, level: TrustLevel) -> None:
    me = person("me", level)
    why = refusal(me, me, action, new_level=A, active_admins=5)
    assert why is not None
    if can(Actor(me, "ssh"), action):
        assert "your own" in why


def test_an_admin_grants_and_revokes_any_tier() -> None:
    admin = person("ad", A)
    for target in (N, C, OP, A):
        for new in (N, C, OP, A):
            assert refusal(admin, person("t", target), Action.USER_SET_TRUST, new_level=new, active_admins=2) is None


def test_the_last_admin_stays_admin() -> None:
    admin, other = person("ad", A), person("other", A)
    # with two admins, one may demote, suspend or delete the other
    assert refusal(admin, other, Action.USER_SET_TRUST, new_level=C, active_admins=2) is None
    # the database says only one active admin is left (the actor's own row is stale, or the host tool acts)
    for action, new in ((Action.USER_SET_TRUST, C), (Action.USER_SUSPEND, None), (Action.USER_DELETE, None)):
        why = refusal(admin, other, action, new_level=new, active_admins=1)
        assert why is not None and "last admin" in why
    # re-granting admin to an admin is never "taking" it
    assert refusal(admin, other, Action.USER_SET_TRUST, new_level=A, active_admins=1) is None


def test_unknown_or_missing_tier_is_refused() -> None:
    assert refusal(person("ad", A), person("n", N), Action.USER_SET_TRUST, new_level=None, active_admins=1)
