"""HTTPS-entry benchmark: requests/s and p50/p99 through Caddy to a small HTTP server in a real VM, for a public VM
and a private VM with a session (forward-auth on every request), against the same server reached directly through
the port bridge (same code as Caddy's bridge, on a loopback TCP port instead of a unix socket), in the same run.

Goals: public >= 80% of direct, private >= 50%. Loopback only, ``--tls off``, ``wrk`` (Debian) with 1 thread,
bounded duration. Writes bench/results/proxy.json and prints a table.
Usage: .venv/bin/python -m bench.bench_proxy [--duration S] [--connections N]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import asyncssh
import httpx

from bench.bench_exec import free_port, run_wrk
from bench.common import row, write
from ussycode.app import App
from ussycode.auth.identity import Actor
from ussycode.auth.keys import parse_authorized_key
from ussycode.config import load_settings
from ussycode.proxy.bridge import pipe

IMAGES = Path(os.environ.get("USSYCODE_TEST_IMAGES_DIR", "/var/tmp/ussycode-test-images"))

# A small keep-alive HTTP/1.1 server for inside the VM (asyncio, fixed answer).
VM_SERVER = r'''
import asyncio, sys
BODY = b"hello from the vm\n"
RESP = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
async def handle(r, w):
    try:
        while True:
            await r.readuntil(b"\r\n\r\n")
            w.write(RESP)
            await w.drain()
    except Exception:
        pass
    w.close()
async def main():
    server = await asyncio.start_server(handle, "0.0.0.0", int(sys.argv[1]), backlog=512)
    await server.serve_forever()
asyncio.run(main())
'''


async def start_vm_app(app: App, key: asyncssh.SSHKey, vm: str) -> None:
    assert app.ssh_port is not None
    async with asyncssh.connect("127.0.0.1", app.ssh_port, username=vm, client_keys=[key], known_hosts=None,
                                agent_path=None, config=[]) as conn:
        r = await conn.run("cat > /tmp/srv.py && (setsid nohup python3 /tmp/srv.py 8080 >/tmp/srv.log 2>&1 &)"
                           " && sleep 0.5", input=VM_SERVER, check=False)
        assert r.exit_status == 0, r.stderr


async def direct_bridge(app: App, vm_id: str) -> tuple[asyncio.Server, int]:
    """The port bridge's code path (runtime.open_connection + pipe) on a TCP port wrk can reach."""
    assert app.services is not None
    runtime = app.services.vms.runtime

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = await runtime.open_connection(vm_id, 8080)
        await pipe((reader, writer), upstream)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


def closed_app_connections(port: int | None) -> int:
    """TCP connections to the app server closed recently (TIME-WAIT): a sign that keep-alive is not used."""
    import subprocess

    out = subprocess.run(["ss", "-Htan", "state", "time-wait", f"( sport = :{port} or dport = :{port} )"],
                         capture_output=True, text=True, check=False).stdout
    return len(out.splitlines())


