"""The static front-door config (pure), the public-host table (files), the access-input cache, the C forwarder."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ussycode.proxy import bridge
from ussycode.proxy.front import (
    ANONYMOUS_ROUTE_ID,
    CREDENTIALS_ROUTE_ID,
    PUBLIC_ROUTE_ID,
    UPSTREAM_HEADER,
    UPSTREAM_VAR,
    VMS_ROUTE_ID,
    FrontSettings,
    build_front_config,
)
from ussycode.proxy.hosts import PublicHosts
from ussycode.proxy.hygiene import ours_route, strip_client_identity, strip_platform_credentials
from ussycode.proxy.manager import caddy_binary
from ussycode.proxy.matchers import host_matches
from ussycode.proxy.routes import ServerSettings, TlsMode, build_tls_app
from ussycode.store.cache import GenerationCache

FRONT = FrontSettings("http://127.0.0.1:8080/__ussycode/forward-auth?k=key",
                      "unix//run/u/front/sockets/{http.request.host}")


def settings(tls: TlsMode = TlsMode.OFF, domain: str = "localhost", **kw: str) -> ServerSettings:
    return ServerSettings(domain=domain, https_addr="127.0.0.1:8443", http_addr="127.0.0.1:8080", tls=tls, **kw)


def test_routes_are_static_and_name_no_vm() -> None:
    config = build_front_config(settings(), FRONT)
    server = config["apps"]["http"]["servers"]["ussycode"]
    routes = server["routes"]
    assert [r.get("@id") for r in routes] == ["ussycode-apex-localhost", ANONYMOUS_ROUTE_ID, CREDENTIALS_ROUTE_ID,
                                              PUBLIC_ROUTE_ID, VMS_ROUTE_ID]
    anonymous, creds, public, vms = routes[1:]
    # any of our credentials (session or share cookie, platform token, share parameter) -> forward-auth
    patterns = json.dumps(creds["match"])
    assert "ussy_(session|share_" in patterns and "usy[01]" in patterns and '"ussy_share": ["*"]' in patterns
    assert creds["handle"] == vms["handle"]
    # the public fast path: no check at all, the dial itself (only a public host has a socket by that name);
    # names whose socket path would not fit in a unix address are left to forward-auth
    (fast,) = public["match"]
    room = 107 - len("/run/u/front/sockets/")
    assert host_matches(fast, "a" * room) and not host_matches(fast, "a" * (room + 1))
    assert not any(host_matches(fast, h) for h in ("", ".", "..", "Web.localhost", "a/b", "a_b", "a b"))
    assert public["handle"][-1]["upstreams"] == [{"dial": "unix//run/u/front/sockets/{http.request.host}"}]
    assert len(public["handle"]) == 4  # no access step
    # a request that carries nothing of ours and nothing the chain would change: the same hosts and dial, the
    # identity headers stripped, nothing else to do
    (carries_nothing,) = anonymous["match"]
    assert {k: carries_nothing[k] for k in ("vars_regexp", "header")} == {
        "vars_regexp": fast["vars_regexp"], "header": {"Cookie": None, "Authorization": None}}
    assert carries_nothing["not"] == [*fast["not"], {"path": ["/__ussycode", "/__ussycode/*"]},
                                      {"query": {"ussy_share": ["*"]}}]
    assert anonymous["handle"] == [strip_client_identity(), public["handle"][-1]]
    # every other host: forward-auth names the upstream, kept in a variable
    auth = vms["handle"][2]
    assert auth["handler"] == "reverse_proxy" and auth["rewrite"]["method"] == "GET"
    first = auth["handle_response"][0]["routes"][0]["handle"][0]
    assert first == {"handler": "vars", UPSTREAM_VAR: "{http.reverse_proxy.header." + UPSTREAM_HEADER + "}"}
    assert vms["handle"][-1]["upstreams"] == [{"dial": "{http.vars." + UPSTREAM_VAR + "}"}]
    # a host with no public socket: the error routes hand the request to the forward-auth chain, pages after it
    fallback = server["errors"]["routes"][0]
    pattern = fallback["match"][0]["vars_regexp"]["{http.error.message}"]["pattern"]
    assert re.fullmatch(pattern, "dial unix /run/u/front/sockets/web.localhost: connect: no such file or directory")
    assert not re.fullmatch(pattern, "dial unix /run/u/front/sockets/web.localhost: connect: connection refused")
    assert not re.fullmatch(pattern, "dial unix /run/b/vm1-8080.sock: connect: no such file or directory")
    assert fallback["handle"][0]["routes"][0]["handle"] == vms["handle"]
    assert fallback["handle"][0]["errors"]["routes"] == server["errors"]["routes"][1:]
    # the trust boundary's chain, in its order, on every VM route; WebSockets outlive an attached Caddy's reload
    for route in (public, vms):
        chain = route["handle"]
        assert chain[0] == strip_client_identity() and chain[1] == ours_route("127.0.0.1:8080")
        assert chain[-2] == strip_platform_credentials() and chain[-1]["handler"] == "reverse_proxy"
        assert chain[-1]["stream_close_delay"]
    text = json.dumps(config)
    assert "vm" not in {k for r in routes for k in r.get("match", [{}])[0].get("host", [])}
    assert "X-Ussy-Upstream" not in json.dumps(vms["handle"][-1])  # never sent on to the VM
    assert text == json.dumps(build_front_config(settings(), FRONT))  # pure
    with pytest.raises(ValueError):
        FrontSettings("http://127.0.0.1:8080/a", "127.0.0.1:9000")
    # a sockets directory too deep for any host name: no fast path, every host through forward-auth
    deep = FrontSettings(FRONT.auth_url, "unix//" + "d" * 110 + "/{http.request.host}")
    ids = [r.get("@id") for r in build_front_config(settings(), deep)["apps"]["http"]["servers"]["ussycode"]["routes"]]
    assert PUBLIC_ROUTE_ID not in ids and VMS_ROUTE_ID in ids


def test_tls_wildcard_where_clients_accept_one() -> None:
    multi = build_tls_app(settings(TlsMode.INTERNAL, "dev.example.com", ask_url="http://127.0.0.1:1/ask"))
    assert multi is not None and multi["certificates"]["automate"] == ["*.dev.example.com", "dev.example.com"]
    assert multi["automation"]["policies"][1]["on_demand"] is True  # custom domains
    single = build_tls_app(settings(TlsMode.INTERNAL, ask_url="http://127.0.0.1:1/ask"))
    assert single is not None and single["certificates"]["automate"] == ["localhost"]  # *.localhost: refused by clients
    assert single["automation"]["on_demand"]["permission"]["endpoint"] == "http://127.0.0.1:1/ask"
    acme = build_tls_app(settings(TlsMode.ACME, "dev.example.com", acme_email="a@b.c", ask_url="http://x:1/a"))
    assert acme is not None and acme["certificates"]["automate"] == ["dev.example.com"]
    assert build_tls_app(settings()) is None


@pytest.mark.skipif(not shutil.which(caddy_binary()), reason="caddy not installed")
@pytest.mark.parametrize("routed", [False, True])
@pytest.mark.parametrize("tls", [TlsMode.OFF, TlsMode.INTERNAL, TlsMode.ACME])
def test_config_validates_with_the_real_caddy(tls: TlsMode, routed: bool, tmp_path: Path) -> None:
    s = settings(tls, "dev.example.com", acme_email="a@b.c", ask_url="http://127.0.0.1:1/ask")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(build_front_config(s, dataclasses.replace(FRONT, routed=routed))))
    proc = subprocess.run([caddy_binary(), "validate", "--config", str(path)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]


class VmPorts:
    """A runtime stand-in for the Python port bridge: (VM id, port) -> a stream that first says which it is."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None

    async def open_connection(self, vm_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.server is None:
            async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                name = await reader.readline()
                writer.write(name)
                await writer.drain()
                await reader.read()  # held open until the other side goes
                writer.close()

            self.server = await asyncio.start_server(answer, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*self.server.sockets[0].getsockname()[:2])
        writer.write(f"{vm_id}:{port}\n".encode())
        return reader, writer


async def who(path: Path) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    return (await asyncio.wait_for(reader.readline(), 5)).decode().strip(), reader, writer


async def name_of(path: Path) -> str:
    name, _, writer = await who(path)
    writer.close()
    await writer.wait_closed()
    return name


async def test_public_hosts_are_listeners_of_their_own(tmp_path: Path) -> None:
    vms = VmPorts()
    bridges = bridge.BridgeManager(vms, tmp_path / "run", use_forwarders=False)
    hosts = PublicHosts(tmp_path / "front")
    try:
        public = {"web.localhost": ("vm1", 8080), "3000-web.localhost": ("vm1", 3000)}
        await hosts.sync(public, bridges)
        assert hosts.current() == {} and os.listdir(hosts.sockets) == []  # nobody asked for them yet
        assert hosts.request("web.localhost") and not hosts.request("web.localhost")  # news once
        assert hosts.request("3000-web.localhost") and not hosts.request("a" * 100 + ".localhost")
        await hosts.sync(public, bridges)
        assert hosts.current() == public
        assert sorted(os.listdir(hosts.sockets)) == ["3000-web.localhost", "web.localhost"]
        assert bridges.active() == []  # the hosts' own listeners, not the shared per-port bridges
        name, held_reader, held = await who(hosts.sockets / "web.localhost")
        assert name == "vm1:8080" and await name_of(hosts.sockets / "3000-web.localhost") == "vm1:3000"
        # rename web -> site, and the port host now names another VM: the old name's socket goes, and so does
        # the connection held through it (as Caddy keeps one per name), so it can carry nothing to vm1 later
        hosts.request("site.localhost")
        await hosts.sync({"site.localhost": ("vm1", 8080), "3000-web.localhost": ("vm2", 3000)}, bridges)
        assert not (hosts.sockets / "web.localhost").exists()
        assert await asyncio.wait_for(held_reader.read(), 5) == b""
        held.close()
        await held.wait_closed()
        assert await name_of(hosts.sockets / "3000-web.localhost") == "vm2:3000"
        assert await name_of(hosts.sockets / "site.localhost") == "vm1:8080"
        # hostile or over-long names never become files; whatever else is in the directory is dropped
        (hosts.sockets / "stray.localhost").symlink_to("/nowhere")
        for host in ("../etc", "a" * 100 + ".localhost", "ok.localhost"):
            hosts.request(host)
        await hosts.sync({"../etc": ("vm1", 8080), "a" * 100 + ".localhost": ("vm1", 8080),
                          "ok.localhost": ("vm1", 8080)}, bridges)
        assert hosts.current() == {"ok.localhost": ("vm1", 8080)} and os.listdir(hosts.sockets) == ["ok.localhost"]
        # a host that stopped being public is forgotten: when it comes back it waits to be asked for again
        await hosts.sync({"site.localhost": ("vm1", 8080)}, bridges)
        assert hosts.current() == {}
        await hosts.clear()
        assert hosts.current() == {} and os.listdir(hosts.sockets) == []
    finally:
        await hosts.clear()
        if vms.server is not None:
            vms.server.close()
            await vms.server.wait_closed()


def test_public_hosts_dial_relative_to_a_managed_caddy(tmp_path: Path) -> None:
    """A Caddy this server starts runs in the hosts' base dir and dials a relative path, so the 107-byte limit of
    a unix socket address does not depend on the data dir; an attached Caddy dials the absolute path."""
    long_base = tmp_path / ("d" * 90) / "front"
    managed, attached = PublicHosts(long_base, relative=True), PublicHosts(long_base)
    assert managed.dial_template() == "unix/sockets/{http.request.host}"
    assert attached.dial_template() == f"unix/{long_base}/sockets/{{http.request.host}}"
    host = "9999-" + "a" * 30 + ".example.com"
    assert managed.fits(host) and not attached.fits(host)


def test_generation_cache_drops_on_any_write_and_on_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    cache: GenerationCache[str] = GenerationCache(max_entries=2, ttl=5.0)
    cache.put("a", 1, "A")
    assert cache.get("a", 1) == "A"
    assert cache.get("a", 2) is None  # a write happened since: never served again
    cache.put("b", 2, "B", deadline=time.monotonic() - 1)
    assert cache.get("b", 2) is None  # past its own deadline (a session's expiry)
    cache.put("c", 2, "C")
    cache.put("d", 2, "D")
    cache.put("e", 2, "E")
    assert cache.get("c", 2) is None and cache.get("e", 2) == "E"  # bounded
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + 6)
    assert cache.get("e", 2) is None  # ttl


