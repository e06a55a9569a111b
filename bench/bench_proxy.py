"""HTTPS-entry benchmark: requests/s and p50/p99 through Caddy to a small HTTP server in a real VM, for a public VM
and a private VM with a signed-in browser (its grant checked by Caddy; forward-auth once per grant), against a
baseline measured in the same run:
**the same Caddy binary reverse-proxying to the same small HTTP server on a host loopback port** (what any Caddy
deployment costs). The old "direct" figure (the Python port bridge on a TCP port) is kept for continuity.

Also the cost of a route change: the time from ``share set-public`` returning to the URL answering publicly,
and the p99 of requests to another VM while route changes run back to back, against the same p99 without.

Goals: public >= 80% of the baseline's req/s and p99 <= 1.5x; private >= 50%; p99 under changes <= 1.2x.
Loopback only, ``--tls off``, ``wrk`` (Debian) with 1 thread, bounded duration. Writes bench/results/proxy.json
and prints a table. Usage: .venv/bin/python -m bench.bench_proxy [--duration S] [--connections N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
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
from ussycode.proxy import links
from ussycode.proxy.bridge import Forwarder, pipe
from ussycode.proxy.front import FrontSettings, build_public_route, routed_transport
from ussycode.proxy.grants import GRANT_COOKIE
from ussycode.proxy.hosts import PublicHosts
from ussycode.proxy.manager import ManagedCaddy, caddy_binary, caddy_logging, go_runtime_env, machine_memory
from ussycode.proxy.routes import ServerSettings
from ussycode.runtime import netns
from ussycode.telemetry import FORWARD_AUTH

ROUNDS = 3
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


async def direct_bridge(app: App, vm_id: str) -> tuple[asyncio.Server, int, list[asyncio.StreamWriter]]:
    """The port bridge's code path (runtime.open_connection + pipe) on a TCP port wrk can reach; also the
    connections' writers, for ending them when the benchmark is over."""
    assert app.services is not None
    runtime = app.services.vms.runtime
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = await runtime.open_connection(vm_id, 8080)
        writers.extend((writer, upstream[1]))
        await pipe((reader, writer), upstream)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1]), writers


# The public path taken apart (diagnostic rows): the same Caddy binary and small server, adding one part at a time,
# in a Caddy run as the managed one is (its garbage-collector and log settings); "tuned" is the baseline's route
# alone there.
PARTS = ("tuned", "chain", "forwarder", "chain_forwarder", "routed")
PART_HOST = "part.localhost"


class RoutedPart:
    """The same small server in a network namespace of its own (the VMs' firewall, no VM limits), reached the
    routed hosts' way: a veth link, an address of its own, DNAT (what separates it from a routed public VM is the
    VM itself)."""

    def __init__(self, front_links: links.FrontLinks, script: Path) -> None:
        self.links, self.script = front_links, script
        self.ns = f"ussy-bench{os.getpid() % 100000}"
        self.proc: asyncio.subprocess.Process | None = None
        self.routed: links.RoutedHost | None = None

    async def start(self) -> str:
        for argv in [*netns.setup_argvs(self.ns), netns.nft_apply_argv(self.ns)]:
            stdin = netns.nft_ruleset(netns.host_addresses()).encode() if argv[-1] == "-" else None
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE)
            await proc.communicate(stdin)
        self.proc = await asyncio.create_subprocess_exec("ip", "netns", "exec", self.ns, sys.executable,
                                                         str(self.script), str(links.DIAL_PORT))
        self.routed = await self.links.open("bench-part", netns.NETNS_DIR / self.ns, links.DIAL_PORT, listed=False)
        return f"{self.routed.addr}:{links.DIAL_PORT}"

    async def close(self) -> None:
        if self.routed is not None:
            await self.routed.close()
        if self.proc is not None:
            self.proc.terminate()
            await self.proc.wait()
        proc = await asyncio.create_subprocess_exec("ip", "netns", "del", self.ns)
        await proc.wait()


