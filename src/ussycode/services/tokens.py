"""API tokens: create, list, revoke, and turn a Bearer credential into an :class:`Actor` (fail closed).

Scopes. A token may carry ``cmds`` (an allowlist of command names, canonicalised through the registry) and a VM
(stored by id, so it follows a rename; deleting the VM deletes the token). A VM-scoped token may run only the
commands in :data:`VM_SCOPED_COMMANDS` (intersected with its ``cmds``); :class:`VmService` refuses any other VM
for it. A restricted token (``cmds`` or VM) cannot create tokens.

Auditing: ``token.create``, ``token.revoke`` and every refusal (``token.refused``, with a machine reason and the
token id or key fingerprint, never the token text). ``last_used_at`` is written at most once a minute per token.

Caching: a verified usy1 token is remembered in memory for :data:`AUTH_CACHE_TTL` seconds (by id, with its
secret's hash, compared in constant time on every hit) so a busy script does not cost a DB read per request.
``revoke`` drops the entry at once; expiry is checked on every hit; other changes (the user's trust level, the
scoped VM's name) show after at most the TTL. usy0 tokens are not cached: removing the signing key takes effect
on the next request.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncssh
import sqlalchemy as sa

from ussycode.auth import tokens as tk
from ussycode.auth.identity import Actor
from ussycode.errors import Conflict, Forbidden, NotFound, RateLimited, Suspended, Unauthenticated, UsageError
from ussycode.services.ratelimit import RateLimiter
from ussycode.store import audit
from ussycode.store import tokens as q
from ussycode.store import users as userq
from ussycode.store import vms as vmq
from ussycode.store.db import Store
from ussycode.store.schema import iso, utcnow
from ussycode.store.users import User

log = logging.getLogger(__name__)

# What a VM-scoped token may run: commands about that one VM, plus looking around.
VM_SCOPED_COMMANDS = frozenset({"ls", "whoami", "help", "start", "stop", "restart", "rm", "rename", "tag", "share",
                                "ssh"})
MAX_ACTIVE_TOKENS = 100
# Refused credentials per client address: this many at once, then this many a minute (then 429 Retry-After).
BAD_TOKEN_BURST = 20
BAD_TOKEN_PER_MINUTE = 10
REFUSAL_WINDOW = 60.0  # refusals of one kind from one address are audited as one row per window
REFUSAL_KEYS_MAX = 10_000
# The caller's address for the refusal being handled (set by authenticate()).
_client: contextvars.ContextVar[str] = contextvars.ContextVar("ussycode_token_client", default="")
TOUCH_INTERVAL = dt.timedelta(seconds=60)
AUTH_CACHE_TTL = 2.0
AUTH_CACHE_MAX = 10_000

CommandResolver = Callable[[str], str | None]


@dataclass(frozen=True)
class CreatedToken:
    id: str
    token: str  # shown once
    expires_at: dt.datetime | None

    def as_json(self) -> dict[str, str | None]:
        return {"id": self.id, "token": self.token, "expires_at": iso(self.expires_at)}


@dataclass(frozen=True)
class TokenInfo:
    id: str
    cmds: tuple[str, ...] | None
    vm: str | None
    created_at: dt.datetime
    expires_at: dt.datetime | None
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None

    def status(self, now: dt.datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def as_json(self, now: dt.datetime) -> dict[str, object]:
        return {"id": self.id, "cmds": list(self.cmds) if self.cmds is not None else None, "vm": self.vm,
                "created_at": iso(self.created_at), "expires_at": iso(self.expires_at),
                "last_used_at": iso(self.last_used_at), "revoked_at": iso(self.revoked_at),
                "status": self.status(now)}


@dataclass(frozen=True)
class _CachedAuth:
    valid_until: float  # time.monotonic()
    secret_hash: str
    expires_at: dt.datetime | None
    actor: Actor


def _info(row: q.ApiToken) -> TokenInfo:
    return TokenInfo(row.id, row.cmds, row.vm_name, row.created_at, row.expires_at, row.last_used_at,
                     row.revoked_at)


def scoped_commands(cmds: frozenset[str] | None, vm: str | None) -> frozenset[str] | None:
    """The commands a token may run, from its ``cmds`` and VM scope (None: every command)."""
    if vm is None:
        return cmds
    return VM_SCOPED_COMMANDS if cmds is None else cmds & VM_SCOPED_COMMANDS


class TokenService:
    def __init__(self, store: Store, resolve_command: CommandResolver | None = None) -> None:
        """``resolve_command`` maps a command name or alias to its canonical name (None when unknown); the app
        passes the registry's. Without it every name is taken as is."""
        self.store = store
        self._resolve: CommandResolver = resolve_command or (lambda name: name)
        self._cache: dict[str, _CachedAuth] = {}
        self._revocations = 0  # a read that raced a revocation must not be cached
        self._failures = RateLimiter(BAD_TOKEN_PER_MINUTE, BAD_TOKEN_BURST, name="bad_tokens")
        self._refusals: dict[tuple[str, str, str, str], list[Any]] = {}

    # Management -------------------------------------------------------------------------------------------------
    def _canonical_cmds(self, cmds: list[str]) -> list[str]:
        out: set[str] = set()
        for name in cmds:
            canonical = self._resolve(name)
            if canonical is None:
                raise UsageError(f"unknown command {name[:40]!r} in --cmds; see 'help' for the commands")
            out.add(canonical)
        return sorted(out)

    async def create(self, actor: Actor, *, expires_in: dt.timedelta | None = None, cmds: list[str] | None = None,
                     vm: str | None = None) -> CreatedToken:
        if actor.allowed_commands is not None or actor.vm_scope is not None:
            raise Forbidden("a restricted token cannot create tokens; run 'token create' over ssh")
        canonical = self._canonical_cmds(cmds) if cmds is not None else None
        if canonical is not None and not canonical:
            raise UsageError("--cmds needs at least one command, like --cmds=ls,whoami")
        if vm is not None and canonical is not None:
            outside = sorted(set(canonical) - VM_SCOPED_COMMANDS)
            if outside:
                raise UsageError(f"a --vm token cannot run {', '.join(outside)}; with --vm, --cmds may name only: "
                                 + ", ".join(sorted(VM_SCOPED_COMMANDS)))
        new = tk.new_db_token()
        now = utcnow()
        expires_at = now + expires_in if expires_in is not None else None
        limit = actor.token_expires_at
        if limit is not None:  # a token never makes one that outlives it
            if expires_at is None:
                expires_at = limit
            elif expires_at > limit:
                raise UsageError(f"this token expires at {iso(limit)}; a token it creates cannot outlive it: use a "
                                 "shorter --expires (or create tokens over ssh)")

        def tx(c: sa.Connection) -> None:
            vm_id = None
            if vm is not None:
                row = vmq.by_name(c, vm)
                if row is None or row.owner_id != actor.id:
                    raise NotFound(f"no VM named {vm[:40]!r}; see 'ls'")
                vm_id = row.id
            if q.count_active(c, actor.id, now) >= MAX_ACTIVE_TOKENS:
                raise Conflict(f"you have {MAX_ACTIVE_TOKENS} active tokens; revoke some with 'token revoke <id>'")
            q.insert(c, id=new.id, user_id=actor.id, secret_hash=new.secret_hash, cmds=canonical, vm_id=vm_id,
                     created_at=now, expires_at=expires_at)
            audit.record(c, actor_id=actor.id, source=actor.source, action="token.create", target=new.id,
                         cmds=canonical, vm=vm, expires_at=iso(expires_at))

        await self.store.write(tx)
        return CreatedToken(new.id, new.token, expires_at)

    async def list(self, actor: Actor) -> list[TokenInfo]:
        return [_info(r) for r in await self.store.read(lambda c: q.of_user(c, actor.id))]

    async def revoke(self, actor: Actor, token_id: str) -> tuple[TokenInfo, bool]:
        """Revoke one of the actor's tokens; returns it and whether it was active until now."""

        def tx(c: sa.Connection) -> tuple[TokenInfo, bool]:
            row = q.by_prefix(c, token_id) if len(token_id) <= 40 else None
            if row is None or row.user_id != actor.id:
                raise NotFound(f"no token {token_id[:40]!r}; see 'token list'")
            if row.revoked_at is not None:
                return _info(row), False
            now = utcnow()
            q.revoke(c, row.id, now)
            audit.record(c, actor_id=actor.id, source=actor.source, action="token.revoke", target=row.id)
            return TokenInfo(row.id, row.cmds, row.vm_name, row.created_at, row.expires_at, row.last_used_at,
                             now), True

        try:
            return await self.store.write(tx)
        finally:
            self._revocations += 1
            self._cache.pop(token_id, None)

    def forget_user(self, user_id: str) -> None:
        """Drop every remembered verification of this user's tokens (suspension, tier change): the next request
        reads the account again."""
        self._revocations += 1
        self._cache = {k: v for k, v in self._cache.items() if v.actor.id != user_id}

    # Authentication ---------------------------------------------------------------------------------------------
    async def _refuse(self, source: str, reason: str, message: str, *, user_id: str | None = None,
                      target: str = "") -> Unauthenticated:
        """Count a refused credential against the caller's address and audit it, aggregated: the first refusal
        of a (source, reason, address, target) in a :data:`REFUSAL_WINDOW` writes a row and a log line, later ones
        only count, and the next row and line carry how many were folded (``repeated``). The token itself is never
        recorded."""
        client = _client.get("")
        if client:
            with contextlib.suppress(RateLimited):
                self._failures.take(client)
        key = (source, reason, client, target)
        now = time.monotonic()
        window = self._refusals.get(key)
        if window is not None and now - window[0] < REFUSAL_WINDOW:
            window[1] += 1
        else:
            repeated = window[1] - 1 if window is not None else 0
            if len(self._refusals) > REFUSAL_KEYS_MAX:
                self._refusals = {k: v for k, v in self._refusals.items() if now - v[0] < REFUSAL_WINDOW}
            self._refusals[key] = [now, 1]
            extra = {"repeated": repeated} if repeated else {}
            log.info("refused %s token (%s) %s from %s%s", source, reason, target, client or "?",
                     f" ({repeated} more since the last line)" if repeated else "")
            await self.store.write(lambda c: audit.record(c, actor_id=user_id, source=source, action="token.refused",
                                                          target=target, reason=reason, client=client[:64],
                                                          **extra))
        return Unauthenticated(message, log_message=f"token refused: {reason} {target}", reason=reason)

    async def authenticate(self, bearer: str, *, source: str = "api", client: str = "") -> Actor:
        """The actor a Bearer credential stands for, or :class:`Unauthenticated` (audited, aggregated).

        ``client`` is the caller's address: after :data:`BAD_TOKEN_BURST` refusals it gets
        :class:`~ussycode.errors.RateLimited` (refilled at :data:`BAD_TOKEN_PER_MINUTE`) before any check runs,
        so a flood of bad tokens costs neither hashing nor DB writes."""
        if client:
            self._failures.check(client)
        token = _client.set(client)
        try:
            actor = await self._authenticate(bearer, source)
        finally:
            _client.reset(token)
        if actor.user.suspended:
            raise Suspended(actor.user.suspend_reason)
        return actor

    async def _authenticate(self, bearer: str, source: str) -> Actor:
        if not bearer:
            raise await self._refuse(source, "missing", "missing token: send 'Authorization: Bearer <token>'; "
                                                        "create one with 'token create'")
        if len(bearer) > tk.MAX_TOKEN_LEN:
            raise await self._refuse(source, "malformed", "malformed token (too long)")
        kind = tk.token_kind(bearer)
        if kind == tk.USY1:
            return await self._authenticate_db(bearer, source)
        if kind == tk.USY0:
            return await self._authenticate_stateless(bearer, source)
        raise await self._refuse(source, "malformed", "unrecognized token: expected usy1.… (token create) or usy0.… "
                                                      "(signed with ssh-keygen)")

    async def _authenticate_db(self, bearer: str, source: str) -> Actor:
        try:
            ref = tk.parse_db_token(bearer)
        except tk.TokenError as exc:
            raise await self._refuse(source, exc.reason, str(exc)) from None
        hit = self._cache.get(ref.id)
        if (hit is not None and hit.valid_until > time.monotonic() and hit.actor.source == source
                and tk.secret_matches(ref, hit.secret_hash)
                and (hit.expires_at is None or hit.expires_at > utcnow())):
            return hit.actor
        revocations = self._revocations

        def read(c: sa.Connection) -> tuple[q.ApiToken | None, User | None]:
            row = q.by_prefix(c, ref.id)
            return row, (userq.by_id(c, row.user_id) if row else None)

        row, user = await self.store.read(read)
        # Compare the secret even when the id is unknown, so timing does not tell ids apart.
        matches = tk.secret_matches(ref, row.secret_hash if row else "0" * 64)
        if row is None or user is None or not matches:
            raise await self._refuse(source, "invalid", "invalid token", target=ref.id)
        now = utcnow()
        if row.revoked_at is not None:
            raise await self._refuse(source, "revoked", f"token {row.id} was revoked", user_id=user.id, target=row.id)
        if row.expires_at is not None and row.expires_at <= now:
            raise await self._refuse(source, "expired", f"token {row.id} has expired; create a new one",
                                     user_id=user.id, target=row.id)
        if row.last_used_at is None or now - row.last_used_at >= TOUCH_INTERVAL:
            await self.store.write(lambda c: q.touch(c, row.id, now))
        cmds = frozenset(row.cmds) if row.cmds is not None else None
        actor = Actor(user=user, source=source, allowed_commands=scoped_commands(cmds, row.vm_name),
                      vm_scope=row.vm_name, token_id=row.id, token_expires_at=row.expires_at)
        if revocations == self._revocations:
            self._remember(row, actor)
        return actor

    def _remember(self, row: q.ApiToken, actor: Actor) -> None:
        now = time.monotonic()
        if len(self._cache) >= AUTH_CACHE_MAX:
            self._cache = {k: v for k, v in self._cache.items() if v.valid_until > now}
            if len(self._cache) >= AUTH_CACHE_MAX:
                self._cache.clear()
        self._cache[row.id] = _CachedAuth(now + AUTH_CACHE_TTL, row.secret_hash, row.expires_at, actor)

    async def _authenticate_stateless(self, bearer: str, source: str) -> Actor:
        try:
            token = tk.parse_stateless_token(bearer)
            tk.check_times(token.perms, int(time.time()))
        except tk.TokenError as exc:
            raise await self._refuse(source, exc.reason, str(exc)) from None
        fingerprint = token.sig.fingerprint
        perms = token.perms

        def read(c: sa.Connection) -> tuple[userq.SshKey | None, User | None, vmq.Vm | None]:
            key = userq.key_by_fingerprint(c, fingerprint)
            user = userq.by_id(c, key.user_id) if key else None
            vm = vmq.by_name(c, perms.vm) if perms.vm and user else None
            return key, user, vm

        key, user, vm = await self.store.read(read)
        if key is None or user is None:
            raise await self._refuse(source, "unknown_key", "the key that signed this token is not registered "
                                                            "(was it removed?)", target=fingerprint)
        try:
            tk.verify_stateless(token, asyncssh.import_public_key(key.public_key))
        except tk.TokenError as exc:
            raise await self._refuse(source, exc.reason, str(exc), target=fingerprint) from None
        cmds: frozenset[str] | None = None
        if perms.cmds is not None:
            resolved = [self._resolve(name) for name in perms.cmds]
            if any(r is None for r in resolved):
                raise await self._refuse(source, "bad_perms", "perms: 'cmds' names an unknown command",
                                         user_id=user.id, target=fingerprint)
            cmds = frozenset(r for r in resolved if r is not None)
        if perms.vm is not None and (vm is None or vm.owner_id != user.id):
            raise await self._refuse(source, "bad_vm", f"perms: no VM named {perms.vm!r} of yours",
                                     user_id=user.id, target=fingerprint)
        return Actor(user=user, source=source, fingerprint=fingerprint,
                     allowed_commands=scoped_commands(cmds, perms.vm), vm_scope=perms.vm,
                     token_id=f"usy0:{fingerprint}",
                     token_expires_at=dt.datetime.fromtimestamp(perms.exp, dt.UTC).replace(tzinfo=None))

    async def record_forbidden(self, actor: Actor, command: str) -> None:
        """Audit a command the actor's token does not permit (HTTP 403)."""
        await self.store.write(lambda c: audit.record(c, actor_id=actor.id, source=actor.source,
                                                      action="token.forbidden", target=actor.token_id or "",
                                                      command=command))

    async def authenticate_for_vm(self, bearer: str, vm_name: str, *, client: str = "") -> Actor | None:
        """For forward-auth on ``https://<vm>.<domain>/``: the actor when ``bearer`` is valid for that VM, else None.

        Valid means: a good token that is either scoped to this VM (``--vm``; any ``cmds``) or unrestricted (no
        ``cmds``, no VM). A token scoped to another VM, or an unscoped token limited by ``cmds``, is refused.
        Whether the user may open the VM at all (owner or shared) is the caller's check.
        """
        try:
            actor = await self.authenticate(bearer, source="proxy", client=client)
        except (Unauthenticated, Forbidden):
            return None
        token = _client.set(client)
        if actor.vm_scope is not None:
            ok = actor.vm_scope == vm_name
        else:
            ok = actor.allowed_commands is None
        try:
            if not ok:
                await self._refuse("proxy", "wrong_scope", "", user_id=actor.id, target=actor.token_id or "")
                return None
            return actor
        finally:
            _client.reset(token)
