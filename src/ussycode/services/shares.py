"""Who may open a VM's URLs: public ports, per-user shares, share links and custom domains.

Owner-facing calls (``share …`` commands) take an :class:`Actor` and write an audit row per change; each change
publishes ``VmEvent("changed")`` so the route service updates Caddy before the command returns (a public route
skips forward-auth, so a stale one would let requests through). :meth:`ShareService.lookup` is what the
forward-auth endpoint reads on every request: one read transaction, no caching, so a removal takes effect on the
very next request.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import sqlalchemy as sa

from ussycode.auth.identity import Actor
from ussycode.errors import Conflict, NotFound, RuntimeFailure, UsageError
from ussycode.services.events import EventBus, VmEvent
from ussycode.services.vms import VmService
from ussycode.store import audit
from ussycode.store import users as userq
from ussycode.store.db import Store
from ussycode.store.schema import custom_domains, share_links, users, utcnow, vm_public_ports, vm_shares, vms
from ussycode.store.vms import Vm
from ussycode.types import VmStatus

log = logging.getLogger(__name__)

MAIN_PORT = 8080
PORT_MIN, PORT_MAX = 3000, 9999
MAX_LINKS_PER_VM = 50
MAX_SHARES_PER_VM = 200
MAX_CNAMES_PER_VM = 10
MAX_LINK_LIFETIME = dt.timedelta(days=365)
VERIFY_PREFIX = "_ussycode-verify."

_EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[a-z0-9-]+(\.[a-z0-9-]+)+$")
_DURATION_RE = re.compile(r"^(\d{1,6})([smhdw])$")
_DOMAIN_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

TxtLookup = Callable[[str], Awaitable[list[str]]]


def parse_duration(text: str) -> dt.timedelta:
    """``30m``, ``24h``, ``7d``, ``2w`` (one unit); at most a year."""
    match = _DURATION_RE.match(text.strip().lower())
    if not match:
        raise UsageError(f"invalid duration {text[:20]!r}: use a number and a unit, like 30m, 24h, 7d or 2w")
    delta = dt.timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
    if delta.total_seconds() <= 0 or delta > MAX_LINK_LIFETIME:
        raise UsageError("a duration must be between 1s and 365d")
    return delta


def validate_custom_domain(domain: str, base_domain: str) -> str:
    """A DNS name we could route (3-253 chars, a dot, labels of [a-z0-9-]) outside our own domain."""
    domain = domain.strip().lower().rstrip(".")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise UsageError("invalid domain: not a valid internationalised name") from None
    if not 3 <= len(domain) <= 253 or "." not in domain:
        raise UsageError("invalid domain: use a full name like app.example.com")
    if not all(_DOMAIN_LABEL_RE.match(label) for label in domain.split(".")):
        raise UsageError("invalid domain: labels are 1-63 letters, digits or '-', not starting or ending with '-'")
    if domain == base_domain or domain.endswith("." + base_domain):
        raise UsageError(f"{domain} is under this server's domain; VM URLs there need no custom domain")
    return domain


def validate_port(port: int) -> int:
    if port != MAIN_PORT and not PORT_MIN <= port <= PORT_MAX:
        raise UsageError(f"--port must be {MAIN_PORT} or between {PORT_MIN} and {PORT_MAX}")
    return port


async def dns_txt_lookup(name: str) -> list[str]:
    """TXT records of ``name`` (empty when there are none). Raises RuntimeFailure when DNS cannot answer."""
    import dns.asyncresolver
    import dns.exception
    import dns.resolver

    try:
        answer = await dns.asyncresolver.resolve(name, "TXT", lifetime=8.0)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException as exc:
        raise RuntimeFailure(f"could not look up TXT {name}: {exc.__class__.__name__}; try again later") from exc
    values = []
    for record in answer:
        values.append(b"".join(record.strings).decode(errors="replace"))
    return values


def new_link_token() -> str:
    """A share-link token (24 random bytes, base64url) that never starts with '-' or '_': people paste it as a
    command argument (`share remove-link <vm> <token>`), where a leading '-' would read as an option."""
    while True:
        token = secrets.token_urlsafe(24)
        if token[0].isalnum():
            return token


@dataclass(frozen=True)
class LinkInfo:
    token: str
    url: str
    expires_at: dt.datetime | None  # naive UTC
    uses: int


@dataclass(frozen=True)
class ShareInfo:
    vm: str
    public: bool
    ports: list[int]  # public ports besides 8080
    users: list[str]  # handles and e-mail addresses
    links: list[LinkInfo]
    cnames: list[tuple[str, bool]]  # (domain, verified)


@dataclass(frozen=True)
class AccessRecord:
    """What forward-auth needs about one VM, read in one transaction."""

    vm_id: str
    name: str
    owner_id: str
    status: VmStatus
    public_ports: frozenset[int]
    cnames: frozenset[str]
    user_ids: frozenset[str]
    emails: frozenset[str]
    links: tuple[tuple[str, dt.datetime | None], ...]  # (token, expires_at naive UTC)


@dataclass(frozen=True)
class CnameInfo:
    domain: str
    vm: str
    token: str
    verified: bool
    created: bool


class ShareService:
    def __init__(self, store: Store, vms: VmService, events: EventBus, txt_lookup: TxtLookup | None = None) -> None:
        self.store = store
        self.vms = vms
        self.settings = vms.settings
        self.events = events
        self.txt_lookup = txt_lookup or dns_txt_lookup

    def link_url(self, vm_name: str, token: str) -> str:
        return f"{self.vms.url(vm_name)}/?ussy_share={token}"

    async def _changed(self, vm: Vm) -> None:
        await self.events.publish(VmEvent("changed", vm.id, vm.name))

    # Owner-facing ----------------------------------------------------------------------------------------------
    async def show(self, actor: Actor, vm_name: str) -> ShareInfo:
        vm = await self.vms.get(actor, vm_name)

        def read(c: sa.Connection) -> ShareInfo:
            ports = sorted(r[0] for r in c.execute(sa.select(vm_public_ports.c.port)
                                                   .where(vm_public_ports.c.vm_id == vm.id)))
            rows = c.execute(
                sa.select(users.c.handle, vm_shares.c.email)
                .select_from(vm_shares.outerjoin(users, users.c.id == vm_shares.c.user_id))
                .where(vm_shares.c.vm_id == vm.id).order_by(vm_shares.c.id)
            ).all()
            who = [r[0] or r[1] for r in rows]
            links = [
                LinkInfo(r.token, self.link_url(vm.name, r.token), r.expires_at, r.uses)
                for r in c.execute(sa.select(share_links).where(share_links.c.vm_id == vm.id)
                                   .order_by(share_links.c.created_at, share_links.c.token))
            ]
            cnames = [
                (r.domain, r.verified_at is not None)
                for r in c.execute(sa.select(custom_domains).where(custom_domains.c.vm_id == vm.id)
                                   .order_by(custom_domains.c.domain))
            ]
            return ShareInfo(vm.name, MAIN_PORT in ports, [p for p in ports if p != MAIN_PORT], who, links, cnames)

        return await self.store.read(read)

    async def set_public(self, actor: Actor, vm_name: str, public: bool, port: int = MAIN_PORT) -> bool:
        """Make ``port`` public (or private again). Returns False when it already was."""
        port = validate_port(port)
        vm = await self.vms.get(actor, vm_name)

        def tx(c: sa.Connection) -> bool:
            where = (vm_public_ports.c.vm_id == vm.id) & (vm_public_ports.c.port == port)
            exists = c.execute(sa.select(vm_public_ports).where(where)).first() is not None
            if exists == public:
                return False
            if public:
                c.execute(vm_public_ports.insert().values(vm_id=vm.id, port=port))
            else:
                c.execute(vm_public_ports.delete().where(where))
            audit.record(c, actor_id=actor.id, source=actor.source,
                         action="share.set_public" if public else "share.set_private", target=vm.name, port=port)
            return True

        changed = await self.store.write(tx)
        if changed:
            await self._changed(vm)
        return changed

    async def _resolve_who(self, who: str) -> tuple[str | None, str | None, str]:
        """(user_id, email, label) for a handle or an e-mail address."""
        who = who.strip()
        if "@" in who:
            email = who.lower()
            if len(email) > 254 or not _EMAIL_RE.match(email):
                raise UsageError(f"invalid e-mail address {who[:60]!r}")
            return None, email, email
        user = await self.store.read(lambda c: userq.by_handle(c, who.lower()))
        if user is None:
            raise NotFound(f"no user with handle {who[:40]!r}; share by e-mail address instead")
        return user.id, None, user.handle

    async def add_user(self, actor: Actor, vm_name: str, who: str) -> bool:
        vm = await self.vms.get(actor, vm_name)
        user_id, email, label = await self._resolve_who(who)
        if user_id == actor.id or (email is not None and email == (actor.user.email or "").lower()):
            raise UsageError("you own this VM; no need to share it with yourself")

        def tx(c: sa.Connection) -> bool:
            col = vm_shares.c.user_id if user_id else vm_shares.c.email
            value = user_id or email
            if c.execute(sa.select(vm_shares).where(vm_shares.c.vm_id == vm.id, col == value)).first():
                return False
            count = c.execute(sa.select(sa.func.count()).select_from(vm_shares)
                              .where(vm_shares.c.vm_id == vm.id)).scalar_one()
            if count >= MAX_SHARES_PER_VM:
                raise Conflict(f"{vm.name} is shared with {count} people already (the limit)")
            c.execute(vm_shares.insert().values(vm_id=vm.id, user_id=user_id, email=email, created_by=actor.id,
                                                created_at=utcnow()))
            audit.record(c, actor_id=actor.id, source=actor.source, action="share.add", target=vm.name, who=label)
            return True

        changed = await self.store.write(tx)
        if changed:
            await self._changed(vm)
        return changed

    async def remove_user(self, actor: Actor, vm_name: str, who: str) -> None:
        vm = await self.vms.get(actor, vm_name)
        who = who.strip().lower()

        def tx(c: sa.Connection) -> None:
            user = userq.by_handle(c, who) if "@" not in who else None
            cond = vm_shares.c.email == who if user is None else vm_shares.c.user_id == user.id
            deleted = c.execute(vm_shares.delete().where(vm_shares.c.vm_id == vm.id, cond)).rowcount
            if not deleted:
                raise NotFound(f"{vm.name} is not shared with {who[:60]!r}; see 'share show {vm.name}'")
            audit.record(c, actor_id=actor.id, source=actor.source, action="share.remove", target=vm.name, who=who)

        await self.store.write(tx)
        await self._changed(vm)

    async def add_link(self, actor: Actor, vm_name: str, expires: dt.timedelta | None = None) -> LinkInfo:
        vm = await self.vms.get(actor, vm_name)
        token = new_link_token()
        now = utcnow()
        expires_at = now + expires if expires is not None else None

        def tx(c: sa.Connection) -> None:
            count = c.execute(sa.select(sa.func.count()).select_from(share_links)
                              .where(share_links.c.vm_id == vm.id)).scalar_one()
            if count >= MAX_LINKS_PER_VM:
                raise Conflict(f"{vm.name} has {count} share links (the limit); remove some with share remove-link")
            c.execute(share_links.insert().values(token=token, vm_id=vm.id, created_by=actor.id, created_at=now,
                                                  expires_at=expires_at, uses=0))
            audit.record(c, actor_id=actor.id, source=actor.source, action="share.add_link", target=vm.name,
                         token_prefix=token[:6], expires_at=None if expires_at is None else expires_at.isoformat())

        await self.store.write(tx)
        await self._changed(vm)
        return LinkInfo(token, self.link_url(vm.name, token), expires_at, 0)

    async def remove_link(self, actor: Actor, vm_name: str, token: str) -> None:
        vm = await self.vms.get(actor, vm_name)

        def tx(c: sa.Connection) -> None:
            deleted = c.execute(share_links.delete().where(share_links.c.vm_id == vm.id,
                                                           share_links.c.token == token)).rowcount
            if not deleted:
                raise NotFound(f"{vm.name} has no share link {token[:40]!r}; see 'share show {vm.name}'")
            audit.record(c, actor_id=actor.id, source=actor.source, action="share.remove_link", target=vm.name,
                         token_prefix=token[:6])

        await self.store.write(tx)
        await self._changed(vm)

    async def count_link_use(self, token: str) -> None:
        await self.store.write(lambda c: c.execute(
            share_links.update().where(share_links.c.token == token).values(uses=share_links.c.uses + 1)))

    # Custom domains ----------------------------------------------------------------------------------------------
    async def cname_add(self, actor: Actor, vm_name: str, domain: str) -> CnameInfo:
        vm = await self.vms.get(actor, vm_name)
        domain = validate_custom_domain(domain, self.settings.domain)

        def tx(c: sa.Connection) -> CnameInfo:
            row = c.execute(sa.select(custom_domains).where(custom_domains.c.domain == domain)).first()
            if row is not None:
                if row.vm_id != vm.id:
                    raise Conflict(f"{domain} is already attached to another VM")
                return CnameInfo(domain, vm.name, row.verify_token, row.verified_at is not None, False)
            count = c.execute(sa.select(sa.func.count()).select_from(custom_domains)
                              .where(custom_domains.c.vm_id == vm.id)).scalar_one()
            if count >= MAX_CNAMES_PER_VM:
                raise Conflict(f"{vm.name} has {count} custom domains (the limit)")
            token = "ussycode-" + secrets.token_hex(16)
            c.execute(custom_domains.insert().values(domain=domain, vm_id=vm.id, verify_token=token,
                                                     created_at=utcnow(), verified_at=None))
            audit.record(c, actor_id=actor.id, source=actor.source, action="share.cname_add", target=vm.name,
                         domain=domain)
            return CnameInfo(domain, vm.name, token, False, True)

        return await self.store.write(tx)

    async def cname_verify(self, actor: Actor, vm_name: str, domain: str) -> tuple[bool, str, list[str]]:
        """Check the TXT proof; returns (verified, expected token, values found)."""
        vm = await self.vms.get(actor, vm_name)
        domain = validate_custom_domain(domain, self.settings.domain)
        row = await self.store.read(lambda c: c.execute(
            sa.select(custom_domains).where(custom_domains.c.domain == domain,
                                            custom_domains.c.vm_id == vm.id)).first())
        if row is None:
            raise NotFound(f"{domain} is not attached to {vm.name}; run: share cname {vm.name} {domain}")
        token: str = row.verify_token
        found = await self.txt_lookup(VERIFY_PREFIX + domain)
        if token not in [v.strip() for v in found]:
            return False, token, found

        def tx(c: sa.Connection) -> None:
            c.execute(custom_domains.update().where(custom_domains.c.domain == domain)
                      .values(verified_at=row.verified_at or utcnow()))
            audit.record(c, actor_id=actor.id, source=actor.source, action="share.cname_verify", target=vm.name,
                         domain=domain)

        await self.store.write(tx)
        await self._changed(vm)
        return True, token, found

    async def cname_remove(self, actor: Actor, vm_name: str, domain: str) -> None:
        vm = await self.vms.get(actor, vm_name)
        domain = validate_custom_domain(domain, self.settings.domain)

        def tx(c: sa.Connection) -> None:
            deleted = c.execute(custom_domains.delete().where(custom_domains.c.domain == domain,
                                                              custom_domains.c.vm_id == vm.id)).rowcount
            if not deleted:
                raise NotFound(f"{domain} is not attached to {vm.name}")
            audit.record(c, actor_id=actor.id, source=actor.source, action="share.cname_rm", target=vm.name,
                         domain=domain)

        await self.store.write(tx)
        await self._changed(vm)

    # For forward-auth and routes (no actor) --------------------------------------------------------------------
    async def lookup(self, *, vm_name: str | None = None, cname: str | None = None) -> AccessRecord | None:
        """Everything forward-auth needs about the VM behind a host, in one read (by name or verified cname)."""
        return await self.store.read(lambda c: access_record(c, vm_name=vm_name, cname=cname))

    async def verified_cnames(self) -> frozenset[str]:
        return await self.store.read(lambda c: frozenset(r[0] for r in c.execute(
            sa.select(custom_domains.c.domain).where(custom_domains.c.verified_at.is_not(None)))))

    async def vm_names(self) -> frozenset[str]:
        return await self.store.read(lambda c: frozenset(r[0] for r in c.execute(sa.select(vms.c.name))))


# Built once: building SQLAlchemy expressions per request cost more than running them (forward-auth hot path).
_VM_COLS = (vms.c.id, vms.c.name, vms.c.owner_id, vms.c.status)
_Q_VM_BY_NAME = sa.select(*_VM_COLS).where(vms.c.name == sa.bindparam("name"))
_Q_VM_BY_CNAME = (sa.select(*_VM_COLS).select_from(vms.join(custom_domains, custom_domains.c.vm_id == vms.c.id))
                  .where(custom_domains.c.domain == sa.bindparam("domain"), custom_domains.c.verified_at.is_not(None)))
_Q_PORTS = sa.select(vm_public_ports.c.port).where(vm_public_ports.c.vm_id == sa.bindparam("vm_id"))
_Q_CNAMES = sa.select(custom_domains.c.domain).where(custom_domains.c.vm_id == sa.bindparam("vm_id"),
                                                     custom_domains.c.verified_at.is_not(None))
_Q_SHARES = sa.select(vm_shares.c.user_id, vm_shares.c.email).where(vm_shares.c.vm_id == sa.bindparam("vm_id"))
_Q_LINKS = sa.select(share_links.c.token, share_links.c.expires_at).where(share_links.c.vm_id == sa.bindparam("vm_id"))
_Q_LINKS_IN = _Q_LINKS.where(share_links.c.token.in_(sa.bindparam("tokens", expanding=True)))


def access_record(c: sa.Connection, *, vm_name: str | None = None, cname: str | None = None,
                  link_tokens: tuple[str, ...] | None = None) -> AccessRecord | None:
    """The VM behind a host (by name or verified custom domain) with its access rules, read in ``c``.

    ``link_tokens`` limits the share links read to those the request presents (None reads all of them).
    """
    if vm_name is not None:
        row = c.execute(_Q_VM_BY_NAME, {"name": vm_name}).first()
    elif cname is not None:
        row = c.execute(_Q_VM_BY_CNAME, {"domain": cname}).first()
    else:
        return None
    if row is None:
        return None
    p = {"vm_id": row.id}
    ports = frozenset(r[0] for r in c.execute(_Q_PORTS, p))
    cnames = frozenset(r[0] for r in c.execute(_Q_CNAMES, p)) if cname is not None else frozenset()
    shares = c.execute(_Q_SHARES, p).all()
    if link_tokens is None:
        links = tuple((r.token, r.expires_at) for r in c.execute(_Q_LINKS, p))
    elif link_tokens:
        links = tuple((r.token, r.expires_at) for r in c.execute(_Q_LINKS_IN, {**p, "tokens": list(link_tokens[:8])}))
    else:
        links = ()
    return AccessRecord(
        row.id, row.name, row.owner_id, VmStatus(row.status), ports, cnames,
        frozenset(s.user_id for s in shares if s.user_id),
        frozenset(s.email.lower() for s in shares if s.email), links,
    )