@pytest.mark.skipif(os.geteuid() != 0 or not bridge.forwarder_available(),
                    reason="needs root and systemd-socket-proxyd")
async def test_forwarder_reaches_a_port_inside_a_namespace() -> None:
    """systemd-socket-proxyd inside a network namespace this test makes, on a unix socket we bind."""
    ns = f"ussyt{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    base = Path(tempfile.mkdtemp(prefix="uf", dir="/tmp"))
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        server = subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-c",
                                   "import socket\ns=socket.socket()"
                                   "\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)"
                                   "\ns.bind(('127.0.0.1',18999));s.listen()\nwhile True:\n c,_=s.accept()\n"
                                   " d=c.recv(100)\n c.sendall(d.upper())\n c.close()"])
        try:
            fwd = bridge.Forwarder(Path("/run/netns") / ns, "vm1", 18999, base / "vm1-18999.sock")
            await fwd.start()
            assert fwd.alive and oct((base / "vm1-18999.sock").stat().st_mode & 0o777) == "0o660"
            got = b""
            for _ in range(50):
                try:
                    reader, writer = await asyncio.open_unix_connection(str(base / "vm1-18999.sock"))
                    writer.write(b"hello")
                    await writer.drain()
                    got = await asyncio.wait_for(reader.read(100), 5)
                    writer.close()
                    if got:
                        break
                except OSError:
                    pass
                await asyncio.sleep(0.05)
            assert got == b"HELLO"
            # nothing on another port: the connection is closed at once (Caddy answers 502), never hangs
            other = bridge.Forwarder(Path("/run/netns") / ns, "vm1", 18998, base / "vm1-18998.sock")
            await other.start()
            reader, writer = await asyncio.open_unix_connection(str(base / "vm1-18998.sock"))
            writer.write(b"x")
            try:
                assert await asyncio.wait_for(reader.read(100), 5) == b""
            except ConnectionResetError:
                pass  # closed with a reset: just as fast
            await other.close()
            # a forwarder that died says how (the manager logs it when it restarts one)
            dying = bridge.Forwarder(Path("/run/netns") / ns, "vm1", 18997, base / "vm1-18997.sock")
            await dying.start()
            assert dying.alive and dying.pid is not None
            os.kill(dying.pid, signal.SIGTERM)
            for _ in range(100):
                if not dying.alive:
                    break
                await asyncio.sleep(0.02)
            assert not dying.alive and dying.exit_reason().startswith(("signal 15", "exit status 0"))
            await dying.close()
            pid = fwd.pid
            await fwd.close()
            assert not (base / "vm1-18999.sock").exists() and pid is not None
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        finally:
            server.kill()
            server.wait()
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
        shutil.rmtree(base, ignore_errors=True)
