"""Outgoing mail: verifying a user's address, and mail a VM sends to its people.

Everything goes through the relay in ``--smtp-relay`` (``aiosmtplib``: STARTTLS when the relay offers it, login with
``--smtp-relay-user``/``--smtp-relay-password``) from ``--mail-from``. Messages are built with
:class:`email.message.EmailMessage`, which refuses line breaks in header values, and every field is checked for
printable text before that, so no header can be injected. ``users.email`` holds verified addresses only.

A VM may write only to its owner's verified address and to the verified addresses of the people it is shared with
(by handle, or by an address someone verified), 10 messages an hour. Every message sent or refused is in the audit
log with its recipient and subject, never its body.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import aiosmtplib
import sqlalchemy as sa

from ussycode import telemetry
from ussycode.auth.identity import Actor
from ussycode.config import parse_addr
from ussycode.errors import Conflict, Forbidden, RateLimited, Unavailable, UpstreamFailure, UsageError
from ussycode.services.container import Services
from ussycode.services.ratelimit import RateLimiter
from ussycode.store import audit
from ussycode.store import mail as mailq
from ussycode.store.schema import utcnow
from ussycode.validate import email_address, printable_text

SEND_PER_HOUR = 10
CODES_PER_HOUR = 5
CODE_TTL = dt.timedelta(hours=1)
CODE_ATTEMPTS = 5
MAX_SUBJECT = 200
MAX_BODY = 256 * 1024
RELAY_TIMEOUT = 30.0


def _hash(code: str) -> str:
    return hashlib.sha256(code.strip().upper().encode()).hexdigest()


class Outbox:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings
        self.vm_limit = RateLimiter.per_hour(SEND_PER_HOUR, name="mail_out")
        self.code_limit = RateLimiter.per_hour(CODES_PER_HOUR, name="email_codes")

    # --- the relay ------------------------------------------------------------------------------------------
    def _relay(self) -> tuple[str, int]:
        if not self.settings.smtp_relay:
            raise Unavailable("this server sends no mail: it has no relay (--smtp-relay)", reason="no_relay")
        return parse_addr(self.settings.smtp_relay)

    async def _send(self, msg: EmailMessage) -> None:
        host, port = self._relay()
        s = self.settings
        try:
            await aiosmtplib.send(msg, hostname=host, port=port, username=s.smtp_relay_user or None,
                                  password=s.smtp_relay_password or None, start_tls=None,
                                  validate_certs=False, timeout=RELAY_TIMEOUT)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise UpstreamFailure(f"the mail relay did not take the message: {type(exc).__name__}",
                                  log_message=f"relay {host}:{port}: {exc}", reason="relay_failed") from None

    def _message(self, to: str, subject: str, body: str, html: str | None = None,
                 extra: dict[str, str] | None = None) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.settings.sender
        msg["To"] = to
        msg["Subject"] = subject
        msg["Date"] = formatdate(localtime=False, usegmt=True)
        msg["Message-ID"] = make_msgid(domain=self.settings.domain)
        for name, value in (extra or {}).items():
            msg[name] = value
        msg.set_content(body)
        if html is not None:
            msg.add_alternative(html, subtype="html")
        return msg

    # --- addresses ------------------------------------------------------------------------------------------
    async def address(self, user_id: str) -> tuple[str | None, bool]:
        """(the user's address, verified?): a verified one, else one waiting for its code (remembered until the
        next write)."""
        def read(c: sa.Connection) -> tuple[str | None, bool]:
            from ussycode.store.users import by_id

            user = by_id(c, user_id)
            if user is not None and user.email:
                pending = mailq.pending(c, user_id)
                return (pending.address, False) if pending else (user.email, True)
            pending = mailq.pending(c, user_id)
            return (pending.address, False) if pending else (None, False)

        return await self.services.store.read_cached(("email-address", user_id), read)

    async def request_code(self, actor: Actor, raw_address: str) -> str:
        """Send a verification code to ``raw_address``; it becomes the account's address once verified."""
        address = email_address(raw_address)
        self._relay()
        taken = await self.services.store.read(lambda c: mailq.address_taken(c, address, actor.id))
        if taken:
            raise Conflict("that address belongs to another account", reason="email_taken")
        try:
            self.code_limit.take(actor.id)
        except RateLimited as exc:
            raise RateLimited(f"too many verification codes; {exc.user_message}",
                              retry_after=exc.retry_after) from None
        code = "-".join(secrets.token_hex(2).upper() for _ in range(2))
        body = (f"Your ussycode verification code is {code}\n\nIn the lobby, run:\n\n    email verify {code}\n\n"
                f"It is valid for one hour. If you did not ask for it, ignore this message.\n")
        await self._send(self._message(address, "Your ussycode verification code", body))

        def tx(c: sa.Connection) -> None:
            mailq.set_pending(c, actor.id, address, _hash(code), utcnow() + CODE_TTL)
            audit.record(c, actor_id=actor.id, source=actor.source, action="email.set", target=address)

        await self.services.store.write(tx)
        return address

    async def verify(self, actor: Actor, code: str) -> str:
        code = printable_text(code, "code", max_len=20)

        def tx(c: sa.Connection) -> str | None:
            pending = mailq.pending(c, actor.id)
            if pending is None:
                raise Conflict("no address is waiting for a code; run 'email set <address>' first")
            if pending.expires_at <= utcnow() or pending.attempts >= CODE_ATTEMPTS:
                mailq.drop_pending(c, actor.id)
                return None
            if not hmac.compare_digest(pending.code_hash, _hash(code)):
                mailq.count_attempt(c, actor.id)
                return ""
            if mailq.address_taken(c, pending.address, actor.id):
                mailq.drop_pending(c, actor.id)
                raise Conflict("that address was verified by another account meanwhile", reason="email_taken")
            mailq.set_verified(c, actor.id, pending.address)
            audit.record(c, actor_id=actor.id, source=actor.source, action="email.verify", target=pending.address)
            return pending.address

        result = await self.services.store.write(tx)
        if result is None:
            raise Conflict("that code has expired or was tried too often; run 'email set <address>' again",
                           reason="code_expired")
        if result == "":
            raise UsageError("wrong code; check the message and try again")
        return result

    # --- mail from a VM -------------------------------------------------------------------------------------
    async def send_from_vm(self, vm_id: str, to: str, subject: str, body: str, html: str | None) -> str:
        """Send for the VM ``vm_id``. :raise: 400 bad fields, 403 recipient, 429 limit, 503 no relay, 502 relay."""
        vm = await self.services.vms.by_id(vm_id)
        if vm is None:
            raise Forbidden("this VM no longer exists")
        self._relay()
        subject = printable_text(subject, "subject", max_len=MAX_SUBJECT)
        if len(body) > MAX_BODY or (html is not None and len(html) > MAX_BODY):
            raise UsageError(f"body over {MAX_BODY // 1024} KiB")
        if "\x00" in body or (html is not None and "\x00" in html):
            raise UsageError("body contains a NUL character")
        try:
            address = email_address(to)
        except UsageError:
            await self._audit_refusal(vm.name, to, subject, "bad_address")
            raise
        allowed = await self.services.store.read(lambda c: mailq.allowed_recipients(c, vm_id))
        if address.lower() not in allowed:
            await self._audit_refusal(vm.name, address, subject, "not_allowed")
            raise Forbidden("a VM may write only to its owner's and its sharees' verified addresses",
                            reason="recipient_not_allowed")
        try:
            self.vm_limit.take(vm_id)
        except RateLimited as exc:
            await self._audit_refusal(vm.name, address, subject, "rate_limited")
            raise RateLimited(f"{vm.name} may send {SEND_PER_HOUR} messages an hour; {exc.user_message}",
                              retry_after=exc.retry_after) from None
        msg = self._message(address, subject, body, html, {"X-Ussycode-VM": vm.name})
        with telemetry.span("mail send"):
            await self._send(msg)
        telemetry.MAIL.labels("out", "sent").inc()

        def tx(c: sa.Connection) -> None:
            audit.record(c, actor_id=vm.owner_id, source="vm", action="mail.send", target=vm.name,
                         to=address, subject=subject)

        await self.services.store.write(tx)
        return address

    async def _audit_refusal(self, vm_name: str, to: str, subject: str, why: str) -> None:
        telemetry.MAIL.labels("out", "refused").inc()
        def tx(c: sa.Connection) -> None:
            audit.record(c, actor_id=None, source="vm", action="mail.refused", target=vm_name,
                         to=to[:254], subject=subject[:MAX_SUBJECT], reason=why)

        await self.services.store.write(tx)
