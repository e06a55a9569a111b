"""Browser sign-in: one-time login links, web sessions, and the hand-off that gives each VM host its own cookie.

- ``browser`` (SSH) makes a one-time login token (5 minutes). Opening its URL on the apex creates an apex
  session (cookie on the apex host only).
- A VM host (or verified custom domain) cannot read the apex cookie. The apex turns its session into a signed,
  one-time hand-off code bound to that host and to the VM's id, only for a host the user may open;
  ``https://<vm>.<domain>/__ussycode/auth?code=…`` (answered by ussycode on every host, never by the VM) redeems
  it for a child session whose cookie belongs to that host only. A child is valid only while its parent is, and
  only for that VM: after ``rm`` and a new VM of the same name, the old cookie opens nothing.
- Logging out revokes the whole family (the root session and every child).

Secrets never rest in the DB: tokens and session ids are stored as SHA-256 with a purpose prefix (so a secret of
one kind can never be replayed as another). Everything is in the DB, so sessions survive a restart. Each check
reads the DB (no cache): a revoked session is refused on the next request.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from ussycode.auth.identity import Actor
from ussycode.config import Settings, TlsMode
from ussycode.store import audit
from ussycode.store import sessions as sessq
from ussycode.store.db import Store
from ussycode.store.schema import utcnow

LOGIN_TOKEN_TTL = dt.timedelta(minutes=5)
HANDOFF_TTL = dt.timedelta(seconds=60)
SESSION_TTL = dt.timedelta(days=7)
_SECRET_RE_LEN = (20, 100)


def _hash(purpose: str, secret: str) -> str:
    return hashlib.sha256(f"{purpose}:{secret}".encode()).hexdigest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_or_create_secret(path: Path) -> bytes:
    """The server's signing key (32 random bytes, mode 0600), kept across restarts."""
    try:
        data = path.read_bytes()
        if len(data) >= 32:
            return data
    except FileNotFoundError:
        pass
    data = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return data


@dataclass(frozen=True)
class WebSession:
    id_hash: str
    user_id: str
    handle: str
    email: str | None
    host: str
    parent_hash: str | None
    expires_at: dt.datetime
    vm_id: str | None = None  # the VM a VM-host session was made for

    @property
    def root_hash(self) -> str:
        return self.parent_hash or self.id_hash

    @property
    def seconds_left(self) -> float:
        """Until the session expires (``expires_at`` is naive UTC)."""
        return (self.expires_at - dt.datetime.now(dt.UTC).replace(tzinfo=None)).total_seconds()


def _plausible(secret: str) -> bool:
    return _SECRET_RE_LEN[0] <= len(secret) <= _SECRET_RE_LEN[1] and secret.isascii()


