"""Inbound SMTP on ``--smtp-addr`` (aiosmtpd): ``<anything>@<vm>.<domain>`` into that VM's Maildir.

The protocol is aiosmtpd's (EHLO with SIZE, 8BITMIME, SMTPUTF8 and STARTTLS; sequence and syntax errors answered
as the RFC says); the decisions are :class:`~ussycode.services.mail.MailService`'s: each ``RCPT`` is checked at
once (``550`` unknown VM or receiving off, ``452`` over the hourly or unread limit), a message over 10 MB gets
``552`` while it is still arriving, and ``250`` is said only after the message is safely spooled. STARTTLS uses a
certificate the server makes for ``<domain>`` and ``*.<domain>`` (``<data-dir>/mail/tls.pem``). Message bodies are
never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import ssl
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ussycode import telemetry
from ussycode.config import parse_addr
from ussycode.services.mail import MAX_BYTES, MailService, Recipient, Refusal

log = logging.getLogger(__name__)
MAX_RECIPIENTS = 50
IDLE_TIMEOUT = 300.0


class _Handler:
    def __init__(self, mail: MailService) -> None:
        self.mail = mail

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,  # noqa: N802
                          rcpt_options: list[str]) -> str:
        found: list[Recipient] = getattr(envelope, "ussycode_rcpts", [])
        if len(found) >= MAX_RECIPIENTS:
            return f"452 too many recipients (at most {MAX_RECIPIENTS} a message)"
        try:
            recipient = await self.mail.check_recipient(address)
        except Refusal as refusal:
            telemetry.MAIL.labels("in", "refused").inc()
            return str(refusal)
        found.append(recipient)
        envelope.ussycode_rcpts = found  # type: ignore[attr-defined]
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        recipients: list[Recipient] = getattr(envelope, "ussycode_rcpts", [])
        data = envelope.original_content or b""
        if not recipients:
            return "503 no valid recipients"
        try:
            await self.mail.accept(recipients, envelope.mail_from or "", data)
        except Refusal as refusal:
            return str(refusal)
        except OSError:
            log.exception("cannot spool a message")
            return "451 cannot queue the message now; try again later"
        return "250 OK: queued for delivery"


def _certificate(directory: Path, domain: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``domain`` and ``*.domain`` made once, key ``0600``."""
    cert_path, key_path = directory / "tls.pem", directory / "tls.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain), x509.DNSName("*." + domain)]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


class SmtpServer:
    def __init__(self, mail: MailService, addr: str, data_dir: Path, domain: str) -> None:
        self.mail = mail
        self.addr = addr
        self.data_dir = data_dir
        self.domain = domain
        self.handler = _Handler(mail)
        self._server: asyncio.Server | None = None
        self.port: int | None = None

    async def start(self) -> int:
        cert, key = await asyncio.to_thread(_certificate, self.data_dir / "mail", self.domain)
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)
        host, port = parse_addr(self.addr)

        def protocol() -> Any:
            return SMTP(self.handler, data_size_limit=MAX_BYTES, enable_SMTPUTF8=True, decode_data=False,
                        hostname=self.domain, ident="ussycode ESMTP", tls_context=tls, timeout=IDLE_TIMEOUT,
                        command_call_limit=200)

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(protocol, host, port, backlog=512)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
