"""Routed public hosts: Caddy dials a public host's own address, which the kernel routes into its VM.

A public host served on the fast path gets an address of its own from ``240.0.0.0/4`` (never given to another host,
by any server on the machine: one counter in ``/run/ussycode``), and Caddy looks the host name up in a hosts file of
ours: the managed Caddy runs in a mount namespace of its own where ``/etc/hosts`` is ``<base>/hosts`` (bind-mounted,
and mounted again at each change). Its proxy's A-record source caches a name for a second and asks nothing else (its
DNS resolver is a closed port), so a host that is not in the file fails at once and the request goes through
forward-auth, as before. No Python and no forwarder process is on the byte path: Caddy → a veth pair → the VM's
namespace, where a DNAT rule turns ``<address>:8080`` into the VM's ``127.0.0.1:<port>``.

The link: a veth pair per VM namespace, ``ussyf<hash>`` on the host and ``front0`` in the namespace
(169.254.77.2/32); the host's ends are 169.254.77.1 and .3, on its loopback (there before any link). The host
routes each of the VM's public addresses to it (``via 169.254.77.2``, from .3), and ``240.0.0.0/4`` is otherwise
unreachable (the dial fails with "no route to host" before a byte is sent). Caddy's proxy binds 169.254.77.1,
and the VM's DNAT takes only connections from that address, so no other host process reaches a VM this way:
not another VM's egress (slirp4netns and pasta connect from the host, and send from .3), not a host service a
user could point at an address.

What a VM can do with its end: nothing. Its namespace belongs to the host's user namespace (the guest cannot
change addresses, routes or rules); the host's table ``inet ussycode_front`` drops every packet from a
``ussyf*`` link that is not a reply to a connection the host opened, or whose source is not routed through
that link (no spoofing another VM's address), and never forwards to or from one (no VM reaches another); in the
namespace, only DNATed connections from the link are let in and only their replies go out.

Each host's address is its own because Caddy keeps idle connections per dial address: when a host stops being
public (or its name moves to another VM), its route goes first (new dials fail and fall back), then the
connections Caddy kept to that address are ended (``ss -K``), then the DNAT rule.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import ipaddress
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ussycode.errors import RuntimeFailure
from ussycode.spawn import DEVNULL, PIPE, STDOUT, communicate, spawn

log = logging.getLogger(__name__)

POOL = ipaddress.IPv4Network("240.0.0.0/4")
SINK = "240.0.0.0"  # the static upstream when a name is not in the file: unreachable, so the dial fails at once
HOST_ADDR = "169.254.77.1"  # Caddy's end: its proxy binds it, and only connections from it are let into a VM
OTHER_SRC = "169.254.77.3"  # what any other host process connecting to a routed address is sent from
VM_ADDR = "169.254.77.2"
VM_DEV = "front0"
DEV_PREFIX = "ussyf"
DIAL_PORT = 8080  # Caddy dials every routed host on this port; the VM's DNAT names the real one
NO_RESOLVER = "udp/127.0.0.1:1"  # names not in the hosts file: refused at once, never a real DNS query
COUNTER = Path("/run/ussycode/routed-next-address")  # host-wide: every server on the host takes from it
COMMAND_TIMEOUT = 30.0
TOOLS = ("ip", "nft", "ss", "unshare", "nsenter", "mount", "umount")

HOST_RULESET = f"""table inet ussycode_front
delete table inet ussycode_front
table inet ussycode_front {{
  chain prerouting {{
    type filter hook prerouting priority -150; policy accept;
    iifname "{DEV_PREFIX}*" fib saddr . iif oif missing drop
  }}
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "{DEV_PREFIX}*" ct state established,related accept
    iifname "{DEV_PREFIX}*" drop
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname "{DEV_PREFIX}*" drop
    oifname "{DEV_PREFIX}*" drop
  }}
}}
"""

VM_RULESET = f"""insert rule inet ussycode input iifname "{VM_DEV}" ip saddr {HOST_ADDR} ct status dnat accept
insert rule inet ussycode output oifname "{VM_DEV}" ip daddr {HOST_ADDR} ct status dnat accept
table ip ussycode_front {{
  map ports {{
    type ipv4_addr : inet_service
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "{VM_DEV}" ip saddr {HOST_ADDR} tcp dport {DIAL_PORT} dnat to 127.0.0.1 : ip daddr map @ports
  }}
}}
"""


def available() -> bool:
    """Routed hosts need root and the tools (iproute2, nftables, util-linux)."""
    return os.geteuid() == 0 and all(shutil.which(t) for t in TOOLS)


def dev_name(netns: str) -> str:
    """The host end of a namespace's link (15 characters at most: an interface name's limit)."""
    return DEV_PREFIX + hashlib.sha256(netns.encode()).hexdigest()[:10]


def link_index(netns: str) -> int | None:
    """The host end's interface index (a namespace made again, for a VM started again, has a new link)."""
    try:
        with open(f"/sys/class/net/{dev_name(netns)}/ifindex") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def hosts_text(addresses: dict[str, str]) -> str:
    """The hosts file Caddy reads: only our routed hosts (pure). Nothing else, not even ``localhost``: a name
    Caddy finds here is dialed, so the file never names a host address."""
    lines = ["# ussycode: routed public hosts (generated; Caddy reads it as /etc/hosts)"]
    lines += [f"{addr} {host}" for host, addr in sorted(addresses.items())]
    return "\n".join(lines) + "\n"