async def baseline_caddy(tmp: Path, front_links: links.FrontLinks | None) -> tuple[list[Any], int, dict[str, int]]:
    """The same small server on a host loopback port, behind the same Caddy binary (a plain reverse_proxy, Go's
    default runtime settings and a plain log: any Caddy deployment), plus, in a second Caddy run with the managed
    Caddy's runtime and log settings, the same plain proxy and servers that add the public path's parts one at a
    time: the trust chain (the production public route's handlers, dialing the server's TCP port), a plain proxy
    through the production forwarder (``systemd-socket-proxyd``, here in the host's namespace), and the production
    public route dialing that forwarder as a public host's listener; with routed hosts, also a plain proxy over a
    routed link. Returns the processes (the baseline's Caddy, the server, the second Caddy, then the rest), the
    baseline's port and the parts' ports."""
    server_port, caddy_port = free_port(), free_port()
    script = tmp / "srv.py"
    script.write_text(VM_SERVER)
    srv = await asyncio.create_subprocess_exec(sys.executable, str(script), str(server_port))
    hosts = PublicHosts(tmp / "front")
    hosts.sockets.mkdir(parents=True)
    forwarder = Forwarder(Path("/proc/self/ns/net"), "bench", server_port, hosts.sockets / PART_HOST)
    await forwarder.start()
    settings = ServerSettings(domain="localhost", http_addr="127.0.0.1:9")  # /__ussycode/* is never asked
    public = build_public_route(settings, FrontSettings("http://127.0.0.1:9/auth", hosts.dial_template()))
    assert public is not None
    tcp = f"127.0.0.1:{server_port}"
    chain = public["handle"][:-1] + [{**public["handle"][-1], "upstreams": [{"dial": tcp}]}]
    plain = {"handle": [{"handler": "reverse_proxy", "upstreams": [{"dial": tcp}]}]}
    routes = {
        "baseline": plain,
        "tuned": plain,
        "chain": {"handle": chain},
        "forwarder": {"handle": [{"handler": "reverse_proxy", "upstreams": [{"dial": forwarder.dial}]}]},
        "chain_forwarder": public,
    }
    parts: list[Any] = [forwarder]
    if front_links is not None:
        routed = RoutedPart(front_links, script)
        parts.append(routed)
        routes["routed"] = {"handle": [{"handler": "reverse_proxy", "upstreams": [{"dial": await routed.start()}],
                                        "transport": routed_transport()}]}
    ports = {name: (caddy_port if name == "baseline" else free_port()) for name in routes}
    servers = {name: {"listen": [f"127.0.0.1:{ports[name]}"], "automatic_https": {"disable": True},
                      "routes": [{k: v for k, v in route.items() if k != "@id"}]} for name, route in routes.items()}
    default_env = {k: v for k, v in os.environ.items() if k not in ("GOGC", "GOMEMLIMIT")}
    managed_env = {**default_env, **go_runtime_env(default_env, machine_memory())}
    caddies = []
    for name, chosen, env in (("baseline", {"baseline"}, default_env),
                              ("tuned", set(routes) - {"baseline"}, managed_env)):
        logging = {"logs": {"default": {"level": "ERROR"}}} if name == "baseline" else caddy_logging(tmp / "tuned.log")
        config = {"admin": {"disabled": True}, "logging": logging,
                  "apps": {"http": {"servers": {k: v for k, v in servers.items() if k in chosen}}}}
        (tmp / f"{name}.json").write_text(json.dumps(config))
        caddies.append(await asyncio.create_subprocess_exec(
            caddy_binary(), "run", "--config", str(tmp / f"{name}.json"), env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL))
    caddy, tuned = caddies
    async with httpx.AsyncClient() as c:
        for _ in range(100):
            try:
                if (await c.get(f"http://127.0.0.1:{caddy_port}/")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
        for name in routes:  # every part answers before anything is measured
            for _ in range(100):
                try:
                    r = await c.get(f"http://127.0.0.1:{ports[name]}/", headers={"Host": PART_HOST})
                    if r.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
    return [caddy, srv, tuned, *parts], caddy_port, {name: ports[name] for name in PARTS if name in routes}


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_cpu_seconds(vm_id: str) -> float:
    """CPU time the processes now in a VM's cgroup have used (v1 ``cpu`` hierarchy or v2)."""
    for procs in (Path("/sys/fs/cgroup/cpu/ussycode", vm_id, "cgroup.procs"),
                  Path("/sys/fs/cgroup/ussycode", vm_id, "cgroup.procs")):
        with contextlib.suppress(OSError):
            total = 0.0
            for pid in procs.read_text().split():
                with contextlib.suppress(OSError):
                    total += cpu_seconds(int(pid))
            return total
    return 0.0


def machine_cpu_seconds() -> tuple[float, float]:
    """CPU time every core of the machine spent busy, and idle (``/proc/stat``)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK"), idle / os.sysconf("SC_CLK_TCK")


async def time_to_public(s: Any, actor: Actor, url: str, host: str, rounds: int = 10) -> list[float]:
    """Seconds from ``share set-public`` returning to the URL answering 200 to an anonymous client."""
    out = []
    async with httpx.AsyncClient() as c:
        for _ in range(rounds):
            await s.shares.set_public(actor, "bchg", False)
            assert (await c.get(url, headers={"Host": host})).status_code == 401
            await s.shares.set_public(actor, "bchg", True)
            t0 = time.perf_counter()
            while (await c.get(url, headers={"Host": host})).status_code != 200:
                await asyncio.sleep(0.001)
            out.append(time.perf_counter() - t0)
    return out


def closed_app_connections(port: int | None) -> int:
    """TCP connections to the app server closed recently (TIME-WAIT): a sign that keep-alive is not used."""
    import subprocess

    out = subprocess.run(["ss", "-Htan", "state", "time-wait", f"( sport = :{port} or dport = :{port} )"],
                         capture_output=True, text=True, check=False).stdout
    return len(out.splitlines())


def auth_decisions() -> float:
    return sum(s.value for m in FORWARD_AUTH.collect() for s in m.samples if s.name.endswith("_total"))


async def until_fast(url: str, headers: dict[str, str], timeout: float = 15.0) -> None:
    """Wait until a request to ``url`` is answered without a forward-auth decision."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as c:
        while time.monotonic() < deadline:
            before = auth_decisions()
            assert (await c.get(url, headers=headers)).status_code == 200
            if auth_decisions() == before:
                return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} ({headers.get('Host')}) never took its fast path")


