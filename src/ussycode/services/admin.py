"""Operating an instance: what operators and admins may see and do to other accounts and their VMs.

The lobby's ``admin`` commands and the admin panel both call this service; the role rules are
:mod:`ussycode.auth.policy`, checked here against the acting user *as the database has it now* (a demoted
operator's open session loses its powers at once). Every change is audited with the actor; a check and the
change it allows run in one write transaction, so two admins cannot demote each other below one admin.

Suspension: the account's browser sessions are revoked and its tokens' cached verifications dropped, its running
VMs are stopped, and from then on every frontend refuses it (lobby login, ``/exec``, forward-auth answers
"suspended" for its VMs). Unsuspending restores access; the VMs stay stopped until someone starts them.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa

from ussycode.auth.identity import Actor
from ussycode.auth.policy import Action, can, refusal
from ussycode.errors import Conflict, Forbidden, NotFound, StateError, UsageError
from ussycode.services.admin_views import AdminViews, UserDetail, host_usage
from ussycode.services.llm import LlmService
from ussycode.services.tokens import TokenService
from ussycode.services.users import UserService
from ussycode.services.vms import VmService
from ussycode.store import audit
from ussycode.store import sessions as sessq
from ussycode.store import tokens as tokq
from ussycode.store import users as userq
from ussycode.store import vms as vmq
from ussycode.store.db import Store
from ussycode.store.schema import users, utcnow
from ussycode.store.users import User
from ussycode.types import Limits, TrustLevel, VmStatus
from ussycode.validate import printable_text

log = logging.getLogger(__name__)

MAX_QUOTA = {"vms": 10_000, "cpu": 256, "memory_mb": 1_048_576, "disk_gb": 65_536}


class AdminService(AdminViews):
    def __init__(self, store: Store, users: UserService, vms: VmService, tokens: TokenService | None = None,
                 data_dir: str = "/") -> None:
        self.store = store
        self.users = users
        self.vms = vms
        self.tokens = tokens
        self.data_dir = data_dir
        self.llm: LlmService | None = None  # set by the app: its cached account reads are dropped on changes
        self._stats: tuple[int, float, dict[str, Any]] | None = None

    # --- changes to accounts ------------------------------------------------------------------------------------
    async def _change(self, actor: Actor, handle: str, action: Action, apply: Any, *,
                      new_level: TrustLevel | None = None, detail: dict[str, Any] | None = None) -> User:
        """Check the rule against the database as it is now and apply, in one transaction; audit it."""

        def tx(c: sa.Connection) -> User | tuple[str, str]:
            me = userq.by_id(c, actor.id)
            if me is None:
                raise Forbidden("your account no longer exists")
            target = userq.by_handle(c, handle.strip().lower()[:64])
            if target is None:
                if me.trust_level not in (TrustLevel.OPERATOR, TrustLevel.ADMIN) or me.suspended:
                    raise Forbidden("only operators and admins can do that")
                raise NotFound(f"no user {handle[:40]!r}")
            why = refusal(me, target, action, new_level=new_level, active_admins=userq.count_admins(c))
            if why is not None:
                return why, target.handle  # nothing changed; the refusal is audited in its own transaction
            apply(c, target)
            audit.record(c, actor_id=me.id, source=actor.source, action=f"admin.{action.value.split('.')[1]}",
                         target=target.handle, **(detail or {}))
            changed = userq.by_id(c, target.id)
            assert changed is not None
            return changed

        result = await self.store.write(tx)
        if isinstance(result, User):
            return result
        why, target_handle = result
        log.info("admin refused: %s %s %s: %s", actor.handle, action, target_handle, why)
        await self.store.write(lambda c: audit.record(c, actor_id=actor.id, source=actor.source,
                                                      action="admin.refused", target=target_handle,
                                                      attempted=str(action), reason=why))
        raise Forbidden(why)

    def _forget(self, user: User) -> None:
        if self.tokens is not None:
            self.tokens.forget_user(user.id)
        if self.llm is not None:
            self.llm.forget_user(user.id)

    async def set_trust(self, actor: Actor, handle: str, tier: str) -> User:
        try:
            level = TrustLevel(tier.strip().lower())
        except ValueError:
            raise UsageError(f"unknown tier {tier[:20]!r}: use newbie, citizen, operator or admin") from None
        def apply(c: sa.Connection, target: User) -> None:
            userq.set_trust(c, target.id, level)

        user = await self._change(actor, handle, Action.USER_SET_TRUST, apply, new_level=level,
                                  detail={"to": str(level)})
        self._forget(user)
        return user

    async def set_quota(self, actor: Actor, handle: str, *, reset: bool = False, **values: int | None) -> User:
        unknown = set(values) - set(MAX_QUOTA)
        if unknown:
            raise UsageError(f"unknown quota keys: {', '.join(sorted(unknown))}")
        for key, value in values.items():
            if value is not None and not 0 <= value <= MAX_QUOTA[key]:
                raise UsageError(f"--{key.replace('_', '-')} must be between 0 and {MAX_QUOTA[key]}")
        if not reset and all(v is None for v in values.values()):
            raise UsageError("give at least one of --vms, --cpu, --memory, --disk (or --reset)")

        def apply(c: sa.Connection, target: User) -> None:
            if reset:
                userq.set_quota(c, target.id, None)
                return
            old = target.quota.as_json() if target.quota else {}
            merged = {k: values.get(k) if values.get(k) is not None else old.get(k) for k in MAX_QUOTA}
            userq.set_quota(c, target.id, Limits(**merged))

        shown = {k: v for k, v in values.items() if v is not None}
        user = await self._change(actor, handle, Action.USER_QUOTA, apply, detail={"reset": reset, **shown})
        self._forget(user)
        return user

    async def suspend(self, actor: Actor, handle: str, reason: str = "") -> User:
        reason = printable_text(reason.strip(), "reason", max_len=200)

        def apply(c: sa.Connection, target: User) -> None:
            if target.suspended:
                raise StateError(f"{target.handle} is already suspended")
            now = utcnow()
            userq.set_suspended(c, target.id, now, reason)
            sessq.revoke_user(c, target.id, now)

        user = await self._change(actor, handle, Action.USER_SUSPEND, apply, detail={"reason": reason})
        self._forget(user)
        await self._stop_all(user)
        return user

    async def _stop_all(self, user: User) -> None:
        owner = Actor(user=user, source="admin")
        for vm in await self.store.read(lambda c: vmq.of_owner(c, user.id)):
            if vm.status is VmStatus.STOPPED and self.vms.pending(vm.id) is None:
                continue
            try:
                await self.vms.stop(owner, vm.name)
            except (StateError, NotFound):
                pass
            except Exception:  # keep stopping the others; the watcher and the owner's refusals still hold
                log.exception("could not stop %s of suspended %s", vm.name, user.handle)

    async def unsuspend(self, actor: Actor, handle: str) -> User:
        def apply(c: sa.Connection, target: User) -> None:
            if not target.suspended:
                raise StateError(f"{target.handle} is not suspended")
            userq.set_suspended(c, target.id, None, "")

        user = await self._change(actor, handle, Action.USER_UNSUSPEND, apply)
        self._forget(user)
        return user

    async def delete_user(self, actor: Actor, handle: str, confirm: str) -> None:
        """Remove an account with its VMs (disks included), keys, tokens, sessions and shares."""
        if confirm.strip().lower() != handle.strip().lower():
            raise UsageError("type the handle to confirm the deletion")

        def check(c: sa.Connection, target: User) -> None:
            if target.suspended_at is None:
                # Stop the account first, so nothing of it runs or logs in while its VMs are removed.
                userq.set_suspended(c, target.id, utcnow(), "being deleted")
            sessq.revoke_user(c, target.id, utcnow())

        user = await self._change(actor, handle, Action.USER_DELETE, check)
        self._forget(user)
        owner = Actor(user=user, source="admin")
        for vm in await self.store.read(lambda c: vmq.of_owner(c, user.id)):
            await self.vms.remove(owner, vm.name)

        def tx(c: sa.Connection) -> None:
            if vmq.count_of_owner(c, user.id):
                raise Conflict(f"{user.handle} still has VMs; run the deletion again")
            userq.delete(c, user.id)
            audit.record(c, actor_id=actor.id, source=actor.source, action="admin.user_deleted", target=user.handle)

        await self.store.write(tx)

    # --- any user's VMs and tokens ------------------------------------------------------------------------------
    async def vm_power(self, actor: Actor, name: str, op: str) -> vmq.Vm:
        """stop / start / restart anyone's VM (operators and admins)."""
        me = await self.users.by_id(actor.id)
        if me is None or not can(Actor(user=me, source=actor.source), Action.VM_POWER_ANY):
            raise Forbidden("only operators and admins can do that")
        vm, owner = await self._vm_and_owner(name)
        if op in ("start", "restart") and owner.suspended:
            raise StateError(f"{owner.handle} is suspended; unsuspend them before starting their VMs")
        await self.store.write(lambda c: audit.record(c, actor_id=me.id, source=actor.source,
                                                      action=f"admin.vm_{op}", target=vm.name, owner=owner.handle))
        as_owner = Actor(user=owner, source="admin")
        if op == "stop":
            return await self.vms.stop(as_owner, vm.name)
        if op == "start":
            return await self.vms.start(as_owner, vm.name)
        if op == "restart":
            return await self.vms.restart(as_owner, vm.name)
        raise UsageError(f"unknown VM operation {op[:20]!r}")

    async def vm_remove(self, actor: Actor, name: str, confirm: str) -> None:
        me = await self.users.by_id(actor.id)
        if me is None or not can(Actor(user=me, source=actor.source), Action.VM_REMOVE_ANY):
            raise Forbidden("only an admin can remove other users' VMs")
        if confirm.strip().lower() != name.strip().lower():
            raise UsageError("type the VM's name to confirm the removal")
        vm, owner = await self._vm_and_owner(name)
        await self.store.write(lambda c: audit.record(c, actor_id=me.id, source=actor.source,
                                                      action="admin.vm_remove", target=vm.name, owner=owner.handle))
        await self.vms.remove(Actor(user=owner, source="admin"), vm.name)

    async def revoke_token(self, actor: Actor, token_id: str) -> bool:
        me = await self.users.by_id(actor.id)
        if me is None or not can(Actor(user=me, source=actor.source), Action.TOKEN_REVOKE_ANY):
            raise Forbidden("only operators and admins can do that")

        def tx(c: sa.Connection) -> tuple[bool, str]:
            row = tokq.by_prefix(c, token_id[:40])
            if row is None:
                raise NotFound(f"no token {token_id[:40]!r}")
            if row.revoked_at is not None:
                return False, row.user_id
            tokq.revoke(c, row.id, utcnow())
            audit.record(c, actor_id=me.id, source=actor.source, action="admin.token_revoke", target=row.id)
            return True, row.user_id

        done, owner_id = await self.store.write(tx)
        if self.tokens is not None:
            self.tokens.forget_user(owner_id)
        return done


