"""What a Host header names under our domain (pure): a VM and port, a custom domain, the apex, or nothing; and
which names may get an on-demand certificate."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ussycode.types import VM_NAME_RE

DEFAULT_PORT = 8080
PORT_MIN, PORT_MAX = 3000, 9999
MAX_HOST = 253
_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_PORT_LABEL_RE = re.compile(r"^([0-9]{4})-(.+)$")


class HostError(ValueError):
    """The Host is not a DNS name we could ever serve (400)."""


@dataclass(frozen=True)
class Target:
    """What a host names: ``vm_name`` + ``port`` for ``[<port>-]<vm>.<domain>``; ``cname`` for any other host
    outside the domain (to be looked up among verified custom domains); ``apex`` for the domain itself."""

    host: str
    port: int = DEFAULT_PORT
    vm_name: str | None = None
    cname: str | None = None
    apex: bool = False


def split_host_port(raw: str) -> tuple[str, int | None]:
    raw = raw.strip()
    if raw.startswith("["):
        raise HostError("IP literal hosts are not served")
    host, sep, port = raw.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        if not 0 < int(port) < 65536:
            raise HostError("bad port")
        return host, int(port)
    if ":" in raw:
        raise HostError("malformed host")
    return raw, None


def normalize_host(raw: str) -> str:
    """Lower-case, port and trailing dot stripped, IDN to punycode, each label checked; raises :class:`HostError`."""
    host, _ = split_host_port(raw)
    host = host.lower().rstrip(".")
    if not host or len(host) > MAX_HOST:
        raise HostError("host empty or too long")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise HostError("host is not a valid internationalised name") from exc
        if len(host) > MAX_HOST:
            raise HostError("host too long")
    if not all(_LABEL_RE.fullmatch(label) for label in host.split(".")):
        raise HostError("host has an invalid label")
    return host


def parse_target(raw_host: str, domain: str) -> Target:
    """What ``raw_host`` names under ``domain``; raises :class:`HostError` for hosts that are not DNS names.

    A name that fits neither the VM-name nor the ``<port>-<vm>`` form (port 3000-9999) yields a Target with
    neither ``vm_name`` nor ``cname``: nothing is there (404).
    """
    host = normalize_host(raw_host)
    domain = domain.lower().rstrip(".")
    if host == domain:
        return Target(host, apex=True)
    suffix = "." + domain
    if not host.endswith(suffix):
        return Target(host, cname=host)
    label = host[: -len(suffix)]
    if "." in label:
        return Target(host)  # a.b.<domain>: never a VM
    port = DEFAULT_PORT
    match = _PORT_LABEL_RE.fullmatch(label)
    if match:
        port = int(match.group(1))
        if not PORT_MIN <= port <= PORT_MAX:
            return Target(host)
        label = match.group(2)
    if not VM_NAME_RE.fullmatch(label):
        return Target(host)
    return Target(host, port=port, vm_name=label)


def tls_ask(raw_host: str, domain: str, vm_names: frozenset[str], cnames: frozenset[str]) -> bool:
    """On-demand TLS ``ask``: issue a certificate only for the apex, existing VM hosts and verified cnames."""
    try:
        target = parse_target(raw_host, domain)
    except HostError:
        return False
    if target.apex:
        return True
    if target.vm_name is not None:
        return target.vm_name in vm_names
    return target.cname is not None and target.cname in cnames
