"""Accounts and SSH keys."""

from __future__ import annotations

import sqlalchemy as sa

from ussycode.auth.identity import Actor
from ussycode.auth.keys import MAX_KEY_COMMENT, PublicKey, parse_authorized_key
from ussycode.auth.policy import Action, can
from ussycode.errors import Conflict, Forbidden, NotFound, UsageError
from ussycode.services.registration import RegistrationGate
from ussycode.services.routussy import Routussy
from ussycode.store import audit
from ussycode.store import users as q
from ussycode.store import vms as vmq
from ussycode.store.db import Store
from ussycode.store.users import SshKey, User
from ussycode.types import HANDLE_RE, RESERVED_NAMES
from ussycode.validate import printable_text


def validate_handle(handle: str) -> str:
    """A handle as typed (surrounding spaces ignored, case folded); control characters are refused, not stripped."""
    printable_text(handle, "handle", max_len=64, allow_empty=False)
    handle = handle.strip(" ").lower()
    if not HANDLE_RE.fullmatch(handle):
        raise UsageError(
            "invalid handle: use 2-20 characters: lower-case letters, digits and '-', starting with a letter"
        )
    if handle in RESERVED_NAMES:
        raise UsageError(f"the handle {handle!r} is reserved; pick another")
    return handle


class UserService:
    def __init__(self, store: Store, gate: RegistrationGate | None = None, routussy: Routussy | None = None) -> None:
        self.store = store
        self.gate = gate  # None: no registration mode or limits (tools and tests that build users directly)
        self.routussy = routussy  # when set, new keys from outside the trusted ranges need its approval

    async def by_fingerprint(self, fingerprint: str) -> User | None:
        return await self.store.read(lambda c: q.by_fingerprint(c, fingerprint))

    async def by_id(self, user_id: str) -> User | None:
        return await self.store.read(lambda c: q.by_id(c, user_id))

    async def by_handle(self, handle: str) -> User | None:
        return await self.store.read(lambda c: q.by_handle(c, handle))

    async def registration_open(self) -> bool:
        """Whether an unknown key may register itself now: always in open mode; in closed mode only while the
        database has no account (the first one becomes admin, and then adds the others)."""
        if self.gate is None or not self.gate.closed:
            return True
        return await self.store.read(q.count) == 0

    def check_registration_limits(self, address: str) -> None:
        """Raise the rate-limit refusal a registration from ``address`` would get now, spending nothing."""
        if self.gate is not None:
            self.gate.check(address)

    async def register(self, handle: str, key: PublicKey, source: str = "ssh", *, address: str = "") -> User:
        """A key registers itself. Mode, handle and rate limits are all checked before anything is written."""
        if not await self.registration_open():
            assert self.gate is not None
            raise self.gate.refuse_closed()
        handle = validate_handle(handle)
        if self.routussy is not None:
            await self.routussy.admit(key.fingerprint, address)
        if self.gate is not None:
            self.gate.admit(address)
        try:
            return await self._create(handle, key, source=source, actor_id=None, action="user.register")
        except Conflict:
            if self.gate is not None:
                self.gate.refund(address)  # nothing was written: a taken handle does not use up the limit
            raise

    async def add_user(self, actor: Actor, handle: str, key_line: str) -> User:
        """An admin creates an account for someone else's key (no registration mode or limit applies)."""
        if not can(actor, Action.USER_ADD):
            raise Forbidden("only an admin can add users")
        handle = validate_handle(handle)
        key = parse_authorized_key(key_line)
        return await self._create(handle, key, source=actor.source, actor_id=actor.id, action="user.add")

    async def _create(self, handle: str, key: PublicKey, *, source: str, actor_id: str | None, action: str) -> User:
        def tx(c: sa.Connection) -> User:
            if q.by_handle(c, handle) is not None:
                raise Conflict(f"the handle {handle!r} is taken; pick another")
            if q.key_by_fingerprint(c, key.fingerprint) is not None:
                raise Conflict("this key is already registered")
            user = q.create_user(c, handle, key.key_type, key.openssh, key.fingerprint, key.comment)
            audit.record(c, actor_id=actor_id or user.id, source=source, action=action, target=handle,
                         fingerprint=key.fingerprint, trust_level=str(user.trust_level))
            return user

        return await self.store.write(tx)

    async def keys(self, user_id: str) -> list[SshKey]:
        return await self.store.read(lambda c: q.keys_of(c, user_id))

    async def add_key(self, actor: Actor, line: str) -> SshKey:
        key = parse_authorized_key(line)

        def tx(c: sa.Connection) -> SshKey:
            if q.key_by_fingerprint(c, key.fingerprint) is not None:
                raise Conflict("that key is already registered (to you or to another account)")
            if len(q.keys_of(c, actor.id)) >= 50:
                raise Conflict("you have 50 keys; remove one first")
            row = q.add_key(c, actor.id, key.key_type, key.openssh, key.fingerprint, key.comment)
            audit.record(c, actor_id=actor.id, source=actor.source, action="key.add", target=key.fingerprint)
            return row

        return await self.store.write(tx)

    @staticmethod
    def _find(keys: list[SshKey], ref: str) -> SshKey:
        for key in keys:
            if ref == str(key.id) or ref == key.fingerprint or ref == key.fingerprint.removeprefix("SHA256:"):
                return key
        raise NotFound(f"no key {ref!r}; see 'ssh-key list'")

    async def remove_key(self, actor: Actor, ref: str) -> SshKey:
        def tx(c: sa.Connection) -> SshKey:
            keys = q.keys_of(c, actor.id)
            key = self._find(keys, ref)
            if len(keys) == 1:
                raise Conflict("that is your last key; add another before removing it")
            q.remove_key(c, key.id)
            audit.record(c, actor_id=actor.id, source=actor.source, action="key.remove", target=key.fingerprint)
            return key

        return await self.store.write(tx)

    async def rename_key(self, actor: Actor, ref: str, comment: str) -> SshKey:
        comment = printable_text(comment.strip(" "), "key comment", max_len=MAX_KEY_COMMENT)

        def tx(c: sa.Connection) -> SshKey:
            key = self._find(q.keys_of(c, actor.id), ref)
            q.rename_key(c, key.id, comment)
            audit.record(c, actor_id=actor.id, source=actor.source, action="key.rename", target=key.fingerprint,
                         comment=comment)
            return key

        return await self.store.write(tx)

    async def profile(self, user_id: str) -> tuple[User, list[SshKey], int] | None:
        """The user, their keys and their VM count, in one read (remembered until the next write)."""

        def read(c: sa.Connection) -> tuple[User, list[SshKey], int] | None:
            user = q.by_id(c, user_id)
            return None if user is None else (user, q.keys_of(c, user_id), vmq.count_of_owner(c, user_id))

        return await self.store.read_cached(("profile", user_id), read)

    async def vm_count(self, user_id: str) -> int:
        return await self.store.read(lambda c: vmq.count_of_owner(c, user_id))