class SessionService:
    def __init__(self, store: Store, key: bytes) -> None:
        self.store = store
        self._key = key

    # Login links (``browser``) ---------------------------------------------------------------------------------
    async def create_login_token(self, actor: Actor) -> str:
        token = secrets.token_urlsafe(32)
        now = utcnow()

        def tx(c: sa.Connection) -> None:
            sessq.add_one_time(c, _hash("login", token), actor.id, now, LOGIN_TOKEN_TTL)
            audit.record(c, actor_id=actor.id, source=actor.source, action="web.login_link")

        await self.store.write(tx)
        return token

    async def redeem_login_token(self, token: str, host: str, *, client: str = "") -> tuple[str, WebSession] | None:
        """Use a login token once: a new root session for ``host`` (the apex). None if invalid/used/expired."""
        if not _plausible(token):
            return None
        secret = secrets.token_urlsafe(32)
        id_hash = _hash("session", secret)
        now = utcnow()

        def tx(c: sa.Connection) -> WebSession | None:
            user_id = sessq.use_one_time(c, _hash("login", token), now)
            names = None if user_id is None else sessq.user_names(c, user_id)
            if user_id is None or names is None:
                return None
            expires = now + SESSION_TTL
            sessq.add_session(c, id_hash=id_hash, user_id=user_id, host=host, parent_hash=None, vm_id=None,
                              now=now, expires_at=expires)
            audit.record(c, actor_id=user_id, source="web", action="web.login", target=host, client=client[:64])
            return WebSession(id_hash, user_id, names[0], names[1], host, None, expires)

        session = await self.store.write(tx)
        return None if session is None else (secret, session)

    # Sessions ----------------------------------------------------------------------------------------------------
    async def validate(self, secret: str | None, host: str, vm_id: str | None = None) -> WebSession | None:
        """The live session behind a cookie on ``host`` (not revoked, not expired, parent alive too; for a VM
        host, made for the VM ``vm_id``)."""
        if not secret or not _plausible(secret):
            return None
        return await self.store.read(lambda c: session_row(c, secret, host, vm_id))

    async def revoke_family(self, session: WebSession, *, source: str = "web") -> int:
        """Log out: revoke the root session and all its children. Returns how many were revoked."""
        root = session.root_hash
        now = utcnow()

        def tx(c: sa.Connection) -> int:
            n = sessq.revoke_family(c, root, now)
            audit.record(c, actor_id=session.user_id, source=source, action="web.logout", target=session.host,
                         sessions=n)
            return int(n)

        return await self.store.write(tx)

    # Hand-off to a VM host -------------------------------------------------------------------------------------
    def _sign(self, payload: bytes) -> str:
        return _b64(hmac.new(self._key, payload, hashlib.sha256).digest())

    async def create_handoff(self, parent: WebSession, host: str, vm_id: str) -> str:
        """A signed one-time code that lets ``host`` (serving the VM ``vm_id``) create a child of ``parent``
        (60 s). The caller checks that the user may open that host."""
        nonce = secrets.token_urlsafe(18)
        now = utcnow()
        payload = json.dumps({"p": parent.root_hash, "h": host, "v": vm_id, "n": nonce,
                              "e": int((now + HANDOFF_TTL).replace(tzinfo=dt.UTC).timestamp())},
                             separators=(",", ":")).encode()
        await self.store.write(lambda c: sessq.add_one_time(c, _hash("handoff", nonce), parent.user_id, now,
                                                            HANDOFF_TTL))
        return f"{_b64(payload)}.{self._sign(payload)}"

    async def redeem_handoff(self, code: str, host: str, vm_id: str) -> tuple[str, WebSession] | None:
        """Check the signature, host, VM, expiry and one-time use; then a child session for ``host`` and that VM
        (``vm_id`` is the VM that serves ``host`` now)."""
        body, _, sig = code.partition(".")
        if not body or not sig or len(code) > 600:
            return None
        try:
            payload = _unb64(body)
            ok = hmac.compare_digest(self._sign(payload), sig)
            data = json.loads(payload) if ok else None
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(data, dict) or data.get("h") != host or data.get("v") != vm_id:
            return None
        parent_hash, nonce, exp = data.get("p"), data.get("n"), data.get("e")
        if not isinstance(parent_hash, str) or not isinstance(nonce, str) or not isinstance(exp, int):
            return None
        now = utcnow()
        if exp < int(now.replace(tzinfo=dt.UTC).timestamp()):
            return None
        secret = secrets.token_urlsafe(32)
        id_hash = _hash("session", secret)

        def tx(c: sa.Connection) -> WebSession | None:
            if sessq.use_one_time(c, _hash("handoff", nonce), now) is None:
                return None
            parent = sessq.session(c, parent_hash)
            if parent is None or parent.revoked_at is not None or parent.expires_at <= now:
                return None
            sessq.add_session(c, id_hash=id_hash, user_id=parent.user_id, host=host, parent_hash=parent_hash,
                              vm_id=vm_id, now=now, expires_at=parent.expires_at)
            return WebSession(id_hash, parent.user_id, parent.handle, parent.email, host, parent_hash,
                              parent.expires_at, vm_id)

        session = await self.store.write(tx)
        return None if session is None else (secret, session)

    # CSRF ----------------------------------------------------------------------------------------------------------
    def csrf_token(self, session: WebSession) -> str:
        return self._sign(f"csrf:{session.id_hash}".encode())

    def check_csrf(self, session: WebSession, token: str) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_token(session), token)

    async def purge_expired(self) -> None:
        """Drop long-dead rows (expired a day ago) so the tables stay small."""
        cutoff = utcnow() - dt.timedelta(days=1)

        await self.store.write(lambda c: sessq.purge(c, cutoff))


def cookie_name(settings: Settings) -> str:
    """The apex session cookie: ``__Host-`` prefixed (Secure, host-only, path /) unless --tls off."""
    return "ussy_session" if settings.tls is TlsMode.OFF else "__Host-ussy_session"


def session_row(c: sa.Connection, secret: str | None, host: str, vm_id: str | None = None) -> WebSession | None:
    """The live session behind ``secret`` on ``host``, read in ``c`` (None if unknown, revoked, expired, for
    another host, its parent is no longer alive, or — for a VM host — made for another VM than ``vm_id``)."""
    if not secret or not _plausible(secret):
        return None
    now = utcnow()
    row = sessq.session(c, _hash("session", secret))
    if row is None or row.revoked_at is not None or row.expires_at <= now or row.host != host:
        return None
    if row.vm_id != vm_id:
        return None
    if row.parent_hash is not None:
        parent = sessq.session(c, row.parent_hash)
        if parent is None or parent.revoked_at is not None or parent.expires_at <= now:
            return None
    return WebSession(row.id_hash, row.user_id, row.handle, row.email, row.host, row.parent_hash, row.expires_at,
                      row.vm_id)
