"""Routussy, the external access and billing service an operator may put in front of registration and LLM use.

With ``--routussy-url`` and ``--routussy-key`` set:

- **Registration**: an SSH key that is not registered here, connecting from outside ``--trusted-cidrs``, may register
  only if Routussy approves its fingerprint: ``GET <url>/ussycode/user-by-fingerprint?fingerprint=<SHA256:…>`` with
  ``Authorization: Bearer <key>``, 5 seconds. ``200`` admits; ``404`` refuses ("not approved"); anything else —
  other codes, a timeout, no answer — refuses too (fail closed). Registered users never depend on it.
- **LLM**: ``routussy`` becomes a gateway provider: ``<url>/<path>`` called by the server with ``Authorization:
  Bearer <key>`` (the shared secret) and ``X-Ussycode-Fingerprint: <the VM owner's first key's fingerprint>``; the
  fingerprint names the user, it is never a credential, and nothing that works outside the VM is in the VM.
"""

from __future__ import annotations

import ipaddress
import logging

import httpx

from ussycode.config import LlmProvider, Settings
from ussycode.errors import Forbidden

log = logging.getLogger(__name__)
TIMEOUT = 5.0
APPROVAL_PATH = "/ussycode/user-by-fingerprint"
FINGERPRINT_HEADER = "x-ussycode-fingerprint"


class Routussy:
    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = settings.routussy_url
        self.key = settings.routussy_key
        self.trusted = settings.trusted_networks
        self._transport = transport

    @classmethod
    def from_settings(cls, settings: Settings) -> Routussy | None:
        return cls(settings) if settings.routussy_url and settings.routussy_key else None

    def is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    async def admit(self, fingerprint: str, address: str) -> None:
        """Return if this new key may register from ``address``; :class:`Forbidden` otherwise (fail closed)."""
        if self.is_trusted(address):
            return
        try:
            async with httpx.AsyncClient(timeout=TIMEOUT, transport=self._transport, trust_env=False) as client:
                r = await client.get(self.url + APPROVAL_PATH, params={"fingerprint": fingerprint},
                                     headers={"Authorization": f"Bearer {self.key}"})
        except httpx.HTTPError as exc:
            log.warning("Routussy unreachable while approving %s: %s", fingerprint, type(exc).__name__)
            raise Forbidden("registration is unavailable right now: this server's access service (Routussy) "
                            "could not be reached; try again later", reason="routussy_unreachable") from None
        if r.status_code == 200:
            return
        if r.status_code == 404:
            raise Forbidden("this key is not approved for this server: register it with the access service "
                            "(Routussy) first", reason="routussy_refused")
        log.warning("Routussy answered %d while approving %s", r.status_code, fingerprint)
        raise Forbidden("registration is unavailable right now: this server's access service (Routussy) "
                        f"answered {r.status_code}; try again later", reason="routussy_error")

    def provider(self) -> LlmProvider:
        return LlmProvider(base_url=self.url, needs_key=False)

    def llm_headers(self, fingerprint: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}", FINGERPRINT_HEADER: fingerprint}
