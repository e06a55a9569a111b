"""The front door under change and failure, as a user meets it: the README's /exec example over real HTTPS with
the real curl, open streams and WebSockets while another user churns VMs, a killed Caddy coming back."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from ussycode.proxy.manager import ManagedCaddy, caddy_logging
from ussycode.telemetry import FORWARD_AUTH

from .conftest import Web, browser_client, free_port

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

# One app for every VM: a WebSocket echo on Upgrade, /slow/<n> streams n chunks 0.1 s apart, anything else "ok".
APP = r'''
import asyncio, base64, hashlib, sys
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
async def handle(r, w):
    try:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            path = lines[0].split()[1]
            h = {l.split(b":", 1)[0].strip().lower(): l.split(b":", 1)[1].strip() for l in lines[1:] if b":" in l}
            if h.get(b"upgrade", b"").lower() == b"websocket":
                acc = base64.b64encode(hashlib.sha1(h[b"sec-websocket-key"] + GUID).digest())
                w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Accept: " + acc + b"\r\n\r\n")
                while True:
                    b0, b1 = await r.readexactly(2)
                    mask = await r.readexactly(4)
                    data = bytes(c ^ mask[i % 4] for i, c in enumerate(await r.readexactly(b1 & 0x7F)))
                    if b0 & 0x0F == 8:
                        return
                    w.write(bytes([0x81, len(data)]) + data)
                    await w.drain()
            if path.startswith(b"/slow/"):
                w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
                for i in range(int(path.split(b"/")[2])):
                    chunk = b"%d\n" % i
                    w.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await w.drain()
                    await asyncio.sleep(0.1)
                w.write(b"0\r\n\r\n")
                await w.drain()
                continue
            body = b"ok " + path + b"\n"
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await w.drain()
    except Exception:
        pass
    finally:
        w.close()
async def main():
    server = await asyncio.start_server(handle, "0.0.0.0", int(sys.argv[1]), backlog=256)
    await server.serve_forever()
asyncio.run(main())
'''


async def serve_app(web: Web, key: Path, vm: str, port: int = 8080, app: str = APP, arg: str = "") -> None:
    """Run ``app`` (a Python script: port, then ``arg``) in the VM and wait until it listens."""
    r = await web.server.ssh(key, f"cat > /tmp/app-{port}.py && (setsid nohup python3 /tmp/app-{port}.py {port} "
                             f"{arg} >/tmp/app-{port}.log 2>&1 &) ; for i in $(seq 50); do python3 -c 'import socket; "
                             f"socket.create_connection((\"127.0.0.1\", {port}))' 2>/dev/null && exit 0; "
                             "sleep 0.1; done; exit 1", user=vm, stdin=app.encode())
    assert r.exit_status == 0, r


async def new_vm(web: Web, key: Path, name: str) -> None:
    r = await web.cmd(key, "new", f"--name={name}", "--json")
    assert r.exit_status == 0, r
    await serve_app(web, key, name)


async def token_of(web: Web, key: Path) -> str:
    r = await web.cmd(key, "token", "create", "--json")
    assert r.exit_status == 0, r
    return str(json.loads(r.stdout)["token"])


async def run(*argv: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def ws_frame(message: bytes) -> bytes:
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(message)]) + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(message))


def caddy_reloads(caddy_dir: Path) -> int:
    """How many times the running Caddy replaced its config (each reload stops the previous server)."""
    text = (caddy_dir / "caddy.log").read_text(errors="replace")
    return sum(1 for line in text.splitlines() if '"msg":"stopped previous server"' in line)


async def test_readme_exec_example_over_https_with_curl(server_factory: Callable[..., Any],
                                                        needs_vms: None) -> None:
    """The README's /exec lines, word for word, with the real curl over HTTPS (Caddy's local CA), HTTP/2 and
    HTTP/1.1: the VM is created and its JSON printed (a reload used to cut this request: 502)."""
    port = free_port()
    server = await server_factory(https_addr=f"127.0.0.1:{port}", tls="internal")
    https = server.app.https
    assert https is not None and not https.error, https.error
    caddy = https.caddy
    assert isinstance(caddy, ManagedCaddy)
    deadline = time.monotonic() + 20
    while not caddy.root_ca_path.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    ca = str(caddy.root_ca_path)
    key = await server.register("scripter")
    token = await token_of(Web(server, port), key)
    domain = f"localhost:{port}"
    env = {**os.environ, "TOKEN": token, "CURL_CA_BUNDLE": ca}  # the README's curl, trusting our local CA
    for http_flag, name in (("", "api1"), ("--http1.1 ", "api2")):
        readme = [
            f"curl -sS {http_flag}https://{domain}/exec -H \"Authorization: Bearer $TOKEN\" "
            "-H 'Content-Type: text/plain' --data-binary 'whoami'",
            f"curl -sS {http_flag}https://{domain}/exec -H \"Authorization: Bearer $TOKEN\" "
            f"--json '{{\"command\": \"new --name={name} --json\"}}'",
            f"curl -sS {http_flag}https://{domain}/exec -H \"Authorization: Bearer $TOKEN\" "
            "-H 'Content-Type: text/plain' --data-binary 'ls --json' | jq -r .output | jq '.[].name'",
        ]
        outputs = []
        for line in readme:
            proc = await asyncio.create_subprocess_shell(line, stdout=asyncio.subprocess.PIPE,
                                                         stderr=asyncio.subprocess.PIPE, env=env)
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode == 0, (line, out, err)
            outputs.append(out.decode())
        assert json.loads(outputs[0])["exit_code"] == 0
        created = json.loads(outputs[1])
        assert created["exit_code"] == 0, created
        vm = json.loads(created["output"])
        assert vm["name"] == name and vm["status"] == "running", vm
        assert f'"{name}"' in outputs[2].split()
    # and it really was HTTP/2 (then 1.1) over TLS with our CA
    for flag, want in (("--http2", "2"), ("--http1.1", "1.1")):
        rc, out, err = await run("curl", "-sS", flag, "--cacert", ca, "-o", "/dev/null", "-w", "%{http_version}",
                                 f"https://{domain}/health")
        assert rc == 0 and out == want, (out, err)
    # every promised host completes a handshake: a private port URL (401: it is private), an unknown VM (404)
    for host, status in ((f"3000-api1.localhost:{port}", 401), (f"nosuchvm.localhost:{port}", 404)):
        rc, out, err = await run("curl", "-sS", "--cacert", ca, "-o", "/dev/null", "-w", "%{http_code}",
                                 "--resolve", f"{host.split(':')[0]}:{port}:127.0.0.1", f"https://{host}/")
        assert rc == 0 and out == str(status), (host, out, err)
    # ... and the owner opens the private port URL with a token, without making it public
    rc, out, err = await run("curl", "-sS", "--cacert", ca, "-H", f"Authorization: Bearer {token}", "-o",
                             "/dev/null", "-w", "%{http_code}", "--resolve", f"3000-api1.localhost:{port}:127.0.0.1",
                             f"https://3000-api1.localhost:{port}/")
    assert rc == 0 and out == "502", (out, err)  # allowed; nothing listens on 3000 in a fresh VM
    assert caddy_reloads(caddy.base_dir) == 0  # two VMs created: Caddy's config never changed


@pytest.mark.parametrize("level", ["INFO", "debug"])
async def test_the_servers_log_level_decides_whether_caddy_logs_its_proxy(server_factory: Callable[..., Any],
                                                                           level: str) -> None:
    """The running managed Caddy leaves its proxy's lines out of its log unless the server logs at DEBUG."""
    server = await server_factory(https_addr=f"127.0.0.1:{free_port()}", tls="internal", log_level=level)
    https = server.app.https
    assert https is not None and not https.error, https.error
    caddy = https.caddy
    assert isinstance(caddy, ManagedCaddy) and caddy.admin is not None
    running = await caddy.admin.get_config("logging")
    assert running == caddy_logging(caddy.log_path, debug=level == "debug")
    assert ("exclude" in running["logs"]["default"]) is (level == "INFO")


