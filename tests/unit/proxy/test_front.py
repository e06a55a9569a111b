"""The static front-door config (pure), the public-host table (files), the access-input cache, the C forwarder."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ussycode.proxy import bridge
from ussycode.proxy.front import (
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
from ussycode.proxy.routes import ServerSettings, TlsMode, build_tls_app
from ussycode.services.accesscache import GenerationCache

FRONT = FrontSettings("http://127.0.0.1:8080/__ussycode/forward-auth?k=key", "/run/u/front/public",
                      "unix//run/u/front/sockets/{http.request.host}")


def settings(tls: TlsMode = TlsMode.OFF, domain: str = "localhost", **kw: str) -> ServerSettings:
    return ServerSettings(domain=domain, https_addr="127.0.0.1:8443", http_addr="127.0.0.1:8080", tls=tls, **kw)


def test_routes_are_static_and_name_no_vm() -> None:
    config = build_front_config(settings(), FRONT)
    routes = config["apps"]["http"]["servers"]["ussycode"]["routes"]
    assert [r.get("@id") for r in routes] == ["ussycode-apex-localhost", PUBLIC_ROUTE_ID, VMS_ROUTE_ID]
    public, vms = routes[1], routes[2]
    # the public fast path: a marker file per host, dialed by host name
    match = public["match"][0]
    assert match["file"] == {"root": "/run/u/front/public", "try_files": ["/{http.request.host}"]}
    assert "{http.request.host}" in match["vars_regexp"]
    assert public["handle"][-1]["upstreams"] == [{"dial": "unix//run/u/front/sockets/{http.request.host}"}]
    # ... asks forward-auth only for requests with our session cookie (identity headers)
    identity = public["handle"][2]
    assert identity["handler"] == "subroute"
    assert "ussy_session=" in identity["routes"][0]["match"][0]["header_regexp"]["Cookie"]["pattern"]
    # every other host: forward-auth names the upstream, kept in a variable
    auth = vms["handle"][2]
    assert auth["handler"] == "reverse_proxy" and auth["rewrite"]["method"] == "GET"
    first = auth["handle_response"][0]["routes"][0]["handle"][0]
    assert first == {"handler": "vars", UPSTREAM_VAR: "{http.reverse_proxy.header." + UPSTREAM_HEADER + "}"}
    assert vms["handle"][-1]["upstreams"] == [{"dial": "{http.vars." + UPSTREAM_VAR + "}"}]
    # the trust boundary's chain, in its order, on both VM routes; WebSockets outlive an attached Caddy's reload
    for route in (public, vms):
        chain = route["handle"]
        assert chain[0] == strip_client_identity() and chain[1] == ours_route("127.0.0.1:8080")
        assert chain[3] == strip_platform_credentials() and chain[4]["handler"] == "reverse_proxy"
        assert chain[-1]["stream_close_delay"]
    text = json.dumps(config)
    assert "vm" not in {k for r in routes for k in r.get("match", [{}])[0].get("host", [])}
    assert "X-Ussy-Upstream" not in json.dumps(vms["handle"][-1])  # never sent on to the VM
    assert text == json.dumps(build_front_config(settings(), FRONT))  # pure


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
@pytest.mark.parametrize("tls", [TlsMode.OFF, TlsMode.INTERNAL, TlsMode.ACME])
def test_config_validates_with_the_real_caddy(tls: TlsMode, tmp_path: Path) -> None:
    s = settings(tls, "dev.example.com", acme_email="a@b.c", ask_url="http://127.0.0.1:1/ask")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(build_front_config(s, FRONT)))
    proc = subprocess.run([caddy_binary(), "validate", "--config", str(path)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_public_hosts_files(tmp_path: Path) -> None:
    hosts = PublicHosts(tmp_path / "front")
    hosts.sync({"web.localhost": "/run/b/vm1-8080.sock", "3000-web.localhost": "/run/b/vm1-3000.sock"})
    assert hosts.current() == {"web.localhost": "/run/b/vm1-8080.sock", "3000-web.localhost": "/run/b/vm1-3000.sock"}
    assert (hosts.markers / "web.localhost").is_file()  # Caddy's file matcher needs a regular file
    # rename: the new host appears, the old one goes; a retarget is an atomic symlink swap
    hosts.sync({"site.localhost": "/run/b/vm1-8080.sock", "3000-web.localhost": "/run/b/vm2-3000.sock"})
    assert hosts.current() == {"site.localhost": "/run/b/vm1-8080.sock", "3000-web.localhost": "/run/b/vm2-3000.sock"}
    assert not (hosts.sockets / "web.localhost").exists() and not (hosts.markers / "web.localhost").exists()
    # hostile or over-long names never become files; a stray link without a marker is dropped
    (hosts.sockets / "stray.localhost").symlink_to("/nowhere")
    hosts.sync({"../etc": "/x", "a" * 100 + ".localhost": "/x", "ok.localhost": "/x"})
    assert hosts.current() == {"ok.localhost": "/x"} and sorted(os.listdir(hosts.sockets)) == ["ok.localhost"]
    hosts.clear()
    assert hosts.current() == {}


def test_public_hosts_dial_relative_to_a_managed_caddy(tmp_path: Path) -> None:
    """A Caddy this server starts runs in the hosts' base dir and dials a relative path, so the 107-byte limit of
    a unix socket address does not depend on the data dir; an attached Caddy dials the absolute path."""
    long_base = tmp_path / ("d" * 90) / "front"
    managed, attached = PublicHosts(long_base, relative=True), PublicHosts(long_base)
    assert managed.dial_template() == "unix/sockets/{http.request.host}"
    assert attached.dial_template() == f"unix/{long_base}/sockets/{{http.request.host}}"
    host = "9999-" + "a" * 30 + ".example.com"
    assert managed.fits(host) and not attached.fits(host)
    managed.sync({host: "/run/b/vm1-9999.sock"})
    assert managed.current() == {host: "/run/b/vm1-9999.sock"}


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