async def main(duration: float, connections: int) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="ub-", dir="/var/tmp"))
    https_port = free_port()
    settings = load_settings(data_dir=str(tmp / "d"), images_dir=str(IMAGES), ssh_addr="127.0.0.1:0",
                             http_addr="127.0.0.1:0", https_addr=f"127.0.0.1:{https_port}", tls="off",
                             runtime="container", default_image="ussyuntu-mini", rate_per_minute=10**9,
                             rate_burst=10**9, log_level="WARNING")
    app = App(settings)
    await app.start()
    results: dict[str, Any] = {}
    try:
        s = app.services
        assert s is not None and s.shares is not None and s.sessions is not None
        assert app.https is not None and not app.https.error, app.https.error if app.https else ""
        key = asyncssh.generate_private_key("ssh-ed25519")
        user = await s.users.register("bench", parse_authorized_key(key.export_public_key().decode()))
        actor = Actor(user, "ssh")
        pub = await s.vms.create(actor, name="bpub")
        priv = await s.vms.create(actor, name="bpriv")
        for vm in ("bpub", "bpriv"):
            await start_vm_app(app, key, vm)
        await s.shares.set_public(actor, "bpub", True)
        # a browser session on the private VM's host, made the way the browser flow makes it
        token = await s.sessions.create_login_token(actor)
        redeemed = await s.sessions.redeem_login_token(token, settings.domain)
        assert redeemed is not None
        code = await s.sessions.create_handoff(redeemed[1], "bpriv.localhost")
        child = await s.sessions.redeem_handoff(code, "bpriv.localhost")
        assert child is not None
        cookie = f"ussy_session={child[0]}"
        server, direct_port = await direct_bridge(app, pub.id)
        runtime = s.vms.runtime
        opened = {"n": 0}
        real_open = runtime.open_connection

        async def counting_open(vm_id: str, port: int) -> Any:
            opened["n"] += 1
            return await real_open(vm_id, port)

        runtime.open_connection = counting_open  # type: ignore[method-assign]
        caddy = f"http://127.0.0.1:{https_port}/"
        auth = s.routes.auth_url if s.routes else ""
        cases = {
            "direct": (f"http://127.0.0.1:{direct_port}/", {}),
            # diagnostics: the app server alone (health) and the forward-auth decision alone
            "app_health": (f"http://127.0.0.1:{app.http_port}/health", {}),
            "forward_auth": (auth, {"X-Forwarded-Host": f"bpriv.localhost:{https_port}", "Cookie": cookie,
                                    "X-Forwarded-Uri": "/", "X-Forwarded-Method": "GET"}),
            "public": (caddy, {"Host": f"bpub.localhost:{https_port}"}),
            "private": (caddy, {"Host": f"bpriv.localhost:{https_port}", "Cookie": cookie}),
        }
        async with httpx.AsyncClient() as c:  # every path answers the VM's 200 before we measure
            for name, (url, headers) in cases.items():
                r = await c.get(url, headers=headers)
                assert r.status_code == 200, (name, r.status_code, r.text)
        for name, (url, headers) in cases.items():
            await run_wrk(url, "GET", None, headers, 1, connections, tmp)  # warm-up
            before = opened["n"]
            closed_before = closed_app_connections(app.http_port)
            results[name] = await run_wrk(url, "GET", None, headers, duration, connections, tmp)
            results[name]["vm_connections"] = opened["n"] - before
            results[name]["app_connections_closed"] = closed_app_connections(app.http_port) - closed_before
        server.close()
        for vm in (pub, priv):
            await s.vms.remove(actor, vm.name)
    finally:
        await app.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def report(results: dict[str, Any], duration: float, connections: int) -> None:
    d = results["direct"]
    rows = [row("direct_rps", d["rps"], "req/s", "direct_rps", d["rps"])]
    for name, goal in (("public", 0.8), ("private", 0.5)):
        r = results[name]
        ratio = r["rps"] / d["rps"]
        rows.append(row(f"{name}_rps", r["rps"], "req/s", "direct_rps", d["rps"], f">= {goal:.0%} of direct",
                        ratio >= goal))
    for name in ("app_health", "forward_auth"):
        rows.append(row(f"{name}_rps", results[name]["rps"], "req/s", "direct_rps", d["rps"]))
    for name in ("direct", "public", "private"):
        r = results[name]
        rows.append(row(f"{name}_p50_ms", r["p50_ms"], "ms", "direct_p50_ms", d["p50_ms"]))
        rows.append(row(f"{name}_p99_ms", r["p99_ms"], "ms", "direct_p99_ms", d["p99_ms"]))
    notes = [f"wrk -t1 -c{connections}, {duration:g} s per case after a 1 s warm-up, loopback, --tls off, "
             f"{os.cpu_count()} CPUs shared with the server, Caddy and the VM",
             "direct = the port bridge's code path (runtime.open_connection + pipe) on a TCP port; "
             "public/private = wrk -> Caddy -> unix-socket bridge -> VM; private adds forward-auth (app server, "
             "session + share lookup in SQLite) on every request",
             "connections opened into the VM: " + ", ".join(f"{k}: {v['vm_connections']}"
                                                            for k, v in results.items()),
             "app-server connections closed (TIME-WAIT) during each case: "
             + ", ".join(f"{k}: {v['app_connections_closed']}" for k, v in results.items()),
             "errors: " + ", ".join(f"{k}: non-2xx {v['non_2xx']}, socket {v['socket_errors']}"
                                    for k, v in results.items())]
    write("proxy", rows, notes)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per case (after a 1 s warm-up)")
    ap.add_argument("--connections", type=int, default=16)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not installed (apt-get install -y wrk)")
    report(asyncio.run(main(args.duration, args.connections)), args.duration, args.connections)