async def test_streams_survive_other_users_churn(web: Web, needs_vms: None) -> None:
    """A WebSocket to A (public) and two to B (private, through forward-auth: the owner's browser session and a
    Bearer token), slow downloads from B and >= 50 sequential curls to C all complete without error while another
    user runs 20 new/share set-public/rename/rm commands."""
    alice = await web.server.register("alice")
    bob = await web.server.register("bob")
    for vm in ("vma", "vmb", "vmc"):
        await new_vm(web, alice, vm)
    for vm in ("vma", "vmc"):
        assert (await web.cmd(alice, "share", "set-public", vm)).exit_status == 0
    token = await token_of(web, alice)
    caddy = web.server.app.https.caddy
    churn_done = asyncio.Event()
    churn_log: list[str] = []

    async def churn() -> None:
        try:
            for i in range(5):
                for argv in (("new", f"--name=chn{i}"), ("share", "set-public", f"chn{i}"),
                             ("rename", f"chn{i}", f"chn{i}x"), ("rm", f"chn{i}x", "--yes")):
                    r = await web.cmd(bob, *argv)
                    churn_log.append(f"{' '.join(argv)} -> {r.exit_status}")
                    assert r.exit_status == 0, r
        finally:
            churn_done.set()

    async def websocket(vm: bytes, extra: bytes = b"") -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", web.port)
        key = base64.b64encode(os.urandom(16))
        writer.write(b"GET /ws HTTP/1.1\r\nHost: " + vm + b".localhost:" + str(web.port).encode() + b"\r\n"
                     b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     + extra + b"Sec-WebSocket-Key: " + key + b"\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        expected = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())  # noqa: S324
        assert expected in head
        n = 0
        while not churn_done.is_set() or n < 5:
            message = b"m%d" % n
            writer.write(ws_frame(message))
            frame = await asyncio.wait_for(reader.readexactly(2 + len(message)), 10)
            assert frame == bytes([0x81, len(message)]) + message
            n += 1
            await asyncio.sleep(0.2)
        writer.close()
        return n

    async def downloads() -> int:
        done = 0
        async with httpx.AsyncClient(timeout=30) as client:
            while not churn_done.is_set() or done == 0:
                lines: list[bytes] = []
                async with client.stream("GET", f"http://127.0.0.1:{web.port}/slow/40",
                                         headers={"Host": "vmb.localhost", "Authorization": f"Bearer {token}"}) as r:
                    assert r.status_code == 200
                    async for chunk in r.aiter_bytes():
                        lines.extend(chunk.splitlines())
                assert lines == [b"%d" % i for i in range(40)]
                done += 1
        return done

    async def curls() -> int:
        n = 0
        while not churn_done.is_set() or n < 50:
            rc, out, err = await run("curl", "-sS", "--fail", f"http://vmc.localhost:{web.port}/c{n}")
            assert rc == 0 and out == f"ok /c{n}\n", (n, rc, out, err)
            n += 1
            await asyncio.sleep(0.05)
        return n

    # the owner's browser session for vmb (the sign-in flow), sent with a WebSocket as a browser sends it
    async with browser_client() as browser:
        r = await browser.get(web.url("vmb.localhost", "/"), headers={"Accept": "text/html"})
        assert r.status_code == 302, r.text
        r = await browser.get(r.headers["location"], headers={"Accept": "text/html"})
        assert r.status_code == 200, r.text
        r = await browser.get(await web.login_url(alice), headers={"Accept": "text/html"})
        assert r.status_code == 303, r.text
        r = await browser.get(r.headers["location"], headers={"Accept": "text/html"})
        assert r.status_code in (302, 303), r.text
        cookie = "; ".join(f"{c.name}={c.value}" for c in browser.cookies.jar if c.domain.startswith("vmb."))
    assert cookie
    private_ws = websocket(b"vmb", b"Authorization: Bearer " + token.encode() + b"\r\n")
    session_ws = websocket(b"vmb", b"Cookie: " + cookie.encode() + b"\r\n")
    results = await asyncio.wait_for(asyncio.gather(churn(), websocket(b"vma"), private_ws, session_ws, downloads(),
                                                    curls()), 600)
    _, ws_messages, private_ws_messages, session_ws_messages, slow_downloads, curl_count = results
    assert len(churn_log) == 20
    assert ws_messages >= 5 and private_ws_messages >= 5 and session_ws_messages >= 5
    assert slow_downloads >= 1 and curl_count >= 50
    assert caddy_reloads(caddy.base_dir) == 0  # Caddy's config never changed


async def test_streamed_responses_are_not_buffered(web: Web, needs_vms: None) -> None:
    """A chunked response (SSE, long downloads) flows through the managed Caddy chunk by chunk, both on a public
    VM's fast path and on a private VM through forward-auth: the chunks arrive spread over the ~2 s the app takes
    to write them, not all at once at the end."""
    alice = await web.server.register("alice")
    for vm in ("pubs", "privs"):
        await new_vm(web, alice, vm)
    assert (await web.cmd(alice, "share", "set-public", "pubs")).exit_status == 0
    token = await token_of(web, alice)
    async with httpx.AsyncClient(timeout=30) as client:
        for host, headers in (("pubs.localhost", {}), ("privs.localhost", {"Authorization": f"Bearer {token}"})):
            arrivals: list[float] = []
            body = b""
            async with client.stream("GET", f"http://127.0.0.1:{web.port}/slow/20",
                                     headers={"Host": host, **headers}) as r:
                assert r.status_code == 200, (host, r.status_code)
                async for chunk in r.aiter_raw():
                    arrivals.append(time.monotonic())
                    body += chunk
            assert body.splitlines() == [b"%d" % i for i in range(20)], host
            assert len(arrivals) >= 10 and arrivals[-1] - arrivals[0] >= 1.5, (host, len(arrivals))


async def test_caddy_killed_comes_back_within_10s(web: Web, needs_vms: None) -> None:
    alice = await web.server.register("alice")
    await new_vm(web, alice, "kbox")
    assert (await web.cmd(alice, "share", "set-public", "kbox")).exit_status == 0
    https = web.server.app.https
    caddy = https.caddy
    assert isinstance(caddy, ManagedCaddy) and caddy.pid
    health = f"http://127.0.0.1:{web.server.app.http_port}/health"
    async with browser_client() as c, httpx.AsyncClient(timeout=5) as raw:
        assert (await c.get(web.url("kbox.localhost"))).status_code == 200
        h = (await raw.get(health)).json()
        assert h["https"]["state"] == "running" and h["https"]["restarts"] == 0
        old_pid = caddy.pid
        os.kill(old_pid, signal.SIGKILL)
        t0 = time.monotonic()
        saw_down = False
        while True:
            with contextlib.suppress(httpx.TransportError):
                r = await c.get(web.url("kbox.localhost", "/again"))
                if r.status_code == 200 and r.text == "ok /again\n":
                    break
            h = await raw.get(health)
            saw_down = saw_down or h.status_code == 503
            assert time.monotonic() - t0 < 10, "the VM URL did not answer again within 10 s"
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - t0
        assert caddy.pid != old_pid
        while (h := await raw.get(health)).status_code != 200:  # the watchdog finishes its checks
            assert time.monotonic() - t0 < 10, h.text
            await asyncio.sleep(0.05)
        assert h.json()["https"]["state"] == "running" and h.json()["https"]["restarts"] == 1
        print(f"Caddy back after kill -9 in {elapsed:.2f} s (503 seen while down: {saw_down})")



async def test_public_vm_names_signed_in_visitors_only(web: Web, needs_vms: None) -> None:
    """A visitor signed in to a public VM's host gets the X-Ussy-* headers; an anonymous one is served without
    them (and without asking the app server: the public fast path)."""
    from .test_access import HTML, sign_in

    alice = await web.server.register("alice")
    await web.new_vm(alice, "pubid")
    async with browser_client() as signed, browser_client() as anon:
        assert (await sign_in(web, signed, alice, "pubid")).status_code == 200
        assert (await web.cmd(alice, "share", "set-public", "pubid")).exit_status == 0
        forged = {"X-Ussy-Handle": "mallory", "X-Ussy-Access": "owner"}
        r = await signed.get(web.url("pubid.localhost", "/x"), headers={**HTML, **forged})
        h = r.json()["headers"]
        assert (h["x-ussy-handle"], h["x-ussy-access"]) == ("alice", "public"), h
        assert h["x-ussy-user-id"]
        r = await anon.get(web.url("pubid.localhost", "/x"), headers=forged)
        assert r.status_code == 200 and not [k for k in r.json()["headers"] if k.startswith("x-ussy")]
    await fast_path(web, "pubid.localhost")  # anonymous visitors are now served with no app server hop


# Takes a request and hangs up without answering; each request line goes to /tmp/hits.
HANGUP_APP = r'''
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
while True:
    c, _ = s.accept()
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = c.recv(65536)
        if not chunk:
            break
        data += chunk
    with open("/tmp/hits", "a") as f:
        f.write(data.split(b"\r\n", 1)[0].decode() + "\n")
    c.close()
'''


async def fast_path(web: Web, host: str) -> None:
    """Wait until ``host`` has its own listener or route (opened after forward-auth first served it as public)
    and Caddy dials it: a routed host's name reaches Caddy's lookups within seconds (its hosts file is read
    again at most every 5 s); until then requests still take the fallback."""
    routes = web.server.app.https.routes
    for _ in range(200):
        if host in routes.hosts.current():
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError(f"{host} got no listener of its own")
    if routes.hosts.links is None:
        return
    async with browser_client() as c:
        for _ in range(100):
            before = auth_decisions()
            r = await c.get(web.url(host, "/fast-path-probe"))
            assert r.status_code == 200, r.text
            if auth_decisions() == before:
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"Caddy never dialed {host}'s route")


