"""Per-VM network namespaces, their egress firewall, optional egress (slirp4netns or pasta), host→VM sockets.

A VM's namespace ``ussy-<hash>`` starts with only loopback. The host installs an nftables ruleset inside it
(the guest has no CAP_NET_ADMIN, so it cannot change it) that drops traffic to private ranges and to every
address and on-link network of the host. Egress, when enabled, goes through ``slirp4netns`` (container runtime:
a few MB per VM, host loopback disabled, a seccomp filter, a DNS forwarder at 10.0.2.3 that
the firewall lets through) or ``pasta`` with every port forward and the gateway→host mapping turned off (pasta's
defaults forward the host's loopback ports into the namespace).

The server reaches a VM through :func:`connect_in_netns`: a socket created inside the namespace (``setns`` on a
dedicated thread), never by routing to a guest address. The one routed path is Caddy's to public hosts and signed-in
visitors (:mod:`ussycode.proxy.links`): addresses of the host's own, DNATed to the VM's loopback, admitted only
from Caddy's source address.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hashlib
import ipaddress
import json
import os
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000

# 240.0.0.0/4: the host's routed public hosts (proxy.links) are there; a VM visits them through their URLs.
PRIVATE_V4 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "240.0.0.0/4")
PRIVATE_V6 = ("fc00::/7", "fe80::/10")
METADATA_V4 = "169.254.169.254"
SLIRP_DNS_V4 = "10.0.2.3"  # slirp4netns's built-in DNS forwarder (to the host's resolver)


def netns_name(vm_id: str) -> str:
    """A short, stable namespace name for a VM (hash: VM ids may share long prefixes)."""
    return "ussy-" + hashlib.sha256(vm_id.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class HostAddresses:
    """The host's own addresses and on-link networks (what a VM must never reach)."""

    v4: tuple[str, ...]
    v6: tuple[str, ...]


def parse_ip_addr_json(text: str) -> HostAddresses:
    """Host addresses and their networks from ``ip -j addr`` output, loopback excluded (pure)."""
    v4: set[str] = set()
    v6: set[str] = set()
    for link in json.loads(text or "[]"):
        if "LOOPBACK" in link.get("flags", []):
            continue
        for info in link.get("addr_info", []):
            local, prefix = info.get("local"), info.get("prefixlen")
            if not local or prefix is None:
                continue
            iface = ipaddress.ip_interface(f"{local}/{prefix}")
            target = v4 if iface.version == 4 else v6
            target.add(str(iface.ip))
            if iface.network.prefixlen > 0:
                target.add(str(iface.network))
    return HostAddresses(tuple(sorted(v4)), tuple(sorted(v6)))


def host_addresses() -> HostAddresses:
    out = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True, timeout=10).stdout
    return parse_ip_addr_json(out)


def _set(items: Iterable[str]) -> str:
    """An nft anonymous set; overlapping networks are merged (nft rejects overlapping intervals)."""
    nets = [ipaddress.ip_network(item, strict=False) for item in items]
    merged = [str(n) for n in ipaddress.collapse_addresses(nets)]  # type: ignore[type-var]
    return "{ " + ", ".join(merged) + " }"


def nft_ruleset(host: HostAddresses, *, metadata_v4: str = METADATA_V4, dns_v4: str | None = None) -> str:
    """The nftables ruleset a VM's namespace gets (pure).

    Output to loopback (the VM's own) and to the metadata address is allowed, and DNS (port 53 only) to
    ``dns_v4`` when given; output to private ranges and to the host's addresses and on-link networks is rejected;
    everything else (the internet) is allowed.
    Input is allowed only for loopback and replies, so nothing outside the namespace can open a connection in.
    """
    v4 = list(PRIVATE_V4) + list(host.v4)
    v6 = list(PRIVATE_V6) + list(host.v6)
    return "\n".join(
        [
            "table inet ussycode",
            "delete table inet ussycode",
            "table inet ussycode {",
            "  chain output {",
            "    type filter hook output priority 0; policy accept;",
            '    oifname "lo" accept',
            f"    ip daddr {metadata_v4} accept",
            *([f"    ip daddr {dns_v4} udp dport 53 accept", f"    ip daddr {dns_v4} tcp dport 53 accept"]
              if dns_v4 else []),
            f"    ip daddr {_set(v4)} reject with icmpx type admin-prohibited",
            f"    ip6 daddr {_set(v6)} reject with icmpx type admin-prohibited",
            "  }",
            "  chain input {",
            "    type filter hook input priority 0; policy drop;",
            '    iifname "lo" accept',
            "    ct state established,related accept",
            "  }",
            "}",
            "",
        ]
    )


