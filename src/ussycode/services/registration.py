"""Who may create an account over SSH, and how fast: the registration mode and its two rate limits.

Open registration is limited per source address (``--registrations-per-address``; an IPv6 client counts per /64,
since one host usually holds a whole /64) and over the whole server (``--registrations-per-hour``). Both are token
buckets: a burst of that size, refilled evenly over an hour. An attempt spends from both only when it is about to
write (the handle is well formed), and gets its tokens back when the write is refused (handle taken), so typos do
not lock a person out; a refusal happens before anything is written.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable

from ussycode.config import RegistrationMode, Settings
from ussycode.errors import Forbidden, RateLimited
from ussycode.services.ratelimit import RateLimiter

_GLOBAL = "*"


def address_key(address: str) -> str:
    """The bucket a client address counts against: the IPv4 address, or the IPv6 /64 it lies in."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return str(ip)


def _minutes(exc: RateLimited) -> str:
    minutes = max(1, math.ceil(exc.retry_after / 60))
    return f"{minutes} minute{'' if minutes == 1 else 's'}"


class RegistrationGate:
    """The registration mode and limits of one server (in memory: a restart forgets the counts)."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = settings.registration
        self.per_address = RateLimiter.per_hour(settings.registrations_per_address, clock=clock,
                                                name="registration_address")
        self.overall = RateLimiter.per_hour(settings.registrations_per_hour, clock=clock, name="registration")

    @property
    def closed(self) -> bool:
        return self.mode is RegistrationMode.CLOSED

    def refuse_closed(self) -> Forbidden:
        return Forbidden("registration is closed on this server: ask an admin to add your key "
                         "(they run: admin add-user <handle> '<your public key line>')", reason="registration_closed")

    def _per_address_refusal(self, exc: RateLimited) -> RateLimited:
        return RateLimited(f"too many new accounts from your address; retry in {_minutes(exc)}",
                           retry_after=exc.retry_after, reason="registration_rate_address")

    def _overall_refusal(self, exc: RateLimited) -> RateLimited:
        return RateLimited(f"this server is taking too many new accounts right now; retry in {_minutes(exc)}",
                           retry_after=exc.retry_after, reason="registration_rate_global")

    def check(self, address: str) -> None:
        """Raise the refusal :meth:`admit` would raise now, spending nothing (to refuse before asking a handle)."""
        try:
            self.per_address.check(address_key(address))
        except RateLimited as exc:
            raise self._per_address_refusal(exc) from None
        try:
            self.overall.check(_GLOBAL)
        except RateLimited as exc:
            raise self._overall_refusal(exc) from None

    def admit(self, address: str) -> None:
        """Spend one registration from ``address`` and one from the whole server, or raise :class:`RateLimited`."""
        key = address_key(address)
        try:
            self.per_address.take(key)
        except RateLimited as exc:
            raise self._per_address_refusal(exc) from None
        try:
            self.overall.take(_GLOBAL)
        except RateLimited as exc:
            self.per_address.refund(key)
            raise self._overall_refusal(exc) from None

    def refund(self, address: str) -> None:
        """Give back what :meth:`admit` spent, for a registration that wrote nothing."""
        self.per_address.refund(address_key(address))
        self.overall.refund(_GLOBAL)
