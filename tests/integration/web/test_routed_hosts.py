"""Routed public hosts (proxy.links) as a hostile tenant meets them: Caddy dials a public host's own address over
a veth link into its VM; nothing else reaches a VM that way, and the link reaches nothing on the host."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import pytest

from ussycode.proxy import links
from ussycode.proxy.manager import ManagedCaddy

from .conftest import Web, browser_client
from .test_front_door import fast_path

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]


async def routed(web: Web, host: str) -> str:
    """``host``'s routed address once Caddy dials it (the first visit goes through forward-auth and routes it)."""
    async with browser_client() as c:
        r = await c.get(web.url(host, "/first"))
        assert r.status_code == 200, r.text
    await fast_path(web, host)
    return str(web.server.app.https.routes.hosts.links.addresses[host])


async def guest_connects(web: Web, key: object, vm: str, addr: str, port: int) -> bool:
    r = await web.server.ssh(key, f"timeout 3 bash -c '</dev/tcp/{addr}/{port}' && echo CONNECTED; true", user=vm)
    return "CONNECTED" in r.stdout


def host_connects(addr: str, port: int, source: str = "") -> bool:
    try:
        with socket.create_connection((addr, port), timeout=2, source_address=(source, 0) if source else None):
            return True
    except OSError:
        return False


@pytest.fixture
def needs_links(web: Web) -> None:
    if web.server.app.https.routes.hosts.links is None:
        pytest.skip("routed hosts need root, iproute2, nftables and util-linux (public hosts are sockets here)")


async def test_routed_hosts_reach_only_their_vm_and_only_from_caddy(web: Web, needs_vms: None,
                                                                    needs_links: None) -> None:
    alice, mallory = await web.server.register("alice"), await web.server.register("mallory")
    await web.new_vm(alice, "rta")
    await web.new_vm(mallory, "rtm")
    assert (await web.cmd(alice, "share", "set-public", "rta")).exit_status == 0
    addr = await routed(web, "rta.localhost")
    assert addr.startswith("240.")
    # another tenant's VM: not the routed address (its egress connects from the host), not the host's link end
    assert not await guest_connects(web, mallory, "rtm", addr, links.DIAL_PORT)
    # the public VM's own guest: not a host service listening on every address, through either end of its link
    with socket.create_server(("0.0.0.0", 0)) as service:
        port = service.getsockname()[1]
        assert await asyncio.to_thread(host_connects, links.HOST_ADDR, port)  # it does listen there
        for target in (links.HOST_ADDR, links.OTHER_SRC):
            assert not await guest_connects(web, alice, "rta", target, port)
    # a host process other than Caddy: its connection comes from the other source and is never let in; Caddy's
    # source address is what the VM admits (what Caddy's proxy binds), before and after
    for _ in range(2):
        assert await asyncio.to_thread(host_connects, addr, links.DIAL_PORT, links.HOST_ADDR)
        assert not await asyncio.to_thread(host_connects, addr, links.DIAL_PORT)
    # set-private: the route goes first, the next request is decided by forward-auth again
    assert (await web.cmd(alice, "share", "set-private", "rta")).exit_status == 0
    assert not await asyncio.to_thread(host_connects, addr, links.DIAL_PORT, links.HOST_ADDR)
    async with browser_client() as c:
        r = await c.get(web.url("rta.localhost"), headers={"Accept": "application/json"})
        assert r.status_code == 401


async def test_host_names_caddy_resolves_are_only_routed_ones(web: Web, needs_vms: None, needs_links: None) -> None:
    """The fast path looks the Host header up; an address, the host's own name or a loopback name is never
    dialed as it is (that would reach the host's own services): each goes to forward-auth like any unknown host."""
    alice = await web.server.register("alice")
    await web.new_vm(alice, "rtn")
    assert (await web.cmd(alice, "share", "set-public", "rtn")).exit_status == 0
    await routed(web, "rtn.localhost")
    names = ["127.0.0.1", "ip6-localhost", "ip6-loopback", socket.gethostname()]
    async with browser_client() as c:
        for name in names:
            r = await c.get(web.url(name, "/"), headers={"Accept": "application/json"})
            assert r.status_code in (400, 404), (name, r.status_code, r.text)
    text = web.server.app.https.routes.hosts.links.hosts_file.read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert lines and all(ln.startswith("240.") and ln.endswith(".localhost") for ln in lines), text


