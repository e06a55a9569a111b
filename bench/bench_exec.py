"""/exec benchmark: ``POST /exec whoami`` requests/s and p99 against ``GET /health`` on the same app server, in the
same run (loopback only; the two take turns over 3 rounds, each reporting its median). Goal: /exec reaches at
least 50% of /health's requests/s.

Starts a real App (temporary data dir, the rate limit raised so it never answers 429), registers a user and creates
a usy1 token through the services, then drives both endpoints with ``wrk`` (``apt-get install -y wrk``; a Lua
script makes the POST) or, without wrk, an httpx load loop. Writes bench/results/exec.json and prints a table.
Usage: .venv/bin/python bench/bench_exec.py [--duration S] [--connections N] [--tool wrk|httpx]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncssh
import httpx

from ussycode.app import App
from ussycode.auth.identity import Actor
from ussycode.auth.keys import parse_authorized_key
from ussycode.config import load_settings

RESULTS = Path(__file__).parent / "results" / "exec.json"
GOAL = 0.5
ROUNDS = 3

LUA = """
wrk.method = "{method}"
{body}
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRKJSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d,"
    .. "\\"non_2xx\\":%d,\\"socket_errors\\":%d}}\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lua_script(method: str, body: str | None, headers: dict[str, str]) -> str:
    return LUA.format(method=method, body=f"wrk.body = {json.dumps(body)}" if body is not None else "",
                      headers="\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()))


async def run_wrk(url: str, method: str, body: str | None, headers: dict[str, str], duration: float,
                  connections: int, workdir: Path) -> dict[str, Any]:
    script = workdir / f"{method.lower()}.lua"
    script.write_text(lua_script(method, body, headers))
    proc = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "-s", str(script), url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    line = next((ln for ln in out.decode().splitlines() if ln.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode()[-500:]} {out.decode()[-500:]}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    secs = raw["duration_us"] / 1e6
    return {"requests": raw["requests"], "seconds": round(secs, 3), "rps": round(raw["requests"] / secs, 1),
            "p50_ms": raw["p50_us"] / 1000, "p99_ms": raw["p99_us"] / 1000, "non_2xx": raw["non_2xx"],
            "socket_errors": raw["socket_errors"]}


async def run_httpx(url: str, method: str, body: str | None, headers: dict[str, str], duration: float,
                    connections: int) -> dict[str, Any]:
    latencies: list[float] = []
    bad = 0
    deadline = time.monotonic() + duration

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal bad
        while time.monotonic() < deadline:
            t = time.perf_counter()
            r = await client.request(method, url, content=body, headers=headers)
            latencies.append(time.perf_counter() - t)
            bad += r.status_code >= 300

    start = time.monotonic()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=connections)) as client:
        await asyncio.gather(*(worker(client) for _ in range(connections)))
    secs = time.monotonic() - start
    q = statistics.quantiles(latencies, n=100)
    return {"requests": len(latencies), "seconds": round(secs, 3), "rps": round(len(latencies) / secs, 1),
            "p50_ms": round(q[49] * 1000, 3), "p99_ms": round(q[98] * 1000, 3), "non_2xx": bad, "socket_errors": 0}


async def main(duration: float, connections: int, tool: str, command: str = "whoami") -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="ussy-bench-exec-") as tmp:
        settings = load_settings(data_dir=tmp, ssh_addr="127.0.0.1:0", http_addr="127.0.0.1:0", smtp_addr="127.0.0.1:0",
                                 admin_addr="127.0.0.1:0",
                                 https_addr=f"127.0.0.1:{free_port()}", tls="off", runtime="container",
                                 rate_per_minute=10**9, rate_burst=10**9)
        app = App(settings)
        await app.start()
        try:
            services = app.services
            assert services is not None and services.tokens is not None
            key = asyncssh.generate_private_key("ssh-ed25519")
            public_key = key.export_public_key().decode().strip()
            user = await services.users.register("bench", parse_authorized_key(public_key))
            token = (await services.tokens.create(Actor(user, "ssh"))).token
            base = f"http://127.0.0.1:{app.http_port}"
            async with httpx.AsyncClient() as c:  # sanity: both answer 200 before we measure
                assert (await c.get(f"{base}/health")).status_code == 200
                r = await c.post(f"{base}/exec", content="whoami",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "text/plain"})
                assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
            exec_headers = {"Authorization": f"Bearer {token}", "Content-Type": "text/plain"}
            cases = {"health": (f"{base}/health", "GET", None, {}),
                     "exec": (f"{base}/exec", "POST", command, exec_headers)}
            results: dict[str, Any] = {}
            for url, method, body, headers in cases.values():  # warm-up
                if tool == "wrk":
                    await run_wrk(url, method, body, headers, 1, connections, Path(tmp))
                else:
                    await run_httpx(url, method, body, headers, 1, connections)
            # The two take turns, ROUNDS times, and each reports its median round: the cores are shared with
            # whatever else runs, and interleaving keeps a load change from landing on one of them only.
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
            for _ in range(ROUNDS):
                for name, (url, method, body, headers) in cases.items():
                    if tool == "wrk":
                        cpu = time.process_time()
                        one = await run_wrk(url, method, body, headers, duration, connections, Path(tmp))
                        # the server's CPU (this process: event loop and DB threads) per request
                        one["server_cpu_ms"] = round((time.process_time() - cpu) * 1000 / max(1, one["requests"]), 3)
                    else:
                        one = await run_httpx(url, method, body, headers, duration, connections)
                    rounds[name].append(one)
            for name, runs in rounds.items():
                results[name] = {**sorted(runs, key=lambda r: r["rps"])[len(runs) // 2],
                                 "rounds_rps": [r["rps"] for r in runs]}
        finally:
            await app.stop()
    ratio = results["exec"]["rps"] / results["health"]["rps"]
    return {"tool": tool, "command": command, "connections": connections, "duration_s": duration,
            "cpus": os.cpu_count(), "python": platform.python_version(), **results,
            "ratio_rps": round(ratio, 3), "goal_ratio": GOAL, "meets_goal": ratio >= GOAL}


def print_table(res: dict[str, Any]) -> None:
    print(f"{'endpoint':<14}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'non-2xx':>10}{'cpu ms/req':>12}")
    for name in ("health", "exec"):
        r = res[name]
        cpu = f"{r['server_cpu_ms']:.3f}" if "server_cpu_ms" in r else "-"
        label = name if name == "health" else f"exec {res['command']}"[:13]
        print(f"{label:<14}{r['rps']:>10.1f}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['non_2xx']:>10}{cpu:>12}")
    verdict = "meets" if res["meets_goal"] else "MISSES"
    print(f"/exec is {res['ratio_rps']:.0%} of /health's req/s ({verdict} the goal of {GOAL:.0%}; {res['tool']}, "
          f"{res['connections']} connections, {res['duration_s']:g} s each, {ROUNDS} interleaved rounds (median), "
          f"{res['cpus']} CPUs; req/s per round: health {res['health']['rounds_rps']}, exec "
          f"{res['exec']['rounds_rps']})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per endpoint (after a 1 s warm-up)")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--command", default="whoami", help="the command line to POST (the goal is about whoami)")
    ap.add_argument("--tool", choices=("wrk", "httpx"), default="wrk" if shutil.which("wrk") else "httpx")
    args = ap.parse_args()
    result = asyncio.run(main(args.duration, args.connections, args.tool, args.command))
    if args.command == "whoami":
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
