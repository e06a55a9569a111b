"""Who may open a VM's URLs: public ports, per-user shares, share links and custom domains.

Owner-facing calls (``share …`` commands) take an :class:`Actor` and write an audit row per change; each change
publishes ``VmEvent("changed")`` so the route service updates Caddy before the command returns (a public route
skips forward-auth, so a stale one would let requests through). The SQL lives in :mod:`ussycode.store.shares`.

Share links open one URL (the main one, or ``<port>-<vm>`` with ``--port``); their tokens are shown once and kept
only as hashes; each has a short id for ``share show`` and ``share remove-link``. Custom domains: several VMs
may claim a domain while pending; the first to prove it with the TXT record gets it, the other claims are
dropped, and pending claims expire after ``--cname-claim-days``.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import sqlalchemy as sa

from ussycode.auth.identity import Actor
from ussycode.auth.links import LINK_ID_LEN, link_token_hash, new_link_id, new_link_token
from ussycode.errors import Conflict, NotFound, RuntimeFailure, UsageError
from ussycode.services.events import EventBus, VmEvent
from ussycode.services.vms import VmService
from ussycode.store import audit
from ussycode.store import shares as shareq
from ussycode.store import users as userq
from ussycode.store.db import Store
from ussycode.store.schema import utcnow
from ussycode.store.shares import AccessRecord, access_record
from ussycode.store.vms import Vm
from ussycode.validate import email_address, printable_text

__all__ = ["AccessRecord", "ShareService", "access_record", "link_token_hash"]

log = logging.getLogger(__name__)

MAIN_PORT = 8080
PORT_MIN, PORT_MAX = 3000, 9999
MAX_LINKS_PER_VM = 50
MAX_SHARES_PER_VM = 200
MAX_CNAMES_PER_VM = 10
MAX_LINK_LIFETIME = dt.timedelta(days=365)
VERIFY_PREFIX = "_ussycode-verify."

_DURATION_RE = re.compile(r"^(\d{1,6})([smhdw])$")
_DOMAIN_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_LINK_ID_RE = re.compile(r"^[a-z0-9]{" + str(LINK_ID_LEN) + "}$")
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
    domain = printable_text(domain, "domain", max_len=254, allow_empty=False).strip(" ").lower().rstrip(".")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise UsageError("invalid domain: not a valid internationalised name") from None
    if not 3 <= len(domain) <= 253 or "." not in domain:
        raise UsageError("invalid domain: use a full name like app.example.com")
    if not all(_DOMAIN_LABEL_RE.fullmatch(label) for label in domain.split(".")):
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


@dataclass(frozen=True)
class LinkInfo:
    id: str
    port: int
    url: str  # with the token only right after add-link; the bare URL it opens afterwards
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
class CnameInfo:
    domain: str
    vm: str
    token: str
    verified: bool
    created: bool


def link_reference(text: str) -> tuple[str | None, str | None]:
    """What ``share remove-link`` was given: (link id, None) or (None, token hash) for a token or a whole link
    URL as add-link printed it."""
    text = text.strip()
    if "?" in text or "://" in text:
        tokens = parse_qs(urlsplit(text).query).get("ussy_share", [])
        if len(tokens) != 1 or not tokens[0]:
            raise UsageError("that URL has no ussy_share token; give the link's id from 'share show'")
        return None, link_token_hash(tokens[0])
    if _LINK_ID_RE.match(text):
        return text, None
    return None, link_token_hash(text)


class ShareService:
    def __init__(self, store: Store, vms: VmService, events: EventBus, txt_lookup: TxtLookup | None = None) -> None:
        self.store = store
        self.vms = vms
        self.settings = vms.settings
        self.events = events
        self.txt_lookup = txt_lookup or dns_txt_lookup

    def port_url(self, vm_name: str, port: int) -> str:
        return self.vms.url(vm_name if port == MAIN_PORT else f"{port}-{vm_name}")

    def link_url(self, vm_name: str, port: int, token: str) -> str:
        return f"{self.port_url(vm_name, port)}/?ussy_share={token}"

    @property
    def claim_ttl(self) -> dt.timedelta:
        return dt.timedelta(days=self.settings.cname_claim_days)

    async def _changed(self, vm: Vm) -> None:
        await self.events.publish(VmEvent("changed", vm.id, vm.name))

    # Owner-facing ----------------------------------------------------------------------------------------------
    async def show(self, actor: Actor, vm_name: str) -> ShareInfo:
        vm = await self.vms.get(actor, vm_name)
        cutoff = utcnow() - self.claim_ttl

        def read(c: sa.Connection) -> ShareInfo:
            ports = shareq.public_ports(c, vm.id)
            links = [LinkInfo(ln.id, ln.port, self.port_url(vm.name, ln.port), ln.expires_at, ln.uses)
                     for ln in shareq.links_of(c, vm.id)]
            cnames = [(cl.domain, cl.verified_at is not None) for cl in shareq.claims_of_vm(c, vm.id)
                      if cl.verified_at is not None or cl.created_at >= cutoff]
            return ShareInfo(vm.name, MAIN_PORT in ports, [p for p in ports if p != MAIN_PORT],
                             shareq.sharees(c, vm.id), links, cnames)

        return await self.store.read(read)

    async def set_public(self, actor: Actor, vm_name: str, public: bool, port: int = MAIN_PORT) -> bool:
        """Make ``port`` public (or private again). Returns False when it already was."""
        port = validate_port(port)
        vm = await self.vms.get(actor, vm_name)

        def tx(c: sa.Connection) -> bool:
            if not shareq.set_port_public(c, vm.id, port, public):
                return False
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
            email = email_address(who).lower()
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
            if shareq.share_exists(c, vm.id, user_id=user_id, email=email):
                return False
            count = shareq.count_shares(c, vm.id)
            if count >= MAX_SHARES_PER_VM:
                raise Conflict(f"{vm.name} is shared with {count} people already (the limit)")
            shareq.add_share(c, vm.id, user_id=user_id, email=email, created_by=actor.id)
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
            deleted = shareq.remove_share(c, vm.id, user_id=user.id if user else None,
                                          email=who if user is None else None)
            if not deleted:
                raise NotFound(f"{vm.name} is not shared with {who[:60]!r}; see 'share show {vm.name}'")
            audit.record(c, actor_id=actor.id, source=actor.source, action="share.remove", target=vm.name, who=who)

        await self.store.write(tx)
        await self._changed(vm)

    async def add_link(self, actor: Actor, vm_name: str, expires: dt.timedelta | None = None,
                       port: int = MAIN_PORT) -> LinkInfo:
        """A new link to one URL of the VM. The returned ``url`` carries the token: the only time it is shown."""
        port = validate_port(port)
        vm = await self.vms.get(actor, vm_name)
        token, link_id = new_link_token(), new_link_id()
        now = utcnow()
        expires_at = now + expires if expires is not None else None

        def tx(c: sa.Connection) -> None:
            count = shareq.count_links(c, vm.id)
            if count >= MAX_LINKS_PER_VM:
                raise Conflict(f"{vm.name} has {count} share links (the limit); remove some with share remove-link")
            shareq.add_link(c, link_id=link_id, token_hash=link_token_hash(token), vm_id=vm.id, port=port,
                            created_by=actor.id, created_at=now, expires_at=expires_at)
            audit.record(c, actor_id=actor.id, source=actor.source, action="share.add_link", target=vm.name,
                         link=link_id, port=port,
                         expires_at=None if expires_at is None else expires_at.isoformat())

        await self.store.write(tx)
        await self._changed(vm)
        return LinkInfo(link_id, port, self.link_url(vm.name, port, token), expires_at, 0)

    async def remove_link(self, actor: Actor, vm_name: str, reference: str) -> None:
        """Revoke a link given by its id, its token, or the whole URL add-link printed."""
        vm = await self.vms.get(actor, vm_name)
        link_id, token_hash = link_reference(reference)

        def tx(c: sa.Connection) -> None:
            if not shareq.remove_link(c, vm.id, link_id=link_id, token_hash=token_hash):
                raise NotFound(f"{vm.name} has no such share link; see 'share show {vm.name}' for link ids")
            audit.record(c, actor_id=actor.id, source=actor.source, action="share.remove_link", target=vm.name,
                         link=link_id or "by-token")

        await self.store.write(tx)
        await self._changed(vm)

    async def count_link_use(self, token: str) -> None:
        await self.store.write(lambda c: shareq.count_link_use(c, link_token_hash(token)))

    # Custom domains ----------------------------------------------------------------------------------------------
    async def cname_add(self, actor: Actor, vm_name: str, domain: str) -> CnameInfo:
        """Claim ``domain`` for the VM (pending until verified). Another VM's pending claim does not block it;
        a verified one does."""
        vm = await self.vms.get(actor, vm_name)
        domain = validate_custom_domain(domain, self.settings.domain)
        cutoff = utcnow() - self.claim_ttl

        def tx(c: sa.Connection) -> CnameInfo:
            shareq.purge_expired_claims(c, cutoff)
            owner = shareq.verified_claim(c, domain)
            if owner is not None and owner.vm_id != vm.id:
                raise Conflict(f"{domain} is already verified for another VM")
            mine = shareq.claim(c, domain, vm.id)
            if mine is not None:
                return CnameInfo(domain, vm.name, mine.verify_token, mine.verified_at is not None, False)
            count = len(shareq.claims_of_vm(c, vm.id))
            if count >= MAX_CNAMES_PER_VM:
                raise Conflict(f"{vm.name} has {count} custom domains (the limit)")
            token = "ussycode-" + secrets.token_hex(16)
            shareq.add_claim(c, domain, vm.id, token)
            audit.record(c, actor_id=actor.id, source=actor.source, action="share.cname_add", target=vm.name,
                         domain=domain)
            return CnameInfo(domain, vm.name, token, False, True)

        return await self.store.write(tx)

    async def cname_verify(self, actor: Actor, vm_name: str, domain: str) -> tuple[bool, str, list[str]]:
        """Check the TXT proof; returns (verified, expected token, values found). The first claim to verify
        gets the domain; the other pending claims are dropped."""
        vm = await self.vms.get(actor, vm_name)
        domain = validate_custom_domain(domain, self.settings.domain)
        cutoff = utcnow() - self.claim_ttl
        mine = await self.store.read(lambda c: shareq.claim(c, domain, vm.id))
        if mine is None or (mine.verified_at is None and mine.created_at < cutoff):
            raise NotFound(f"{domain} is not claimed by {vm.name} (or the claim expired); "
                           f"run: share cname {vm.name} {domain}")
        if mine.verified_at is not None:
            return True, mine.verify_token, []
        found = await self.txt_lookup(VERIFY_PREFIX + domain)
        if mine.verify_token not in [v.strip() for v in found]:
            return False, mine.verify_token, found

        def tx(c: sa.Connection) -> None:
            owner = shareq.verified_claim(c, domain)
            if owner is not None and owner.vm_id != vm.id:
                raise Conflict(f"{domain} was verified for another VM first")
            if shareq.claim(c, domain, vm.id) is None:
                raise NotFound(f"{domain} is no longer claimed by {vm.name}")
            dropped = shareq.mark_verified(c, domain, vm.id)
            audit.record(c, actor_id=actor.id, source=actor.source, action="share.cname_verify", target=vm.name,
                         domain=domain, other_claims_dropped=dropped)

        await self.store.write(tx)
        await self._changed(vm)
        return True, mine.verify_token, found

    async def cname_remove(self, actor: Actor, vm_name: str, domain: str) -> None:
        vm = await self.vms.get(actor, vm_name)
        domain = validate_custom_domain(domain, self.settings.domain)

        def tx(c: sa.Connection) -> None:
            if not shareq.remove_claim(c, domain, vm.id):
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
        return await self.store.read(shareq.verified_cnames)

    async def vm_names(self) -> frozenset[str]:
        return await self.store.read(shareq.vm_names)