async def main(duration: float, connections: int) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="ub-", dir="/var/tmp"))
    https_port = free_port()
    settings = load_settings(data_dir=str(tmp / "d"), images_dir=str(IMAGES), ssh_addr="127.0.0.1:0",
                             smtp_addr="127.0.0.1:0", admin_addr="127.0.0.1:0",
                             http_addr="127.0.0.1:0", https_addr=f"127.0.0.1:{https_port}",
                             tls="off",
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
        user = await s.users.register("bench", parse_authorized_key(key.export_public_key().decode().strip()))
        actor = Actor(user, "ssh")
        pub = await s.vms.create(actor, name="bpub")
        priv = await s.vms.create(actor, name="bpriv")
        chg = await s.vms.create(actor, name="bchg")
        for vm in ("bpub", "bpriv", "bchg"):
            await start_vm_app(app, key, vm)
        await s.shares.set_public(actor, "bpub", True)
        # a browser session on the private VM's host, made the way the browser flow makes it
        token = await s.sessions.create_login_token(actor)
        redeemed = await s.sessions.redeem_login_token(token, settings.domain)
        assert redeemed is not None
        cookies = {}
        for vm in (priv, pub):  # a session per VM host, as the hand-off makes them
            code = await s.sessions.create_handoff(redeemed[1], f"{vm.name}.localhost", vm.id)
            child = await s.sessions.redeem_handoff(code, f"{vm.name}.localhost", vm.id)
            assert child is not None
            cookies[vm.name] = f"ussy_session={child[0]}"
        cookie = cookies["bpriv"]
        server, direct_port, direct_writers = await direct_bridge(app, pub.id)
        procs, baseline_port, part_ports = await baseline_caddy(tmp, s.routes.hosts.links if s.routes else None)
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
            "baseline": (f"http://127.0.0.1:{baseline_port}/", {}),
            **{f"caddy_{name}": (f"http://127.0.0.1:{port}/", {"Host": PART_HOST})
               for name, port in part_ports.items()},
            "direct": (f"http://127.0.0.1:{direct_port}/", {}),
            # diagnostics: the app server alone (health) and the forward-auth decision alone
            "app_health": (f"http://127.0.0.1:{app.http_port}/health", {}),
            "forward_auth": (auth, {"X-Forwarded-Host": f"bpriv.localhost:{https_port}", "Cookie": cookie,
                                    "X-Forwarded-Uri": "/", "X-Forwarded-Method": "GET"}),
            # the same endpoint on the app server (uvicorn + Starlette), for comparison with the lean listener
            "forward_auth_app_server": (f"http://127.0.0.1:{app.http_port}/" + auth.split("/", 3)[3],
                                        {"X-Forwarded-Host": f"bpriv.localhost:{https_port}", "Cookie": cookie,
                                         "X-Forwarded-Uri": "/", "X-Forwarded-Method": "GET"}),
            "public": (caddy, {"Host": f"bpub.localhost:{https_port}"}),
            "public_signed_in": (caddy, {"Host": f"bpub.localhost:{https_port}", "Cookie": cookies["bpub"]}),
            "private": (caddy, {"Host": f"bpriv.localhost:{https_port}", "Cookie": cookie}),
            # a client that keeps no cookie but the session: forward-auth on every request
            "private_no_grant": (caddy, {"Host": f"bpriv.localhost:{https_port}", "Cookie": cookie}),
        }
        async with httpx.AsyncClient() as c:  # every path answers the VM's 200 before we measure
            for name, (url, headers) in cases.items():
                r = await c.get(url, headers=headers)
                assert r.status_code == 200, (name, r.status_code, r.text)
                if name in ("private", "public_signed_in"):  # a browser keeps the grant cookie it was given
                    grant = r.cookies.get(GRANT_COOKIE)
                    assert grant, (name, r.headers)
                    headers["Cookie"] += f"; {GRANT_COOKIE}={grant}"
        # the fast paths are on before anything is measured (a routed host's name reaches Caddy within seconds)
        for name in ("public", "public_signed_in", "private"):
            await until_fast(*cases[name])
        results["routed"] = bool(s.routes and s.routes.hosts.links)
        for url, headers in cases.values():
            await run_wrk(url, "GET", None, headers, 1, connections, tmp)  # warm-up
        # The cases take turns, ROUNDS times, and each reports its median round: the two cores are shared with
        # whatever else runs, and interleaving keeps a load change from landing on one case only.
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
        # The Caddy that serves each case, for its CPU time per request (steadier than req/s on shared cores).
        managed_caddy = app.https.caddy
        assert isinstance(managed_caddy, ManagedCaddy) and managed_caddy.pid is not None
        managed = managed_caddy.pid
        serving = {name: procs[0].pid if name == "baseline" else procs[2].pid if name.startswith("caddy_") else managed
                   for name in cases if name not in ("direct", "app_health") and not name.startswith("forward_auth")}
        # The CPU time of the server that answers each case (the baseline's on the host, or a VM's), per request.
        host_server = procs[1].pid
        server_cpu: dict[str, Callable[[], float]] = {
            **{name: lambda: cpu_seconds(host_server) for name in ("baseline", "caddy_tuned", "caddy_chain")},
            **{name: functools.partial(vm_cpu_seconds, vm.id)
               for name, vm in (("public", pub), ("public_signed_in", pub), ("private", priv), ("direct", pub))}}
        for _ in range(ROUNDS):
            for name, (url, headers) in cases.items():
                before = opened["n"]
                closed_before = closed_app_connections(app.http_port)
                cpu_before = cpu_seconds(serving[name]) if name in serving else 0.0
                busy_before, idle_before = machine_cpu_seconds()
                server_before = server_cpu[name]() if name in server_cpu else 0.0
                one = await run_wrk(url, "GET", None, headers, duration, connections, tmp)
                busy_after, idle_after = machine_cpu_seconds()
                if name in server_cpu:
                    one["server_us_per_request"] = round(
                        (server_cpu[name]() - server_before) * 1e6 / max(one["requests"], 1), 1)
                one["machine_us_per_request"] = round((busy_after - busy_before) * 1e6 / max(one["requests"], 1), 1)
                one["machine_idle_share"] = round((idle_after - idle_before) / max(
                    busy_after - busy_before + idle_after - idle_before, 1e-9), 3)
                if name in serving:
                    one["caddy_us_per_request"] = round(
                        (cpu_seconds(serving[name]) - cpu_before) * 1e6 / max(one["requests"], 1), 1)
                one["vm_connections"] = opened["n"] - before
                one["app_connections_closed"] = closed_app_connections(app.http_port) - closed_before
                rounds[name].append(one)
        for name, runs in rounds.items():
            ordered = sorted(runs, key=lambda r: r["rps"])
            results[name] = {**ordered[len(ordered) // 2], "rounds_rps": [r["rps"] for r in runs],
                             "p99_ms": sorted(r["p99_ms"] for r in runs)[len(runs) // 2]}
            if name in serving:
                results[name]["caddy_us_per_request"] = sorted(r["caddy_us_per_request"] for r in runs)[len(runs) // 2]
            for key in ("machine_us_per_request", "machine_idle_share", "server_us_per_request"):
                if key in runs[0]:
                    results[name][key] = sorted(r[key] for r in runs)[len(runs) // 2]
        # route changes: time until a change is live, and what back-to-back changes cost other VMs' requests
        results["time_to_public"] = await time_to_public(s, actor, caddy, f"bchg.localhost:{https_port}")
        changes = {"n": 0}
        stop = asyncio.Event()

        async def churn() -> None:
            while not stop.is_set() or changes["n"] < 20:
                await s.shares.set_public(actor, "bchg", changes["n"] % 2 == 0)
                changes["n"] += 1
                await asyncio.sleep(0.05)

        url, headers = cases["public"]
        results["public_quiet"] = await run_wrk(url, "GET", None, headers, duration, connections, tmp)

        async def busy() -> dict[str, Any]:
            try:
                return await run_wrk(url, "GET", None, headers, duration, connections, tmp)
            finally:
                stop.set()

        results["public_during_changes"], _ = await asyncio.gather(busy(), churn())
        results["public_during_changes"]["changes"] = changes["n"]
        server.close()
        for writer in direct_writers:  # connections wrk left open: their pipes end before the loop does
            writer.transport.abort()
        await asyncio.sleep(0.1)
        for p in procs:
            if isinstance(p, (Forwarder, RoutedPart)):
                await p.close()
            else:
                p.terminate()
                await p.wait()
        for vm in (pub, priv, chg):
            await s.vms.remove(actor, vm.name)
    finally:
        await app.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def report(results: dict[str, Any], duration: float, connections: int) -> None:
    b = results["baseline"]
    rows = [row("baseline_caddy_rps", b["rps"], "req/s", "baseline_caddy_rps", b["rps"])]
    for name, goal in (("public", 0.8), ("private", 0.5), ("public_signed_in", None), ("private_no_grant", None),
                       ("direct", None)):
        r = results[name]
        ratio = r["rps"] / b["rps"]
        rows.append(row(f"{name}_rps", r["rps"], "req/s", "baseline_caddy_rps", b["rps"],
                        f">= {goal:.0%} of Caddy baseline" if goal else "", ratio >= goal if goal else None))
    parts = [f"caddy_{p}" for p in PARTS if f"caddy_{p}" in results]
    for name in ("app_health", "forward_auth", "forward_auth_app_server", *parts):
        rows.append(row(f"{name}_rps", results[name]["rps"], "req/s", "baseline_caddy_rps", b["rps"]))
    # like for like: the same plain proxy in a Caddy run with the managed Caddy's garbage-collector settings
    tuned = results["caddy_tuned"]["rps"]
    for name in ("public", "private"):
        rows.append(row(f"{name}_rps_vs_tuned_caddy", results[name]["rps"], "req/s", "caddy_tuned_rps", tuned))
    for name in ("public", "private", "public_signed_in", "direct"):
        r = results[name]
        rows.append(row(f"{name}_p50_ms", r["p50_ms"], "ms", "baseline_p50_ms", b["p50_ms"]))
        goal_p99 = name == "public"
        rows.append(row(f"{name}_p99_ms", r["p99_ms"], "ms", "baseline_p99_ms", b["p99_ms"],
                        "<= 1.5x baseline" if goal_p99 else "",
                        r["p99_ms"] <= 1.5 * b["p99_ms"] if goal_p99 else None))
    # Caddy's own CPU time per request: what our routes cost Caddy, against the plain reverse_proxy's
    base_cpu = b["caddy_us_per_request"]
    rows.append(row("baseline_caddy_cpu_us_per_request", base_cpu, "us", "baseline_caddy_cpu_us_per_request",
                    base_cpu))
    for name in ("public", "private", "public_signed_in", *parts):
        rows.append(row(f"{name}_caddy_cpu_us_per_request", results[name]["caddy_us_per_request"], "us",
                        "baseline_caddy_cpu_us_per_request", base_cpu))
    # the whole machine's busy CPU time per request (Caddy, the server, wrk, the kernel), and how idle it was
    base_machine = b["machine_us_per_request"]
    for name in ("baseline", "public", "private", "public_signed_in", *parts):
        rows.append(row(f"{name}_machine_cpu_us_per_request", results[name]["machine_us_per_request"], "us",
                        "baseline_machine_cpu_us_per_request", base_machine))
        rows.append(row(f"{name}_machine_idle_share", results[name]["machine_idle_share"], "share", "all_cpu_time",
                        1.0))
    base_server = b["server_us_per_request"]
    for name in ("baseline", "public", "private", "public_signed_in", "direct"):
        rows.append(row(f"{name}_server_cpu_us_per_request", results[name]["server_us_per_request"], "us",
                        "baseline_server_cpu_us_per_request", base_server))
    ttp = results["time_to_public"]
    rows.append(row("set_public_to_answering_max_ms", max(ttp) * 1000, "ms", "set_public_to_answering_max_ms",
                    max(ttp) * 1000))
    quiet, busy = results["public_quiet"], results["public_during_changes"]
    rows.append(row("other_vm_p99_during_changes_ms", busy["p99_ms"], "ms", "other_vm_p99_quiet_ms",
                    quiet["p99_ms"], "<= 1.2x quiet", busy["p99_ms"] <= 1.2 * quiet["p99_ms"]))
    rows.append(row("other_vm_rps_during_changes", busy["rps"], "req/s", "other_vm_rps_quiet", quiet["rps"]))
    notes = [f"wrk -t1 -c{connections}, {duration:g} s per case and round, {ROUNDS} interleaved rounds (median "
             f"reported), after a 1 s warm-up, loopback, --tls off, {os.cpu_count()} CPUs shared with the server, "
             "Caddy, the VM and anything else running",
             "req/s per round: " + "; ".join(f"{k} {v['rounds_rps']}" for k, v in results.items()
                                             if isinstance(v, dict) and "rounds_rps" in v),
             "baseline = the same Caddy binary, plain reverse_proxy to the same small server on a host loopback "
             "port, Go's default runtime settings; caddy_tuned = the same in a Caddy started with the managed "
             "Caddy's garbage-collector settings (GOGC, GOMEMLIMIT), the like-for-like baseline (*_vs_tuned_caddy); "
             + ("public = wrk -> Caddy (static config, looks the host up in its hosts file and dials the host's "
                "routed address) -> veth link -> DNAT in the VM's namespace -> VM; private = a signed-in browser "
                "(session and grant cookies): Caddy checks the grant's file and dials the VM port's routed address"
                if results.get("routed") else
                "public = wrk -> Caddy (static config, dials the host's public socket) -> C forwarder in the VM's "
                "namespace -> VM; private = a signed-in browser (session and grant cookies): Caddy checks the "
                "grant's file and dials the VM port's bridge")
             + ", with forward-auth once per grant (its life: 2 s, or until any DB write); "
             "public_signed_in the same on a public VM (identity headers); private_no_grant = a client that keeps "
             "only the session cookie: forward-auth (lean listener, cached decision inputs) on every request; "
             "direct = the Python port bridge on a TCP port",
             "caddy_chain/_forwarder/_chain_forwarder = caddy_tuned's Caddy and server with the public path's "
             "parts added one at a time (the production public route's trust chain, the production C forwarder "
             "on the host, both); caddy_routed = caddy_tuned's Caddy over a routed link (veth, an address of its "
             "own, DNAT) to the same server in a network namespace of its own with the VMs' firewall; what "
             "separates caddy_routed (or, with forwarders, caddy_chain_forwarder) from public is the VM and the "
             "public route's own work in Caddy (host match, trust-chain handlers, the name lookup, the routes "
             "before it), which *_caddy_cpu_us_per_request shows: Caddy's CPU time per request in each case",
             f"route changes: share set-public -> URL answers in max {max(ttp) * 1000:.2f} ms over {len(ttp)} "
             f"rounds; {busy['changes']} set-public/set-private changes of another VM ran during the busy case",
             "app-server connections closed (TIME-WAIT) during each case: " + ", ".join(
                 f"{k}: {v['app_connections_closed']}" for k, v in results.items() if isinstance(v, dict)
                 and "app_connections_closed" in v),
             "connections opened through the Python bridge: " + ", ".join(
                 f"{k}: {v['vm_connections']}" for k, v in results.items() if isinstance(v, dict)
                 and "vm_connections" in v),
             "errors: " + ", ".join(f"{k}: non-2xx {v['non_2xx']}, socket {v['socket_errors']}"
                                    for k, v in results.items() if isinstance(v, dict) and "non_2xx" in v)]
    write("proxy", rows, notes)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per case (after a 1 s warm-up)")
    ap.add_argument("--connections", type=int, default=16)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not installed (apt-get install -y wrk)")
    report(asyncio.run(main(args.duration, args.connections)), args.duration, args.connections)