def caddy_hosts_mounts(pid: int) -> list[str]:
    """What is mounted on /etc/hosts in Caddy's mount namespace, bottom first (each mount's root)."""
    info = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    return [line.split()[3] for line in info if line.split()[4] == "/etc/hosts"]


async def test_caddy_never_reads_the_hosts_own_hosts_file(web: Web, needs_vms: None, needs_links: None) -> None:
    """Caddy's /etc/hosts is ours over an empty base: while one hosts file replaces another (the old one is
    unmounted first) Caddy finds no name at all, never the host's own file (where its name, ``localhost`` and any
    name an operator added point at the host's own services)."""
    alice = await web.server.register("alice")
    await web.new_vm(alice, "rtb")
    front, caddy = web.server.app.https.routes.hosts.links, web.server.app.https.caddy
    assert front is not None and isinstance(caddy, ManagedCaddy) and caddy.pid is not None
    pid, hosts_file = caddy.pid, str(front.hosts_file)
    for public in (True, False, True):  # whatever a change mounted, it is over the one base
        assert (await web.cmd(alice, "share", "set-public" if public else "set-private", "rtb")).exit_status == 0
        mounts = caddy_hosts_mounts(pid)
        assert mounts[-2:] == ["/null", hosts_file] and mounts.count("/null") == 1, mounts
    await routed(web, "rtb.localhost")
    # the moment between two files: the old one is gone, the next not yet there
    proc = await asyncio.create_subprocess_exec("nsenter", "-t", str(pid), "-m", "--", "sh", "-c",
                                                "umount /etc/hosts && cat /etc/hosts",
                                                stdout=asyncio.subprocess.PIPE)
    shown, _ = await proc.communicate()
    assert proc.returncode == 0 and shown == b""  # empty: not the host's file
    assert caddy_hosts_mounts(pid)[-1] == "/null"
    # the next change shows the whole file again, over the same base
    assert (await web.cmd(alice, "share", "set-private", "rtb")).exit_status == 0
    assert (await web.cmd(alice, "share", "set-public", "rtb")).exit_status == 0
    await routed(web, "rtb.localhost")
    mounts = caddy_hosts_mounts(pid)
    assert mounts[-2:] == ["/null", hosts_file] and mounts.count("/null") == 1, mounts


async def test_a_caddy_started_while_vms_run_pins_none_of_them(web: Web, needs_vms: None, needs_links: None) -> None:
    """Caddy's mount namespace is made with copies of the host's mounts: it gives up the VMs' (their disks would
    stay attached to loop devices and a stopped VM could not start again) and follows the host's removal of a
    network namespace (the VM's link and routes go with it)."""
    alice = await web.server.register("alice")
    await web.new_vm(alice, "rtp")
    assert (await web.cmd(alice, "share", "set-public", "rtp")).exit_status == 0
    https = web.server.app.https
    caddy = https.caddy
    old_pid = caddy.pid
    os.kill(old_pid, signal.SIGKILL)  # the watchdog starts a new Caddy, while the VM runs
    for _ in range(200):
        if https.state == "running" and caddy.pid != old_pid:
            break
        await asyncio.sleep(0.05)
    assert https.state == "running" and caddy.pid != old_pid
    run_dir = os.path.realpath(web.server.app.services.settings.run_dir)
    for line in Path(f"/proc/{caddy.pid}/mountinfo").read_text().splitlines():
        target, (fstype, source) = line.split()[4], line.split(" - ")[1].split()[:2]
        assert not target.startswith(run_dir + "/"), line
        assert target == "/" or (fstype != "overlay" and not source.startswith("/dev/loop")), line
    await routed(web, "rtp.localhost")
    # stop and start again: the disk is released (nothing pins it), and the host answers again
    for command in ("stop", "start"):
        r = await web.cmd(alice, command, "rtp")
        assert r.exit_status == 0, r
    await web.serve_echo(alice, "rtp", 8080)
    await routed(web, "rtp.localhost")
    # removing the VM removes its namespace in Caddy's mount namespace too: the link goes
    devices = {p.name for p in Path("/sys/class/net").iterdir() if p.name.startswith(links.DEV_PREFIX)}
    assert (await web.cmd(alice, "rm", "rtp", "--yes")).exit_status == 0
    for _ in range(100):
        left = {p.name for p in Path("/sys/class/net").iterdir() if p.name.startswith(links.DEV_PREFIX)}
        if len(left) < len(devices):
            break
        await asyncio.sleep(0.05)
    assert len(left) < len(devices), (devices, left)