def link_batches(netns: str) -> tuple[str, str]:
    """``ip -batch`` input for the host end and for the namespace end of a new link (pure)."""
    dev = dev_name(netns)
    host = (f"link add {dev} type veth peer name {VM_DEV} netns {netns}\n"
            f"link set {dev} up\n")
    vm = (f"addr add {VM_ADDR}/32 dev {VM_DEV}\n"
          f"link set {VM_DEV} up\n"
          f"route add {HOST_ADDR}/32 dev {VM_DEV}\n"
          # the host's ARP questions may come from either address, and an answer needs a way back
          f"route add {OTHER_SRC}/32 dev {VM_DEV}\n")
    return host, vm


# Run in Caddy's new mount namespace before it starts: our hosts file, over an empty one (/dev/null), and none of
# the copies it was given of the VMs' mounts (disks, overlays, everything under the run directory), which would keep
# a stopped VM's disk attached to its loop device for as long as this Caddy lives. Network namespace handles
# (/run/netns is shared) follow the host's removals through the slave propagation.
_CADDY_NS_SCRIPT = """mount --bind /dev/null /etc/hosts && mount --bind "$0" /etc/hosts || exit 1
run="$1"; shift
findmnt -rn -o TARGET,SOURCE,FSTYPE | while read -r target source fstype; do
  case "$target" in "$run"/*) umount -l "$target" 2>/dev/null; continue;; esac
  case "$source:$fstype" in /dev/loop*|*:overlay) [ "$target" = / ] || umount -l "$target" 2>/dev/null;; esac
done
exec "$@"
"""


def caddy_argv(hosts_file: Path, run_dir: Path, argv: list[str]) -> list[str]:
    """``argv`` (a Caddy) in a mount namespace of its own whose ``/etc/hosts`` is ``hosts_file`` and which holds
    no VM's mounts (those under ``run_dir``, loop devices, overlays) (pure)."""
    return ["unshare", "--mount", "--propagation", "slave", "sh", "-c", _CADDY_NS_SCRIPT, str(hosts_file),
            str(run_dir), *argv]


# The previous hosts file goes (unless the top mount is already the empty base), then the new one comes. Between the
# two, Go's resolver (which re-reads /etc/hosts when it changed) finds the empty base, never the host's own file, so
# no name there (the host's name, "localhost" and its kin) is ever dialed.
_REMOUNT_SCRIPT = """top=
while read -r _ _ _ root point _; do [ "$point" = /etc/hosts ] && top=$root; done < /proc/self/mountinfo
if [ "$top" != /null ]; then umount /etc/hosts || exit 1; fi
mount --bind "$0" /etc/hosts
"""