def pasta_argv(netns: str, pidfile: Path) -> list[str]:
    """pasta command line giving ``netns`` egress with no port forwarding and no gateway→host mapping (pure)."""
    return [
        "pasta",
        "--config-net",
        "--runas", "0",
        "--no-map-gw",
        "-t", "none", "-u", "none", "-T", "none", "-U", "none",
        "--quiet",
        "--pid", str(pidfile),
        "--netns", str(NETNS_DIR / netns),
    ]


def slirp4netns_argv(netns: str, ready_fd: int) -> list[str]:
    """slirp4netns giving ``netns`` egress through a tap device (pure).

    ``--disable-host-loopback`` stops the guest reaching the host's 127.0.0.1 through the gateway address; the
    namespace's firewall rejects the gateway and the host's other addresses anyway. ``--enable-seccomp`` narrows
    its system calls; ``--enable-sandbox`` is not used: its mount namespace set-up propagates back to the host here
    and unmounts ``/run/netns``. It writes ``1`` to ``ready_fd`` once the tap is configured.
    """
    return [
        "slirp4netns", "--configure", "--mtu=65520", "--disable-host-loopback",
        "--enable-seccomp", f"--ready-fd={ready_fd}", "--netns-type=path", str(NETNS_DIR / netns), "tap0",
    ]


def setup_argvs(netns: str) -> list[list[str]]:
    """Commands that create the namespace with loopback up and unprivileged ICMP echo allowed (pure)."""
    return [
        ["ip", "netns", "add", netns],
        ["ip", "-n", netns, "link", "set", "lo", "up"],
        # The metadata address is the VM's own: the server listens on it inside the namespace.
        ["ip", "-n", netns, "addr", "add", f"{METADATA_V4}/32", "dev", "lo"],
        ["ip", "netns", "exec", netns, "sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647"],
        # The namespace belongs to the host's user namespace, so the guest's root is unprivileged in it: let it
        # bind sshd's port 22 (and 80, 443) all the same; it still cannot change addresses, routes or firewall.
        ["ip", "netns", "exec", netns, "sysctl", "-q", "-w", "net.ipv4.ip_unprivileged_port_start=0"],
    ]


def nft_apply_argv(netns: str) -> list[str]:
    return ["ip", "netns", "exec", netns, "nft", "-f", "-"]


def exists(netns: str) -> bool:
    return (NETNS_DIR / netns).exists()


# --- host → VM sockets ---------------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class NetnsBroken(RuntimeError):
    """The calling thread could not return to its own namespace: it must never run anything else."""


def socket_in_netns(netns: str) -> socket.socket:
    """A TCP socket that belongs to ``netns`` for its whole life (blocking; run on a dedicated thread).

    The thread always goes back to the namespace it started in; if that fails, NetnsBroken is raised and the
    caller must retire the thread.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, CLONE_NEWNET)
        finally:
            os.close(target)
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            try:
                _setns(own, CLONE_NEWNET)
            except OSError as exc:
                raise NetnsBroken(f"cannot return to the host network namespace: {exc}") from exc
    finally:
        os.close(own)


def connect_in_netns(netns: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """Create a TCP socket inside ``netns`` and connect it to ``host:port`` (see :func:`socket_in_netns`)."""
    sock = socket_in_netns(netns)
    # The socket belongs to the VM's namespace for its whole life; connecting needs no namespace switch.
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_socket(sock: socket.socket, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """Connect a socket made by :func:`socket_in_netns` on the event loop (its namespace is fixed when it is
    made): no thread sits in ``connect()`` waiting for a slow VM while other VMs' connections queue behind it."""
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), timeout)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_in_netns(netns: str, host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` inside ``netns``, accepted from the host process: whoever connects
    to it is, by construction, inside that VM (the metadata service's identity rests on this)."""
    sock = socket_in_netns(netns)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