async def leave_fast_path(web: Web, host: str) -> None:
    """Take ``host`` off the fast path behind the server's back (as a host whose name does not fit)."""
    hosts = web.server.app.https.routes.hosts
    if hosts.links is None:
        (hosts.sockets / host).unlink()
        return
    proc = await asyncio.create_subprocess_exec("ip", "route", "del", hosts.links.addresses[host] + "/32")
    assert await proc.wait() == 0


def auth_decisions() -> float:
    return sum(s.value for m in FORWARD_AUTH.collect() for s in m.samples if s.name.endswith("_total"))


async def test_hosts_without_a_public_socket_fall_back_with_their_body_and_nothing_is_replayed(
        web: Web, needs_vms: None) -> None:
    """The public route dials ``sockets/<host>`` for every plain host name without asking anyone. A host with no
    such socket (private, unknown, or a public host left off the fast path) fails that dial before a byte is sent,
    and the error routes hand the request, its body included, to forward-auth. Any other failure (the app took the
    request and hung up) is a page: a request is never sent to a VM twice."""
    alice = await web.server.register("alice")
    await web.new_vm(alice, "fbk")  # the echo app on 8080
    # started without serve_app's readiness probe: each connection, a probe's too, counts as a hit
    r = await web.server.ssh(alice, "cat > /tmp/hang.py && (setsid nohup python3 /tmp/hang.py 3000 >/dev/null 2>&1 &)"
                             " && sleep 0.5", user="fbk", stdin=HANGUP_APP.encode())
    assert r.exit_status == 0, r
    for port in ("", "--port=3000"):
        assert (await web.cmd(alice, "share", "set-public", "fbk", *([port] if port else []))).exit_status == 0
    routes = web.server.app.https.routes
    assert routes is not None
    body = secrets.token_hex(300_000)

    async def hits() -> list[str]:
        r = await web.server.ssh(alice, "cat /tmp/hits 2>/dev/null; true", user="fbk")
        return r.stdout.splitlines()

    async with browser_client() as c:
        before = auth_decisions()
        r = await c.post(web.url("fbk.localhost", "/first"), content=body)
        assert r.status_code == 200 and r.json()["body"] == body  # through forward-auth, which opens the listener
        assert auth_decisions() == before + 1
        await fast_path(web, "fbk.localhost")
        before = auth_decisions()
        r = await c.post(web.url("fbk.localhost", "/up"), content=body)
        assert r.status_code == 200 and r.json()["body"] == body
        assert auth_decisions() == before  # the fast path: nobody asked
        # a public host without its socket (as one whose name does not fit a socket address): the same answer,
        # through forward-auth, body intact
        await leave_fast_path(web, "fbk.localhost")
        r = await c.post(web.url("fbk.localhost", "/up"), content=body)
        assert r.status_code == 200 and r.json()["body"] == body
        assert auth_decisions() == before + 1
        for change in ("set-private", "set-public"):  # a new publication: its listener opens when asked for
            assert (await web.cmd(alice, "share", change, "fbk")).exit_status == 0
        assert (await c.get(web.url("fbk.localhost", "/again"))).status_code == 200
        await fast_path(web, "fbk.localhost")
        assert "fbk.localhost" in routes.hosts.current()
        # the app hangs up: a page, and the request reached the app once
        for method in ("GET", "POST"):
            r = await c.request(method, web.url("3000-fbk.localhost", f"/{method}"), content=body if method == "POST"
                                else None, headers={"Accept": "text/html"})
            assert r.status_code == 502 and "nothing answers" in r.text
        assert await hits() == ["GET /GET HTTP/1.1", "POST /POST HTTP/1.1"]
        # the same through forward-auth (private port, a token)
        assert (await web.cmd(alice, "share", "set-private", "fbk", "--port=3000")).exit_status == 0
        token = await token_of(web, alice)
        r = await c.post(web.url("3000-fbk.localhost", "/again"), content=body,
                         headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 502 and r.json()["reason"] == "no_listener"
        assert (await hits())[2:] == ["POST /again HTTP/1.1"]
        # anonymous on the private port: the failed dial falls back to forward-auth, which asks for credentials
        r = await c.post(web.url("3000-fbk.localhost", "/anon"), content=body)
        assert r.status_code == 401 and len(await hits()) == 3


# A keep-alive app that answers every request with its argument (which VM answered).
ID_APP = r'''
import asyncio, sys
BODY = sys.argv[2].encode() + b"\n"
async def handle(r, w):
    try:
        while True:
            await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
            await w.drain()
    except Exception:
        pass
    w.close()
async def main():
    await (await asyncio.start_server(handle, "0.0.0.0", int(sys.argv[1]))).serve_forever()
asyncio.run(main())
'''


async def test_kept_connections_never_outlive_a_public_host(web: Web, needs_vms: None) -> None:
    """Caddy keeps idle connections to an upstream per dial address, that is per public host name. When the name
    stops being public, or moves to another user's VM, the connections kept for it end with its listener: the
    next request is decided anew and reaches the VM that has the name now, never the one that had it."""
    alice, bob = await web.server.register("alice"), await web.server.register("bob")

    async def serve_id(key: Path, vm: str, ident: str) -> None:
        assert (await web.cmd(key, "new", f"--name={vm}", "--json")).exit_status == 0
        await serve_app(web, key, vm, 8080, ID_APP, ident)
        assert (await web.cmd(key, "share", "set-public", vm)).exit_status == 0

    await serve_id(alice, "keep1", "alice-keep1")
    async with browser_client() as c:
        assert (await c.get(web.url("keep1.localhost"))).text == "alice-keep1\n"
        await fast_path(web, "keep1.localhost")
        for _ in range(5):  # Caddy now keeps a connection for keep1.localhost
            r = await c.get(web.url("keep1.localhost"))
            assert r.status_code == 200 and r.text == "alice-keep1\n"
        assert (await web.cmd(alice, "share", "set-private", "keep1")).exit_status == 0
        r = await c.get(web.url("keep1.localhost"), headers={"Accept": "application/json"})
        assert r.status_code == 401, (r.status_code, r.text)
        assert (await web.cmd(alice, "share", "set-public", "keep1")).exit_status == 0
        assert (await c.get(web.url("keep1.localhost"))).text == "alice-keep1\n"
        await fast_path(web, "keep1.localhost")
        for _ in range(5):
            assert (await c.get(web.url("keep1.localhost"))).text == "alice-keep1\n"
        assert (await web.cmd(alice, "rename", "keep1", "moved1")).exit_status == 0
        await serve_id(bob, "keep1", "bob-keep1")
        for _ in range(5):
            r = await c.get(web.url("keep1.localhost"))
            assert r.status_code == 200 and r.text == "bob-keep1\n"
        assert (await c.get(web.url("moved1.localhost"))).text == "alice-keep1\n"