def remount_argv(pid: int, hosts_file: Path) -> list[str]:
    """Show ``hosts_file`` as ``/etc/hosts`` in the mount namespace of process ``pid`` (a Caddy from
    :func:`caddy_argv`): its previous mount goes, the new one comes (pure)."""
    return ["nsenter", "-t", str(pid), "-m", "--", "sh", "-c", _REMOUNT_SCRIPT, str(hosts_file)]


async def _run(argv: list[str], what: str, stdin: str | None = None, check: bool = True) -> tuple[int, str]:
    """``argv`` to its end (killed after :data:`COMMAND_TIMEOUT`, like any command the server runs)."""
    child = await spawn(argv, stdin=PIPE if stdin is not None else DEVNULL, stdout=PIPE, stderr=STDOUT,
                        start_new_session=True)
    try:
        out, _ = await communicate(child, stdin.encode() if stdin is not None else None, COMMAND_TIMEOUT)
    except TimeoutError:
        raise RuntimeFailure(f"{what} timed out", evidence=f"$ {' '.join(argv)}") from None
    text = (out or b"").decode(errors="replace").strip()
    if check and child.returncode != 0:
        raise RuntimeFailure(f"{what} failed", evidence=f"$ {' '.join(argv)}\n{text}")
    return child.returncode or 0, text


class RoutedHost:
    """An address routed into (VM namespace, port): a public host's (a Bridge-like handle for PublicHosts), or
    a VM port's (the grants' dial)."""

    def __init__(self, links: FrontLinks, host: str, addr: str, netns: str, port: int, ifindex: int) -> None:
        self.links, self.host, self.addr, self.netns, self.port = links, host, addr, netns, port
        self.ifindex = ifindex

    @property
    def alive(self) -> bool:
        """The link it was routed over is still there (a VM that stopped took it with its namespace)."""
        return link_index(self.netns) == self.ifindex

    async def close(self) -> None:
        await self.links.close(self)