def promote(store: Store, handle: str, tier: TrustLevel = TrustLevel.ADMIN) -> User:
    """Host-side bootstrap and recovery (``ussycode admin promote``): set a tier with no role check (whoever runs
    it owns the host and the database). Synchronous; works while the server runs (the change shows at the
    user's next lobby command or login; a token's cached check and ``whoami``'s cached reads see it within 2 s)."""
    with store.engine.begin() as c:
        user = userq.by_handle(c, handle.strip().lower())
        if user is None:
            raise NotFound(f"no user {handle[:40]!r}")
        userq.set_trust(c, user.id, tier)
        audit.record(c, actor_id=None, source="host", action="admin.promote", target=user.handle, to=str(tier))
        changed = userq.by_id(c, user.id)
        assert changed is not None
        return changed


def staff(store: Store) -> list[User]:
    """Every operator and admin (``ussycode admin list``)."""
    with store.engine.begin() as c:
        rows = c.execute(sa.select(users.c.handle).where(
            users.c.trust_level.in_([TrustLevel.ADMIN.value, TrustLevel.OPERATOR.value])).order_by(users.c.handle))
        found = [userq.by_handle(c, h) for (h,) in rows]
    return [u for u in found if u is not None]


__all__ = ["AdminService", "UserDetail", "host_usage", "promote", "staff"]