class FrontLinks:
    """The routed hosts of this server: links into VM namespaces, addresses, routes and Caddy's hosts file."""

    def __init__(self, base: Path, caddy_pid: Callable[[], int | None] = lambda: None) -> None:
        self.base = Path(base)
        self.hosts_file = self.base / "hosts"
        self.caddy_pid = caddy_pid
        self.addresses: dict[str, str] = {}
        self._published: tuple[str, int | None] | None = None
        self._lock = asyncio.Lock()

    async def setup(self) -> None:
        """The host's part (idempotent): the pool unreachable, the links' firewall, an empty hosts file."""
        self.base.mkdir(parents=True, exist_ok=True)
        await _run(["ip", "route", "replace", "unreachable", str(POOL)], "making the routed hosts' pool unreachable")
        for addr in (HOST_ADDR, OTHER_SRC):  # the host's ends of every link (Caddy binds .1 before any link exists)
            await _run(["ip", "addr", "replace", f"{addr}/32", "dev", "lo"], f"adding {addr} to the host")
        await _run(["nft", "-f", "-"], "installing the routed hosts' firewall", stdin=HOST_RULESET)
        self._write_hosts()

    def _allocate(self) -> str:
        """A new address, never given before on this host (one counter for every server on it, until a reboot
        ends every link and route too): a Caddy's cached lookup can never name another host's address."""
        COUNTER.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(COUNTER, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                n = max(1, int(os.pread(fd, 32, 0).decode().strip() or "1"))
            except ValueError:
                raise RuntimeFailure(f"{COUNTER} is damaged; remove it after a reboot") from None
            if n >= POOL.num_addresses - 1:
                raise RuntimeFailure("the routed hosts' address pool is used up")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{n + 1}\n".encode(), 0)
        finally:
            os.close(fd)
        return str(POOL.network_address + n)

    async def _ensure_link(self, netns: str) -> int:
        dev = dev_name(netns)
        index = link_index(netns)
        if index is not None:
            return index
        host, vm = link_batches(netns)
        await _run(["ip", "-batch", "-"], f"linking namespace {netns}", stdin=host)
        try:
            await _run(["ip", "-n", netns, "-batch", "-"], f"setting up {VM_DEV} in {netns}", stdin=vm)
            await _run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w",
                        f"net.ipv4.conf.{VM_DEV}.route_localnet=1", f"net.ipv6.conf.{VM_DEV}.disable_ipv6=1"],
                       f"configuring {VM_DEV} in {netns}")
            await _run(["ip", "netns", "exec", netns, "nft", "-f", "-"], f"the link's rules in {netns}",
                       stdin=VM_RULESET)
        except RuntimeFailure:
            await _run(["ip", "link", "del", dev], "removing a half-made link", check=False)
            raise
        index = link_index(netns)
        if index is None:
            raise RuntimeFailure(f"the link into {netns} went away as it was made")
        return index

    async def open(self, host: str, netns_path: Path, port: int, *, listed: bool = True) -> RoutedHost:
        """Route a new address for ``host`` into ``port`` of the VM whose namespace is ``netns_path``
        (``/run/netns/<name>``); if ``listed``, Caddy finds it by name at the next :meth:`publish`."""
        netns = netns_path.name
        if netns_path.parent != Path("/run/netns"):
            raise RuntimeFailure(f"routed hosts need a named network namespace, not {netns_path}")
        async with self._lock:
            ifindex = await self._ensure_link(netns)
            addr = self._allocate()
            nft = ["ip", "netns", "exec", netns, "nft"]
            ports = ["element", "ip", "ussycode_front", "ports"]
            add = [*nft, "add", *ports, f"{{ {addr} : {port} }}"]
            if (await _run(add, f"routing {host} in {netns}", check=False))[0] != 0:
                # an element a previous server left for this address
                await _run([*nft, "delete", *ports, f"{{ {addr} }}"], "unrouting", check=False)
                await _run(add, f"routing {host} in {netns}")
            await _run(["ip", "route", "replace", f"{addr}/32", "via", VM_ADDR, "dev", dev_name(netns), "onlink",
                        "src", OTHER_SRC], f"routing {host}")
            if listed:
                self.addresses[host] = addr
        return RoutedHost(self, host, addr, netns, port, ifindex)

    async def close(self, routed: RoutedHost) -> None:
        """Unroute a host: the route (new dials fail), Caddy's connections to it, the DNAT rule."""
        async with self._lock:
            if self.addresses.get(routed.host) == routed.addr:
                del self.addresses[routed.host]
            await _run(["ip", "route", "del", f"{routed.addr}/32"], "unrouting", check=False)
            await _run(["ss", "-K", "-t", "dst", routed.addr], "ending connections to " + routed.addr, check=False)
            if routed.alive:
                await _run(["ip", "netns", "exec", routed.netns, "nft", "delete", "element", "ip", "ussycode_front",
                            "ports", f"{{ {routed.addr} }}"], "unrouting in " + routed.netns, check=False)

    def _write_hosts(self) -> None:
        """A new file each time, renamed into place (a reader never sees half of one)."""
        tmp = self.hosts_file.with_suffix(".tmp")
        tmp.write_text(hosts_text(self.addresses))
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.hosts_file)

    async def publish(self) -> None:
        """Show the current hosts to Caddy (a no-op when neither they nor Caddy changed)."""
        async with self._lock:
            text, pid = hosts_text(self.addresses), self.caddy_pid()
            if self._published == (text, pid):
                return
            self._write_hosts()
            if pid is not None:
                code, out = await _run(remount_argv(pid, self.hosts_file), "updating Caddy's hosts", check=False)
                if code != 0:
                    log.warning("routed hosts not shown to Caddy (pid %d): %s", pid, out)
                    return
            self._published = (text, pid)

