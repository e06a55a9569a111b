"""LLM gateway overhead, measured from inside a real VM (container runtime, same run).

The same stand-in provider (a small stdlib HTTP server speaking OpenAI chat completions, JSON and SSE) runs twice:
on the host, behind the gateway (``http://169.254.169.254/gateway/llm/openai/…``), and inside the VM on its own
loopback (the baseline: "the upstream called directly from the same VM"). The same client, in the VM, times both.

- non-streaming request: p50/p99 added by the gateway (goal: <= 2 ms added at p50);
- streaming time to first byte: gateway vs direct (goal: <= 1.1x), with a stand-in that answers at once, and
  (reported, no goal) with one whose first token takes 50 ms, as a fast real model's does;
- 200 streams held open through the gateway: the server's RSS against idle, and the p99 of a small request
  meanwhile against the same p99 without them.

Writes bench/results/llm.json. Usage: .venv/bin/python -m bench.bench_llm [--requests N]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import percentile, row, write
from bench.server import BenchServer, free_port, rss_kb

# A stand-in provider with the standard library only (the VM's image has no web framework).
UPSTREAM = r'''
import asyncio, json, sys
ANSWER = json.dumps({"choices": [{"message": {"content": "ok"}}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 2}}).encode()
async def handle(r, w):
    try:
        head = await r.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = json.loads(await r.readexactly(length)) if length else {}
        if body.get("stream"):
            events, gap = int(body.get("events", 2)), float(body.get("gap", 0))
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            await w.drain()
            await asyncio.sleep(float(body.get("first", 0)))  # a model's time to its first token
            for i in range(events):
                w.write(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
                await w.drain()
                if gap:
                    await asyncio.sleep(gap)
            w.write(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\ndata: [DONE]\n\n')
        else:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: "
                    + str(len(ANSWER)).encode() + b"\r\n\r\n" + ANSWER)
        await w.drain()
    except Exception:
        pass
    w.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    await server.serve_forever()
asyncio.run(main())
'''

# The client, run inside the VM: times requests to a base URL (host:port and path prefix), prints JSON.
CLIENT = r'''
import asyncio, json, sys, time
host, port, prefix, mode, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
FIRST = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
def request(stream, events=2, gap=0.0):
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream,
                       "events": events, "gap": gap, "first": FIRST}).encode()
    return (f"POST {prefix}/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
async def one(stream=False, events=2, gap=0.0, hold=None):
    t0 = time.perf_counter()
    r, w = await asyncio.open_connection(host, port)
    w.write(request(stream, events, gap)); await w.drain()
    head = await r.readuntil(b"\r\n\r\n")
    first = await r.read(1)  # the first byte of the body: the first event
    ttfb = time.perf_counter() - t0
    if hold is not None and not hold.done():
        if b" 200 " in head.split(b"\r\n")[0]:
            hold.set_result(None)
        else:
            hold.set_exception(RuntimeError(head[:100]))
    rest = await r.read()
    total = time.perf_counter() - t0
    w.close()
    assert b" 200 " in head.split(b"\r\n")[0], head[:200]
    return ttfb * 1000, total * 1000
async def main():
    if mode in ("json", "stream"):
        out = [await one(mode == "stream") for _ in range(n)]
        print(json.dumps({"ttfb": [a for a, _ in out], "total": [b for _, b in out]}))
    elif mode == "held":
        started = [asyncio.get_running_loop().create_future() for _ in range(n)]
        streams = [asyncio.ensure_future(one(True, events=30, gap=0.5, hold=f)) for f in started]
        await asyncio.wait_for(asyncio.gather(*started), 60)
        print(json.dumps({"open": n}), flush=True)
        sys.stdin.readline()  # the bench measures now; it writes a line when done
        small = [await one(False) for _ in range(50)]
        print(json.dumps({"small": [b for _, b in small]}), flush=True)
        for s in streams:
            s.cancel()
asyncio.run(main())
'''

GATEWAY = ("169.254.169.254", 80, "/gateway/llm/openai/v1")
HOLDERS, PER_HOLDER = 8, 25
DIRECT_PORT = 18080
FIRST_TOKEN_S = 0.05


def vm_run(server: BenchServer, key: Path, vm: str, script: str, *args: str) -> dict[str, Any]:
    r = server.ssh(key, f"python3 -c {shlex.quote(script)} " + " ".join(args), user=vm)
    if r.returncode != 0:
        raise RuntimeError(f"in {vm}: {r.stderr[-1000:]}")
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def main(n: int) -> dict[str, Any]:
    upstream_port = free_port()
    host_upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(upstream_port)])
    llm = {"providers": {"openai": {"base_url": f"http://127.0.0.1:{upstream_port}"}}, "budgets": {"admin": -1},
           "requests_per_minute": 100_000}
    server = BenchServer(USSYCODE_LLM=json.dumps(llm)).start()
    results: dict[str, Any] = {}
    try:
        key = server.key("bench")
        assert server.ssh(key, "register", "bench").returncode == 0
        r = subprocess.run(server.ssh_argv(key, "llm-key", "set", "openai"), input="sk-bench-0000\n", text=True,
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        made = server.ssh(key, "new", "--name=llmb")
        assert made.returncode == 0, made.stderr
        r = server.ssh(key, f"(setsid nohup python3 -c {shlex.quote(UPSTREAM)} {DIRECT_PORT} >/tmp/up.log 2>&1 &) "
                            "; sleep 1", user="llmb")
        assert r.returncode == 0, r.stderr
        direct = ("127.0.0.1", str(DIRECT_PORT), "/v1")
        gw = (GATEWAY[0], str(GATEWAY[1]), GATEWAY[2])
        vm_run(server, key, "llmb", CLIENT, *gw, "json", "20")  # warm-up
        vm_run(server, key, "llmb", CLIENT, *direct, "json", "20")
        for _ in range(3):  # interleaved rounds, pooled samples
            for name, target in (("direct", direct), ("gateway", gw)):
                for mode in ("json", "stream"):
                    got = vm_run(server, key, "llmb", CLIENT, *target, mode, str(n))
                    bucket = results.setdefault(f"{name}_{mode}", {"ttfb": [], "total": []})
                    bucket["ttfb"] += got["ttfb"]
                    bucket["total"] += got["total"]
                # the same stream when the model takes FIRST_TOKEN_S to its first token (a fast real provider)
                got = vm_run(server, key, "llmb", CLIENT, *target, "stream", str(max(10, n // 10)),
                             str(FIRST_TOKEN_S))
                results.setdefault(f"{name}_stream_slow", {"ttfb": [], "total": []})["ttfb"] += got["ttfb"]
        assert server.proc is not None
        results["rss_idle_kb"] = rss_kb(server.proc.pid)
        results["small_idle"] = vm_run(server, key, "llmb", CLIENT, *gw, "json", "50")["total"]
        # 200 streams: 25 from each of 8 VMs (a VM may hold 32 metadata requests at once)
        vms = ["llmb"] + [f"llm{i}" for i in range(1, HOLDERS)]
        for vm in vms[1:]:
            made = server.ssh(key, "new", f"--name={vm}")
            assert made.returncode == 0, made.stderr
        held = [subprocess.Popen(server.ssh_argv(key, f"python3 -c {shlex.quote(CLIENT)} " + " ".join(
            (*gw, "held", str(PER_HOLDER))), user=vm), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for vm in vms]
        opened = 0
        for h in held:
            assert h.stdout is not None
            opened += json.loads(h.stdout.readline())["open"]
        time.sleep(1)
        results["rss_200_streams_kb"] = rss_kb(server.proc.pid)
        results["streams_open"] = opened
        first = held[0]
        assert first.stdin is not None and first.stdout is not None
        first.stdin.write("\n")
        first.stdin.flush()
        results["small_during_streams"] = json.loads(first.stdout.readline())["small"]
        for h in held:
            if h.stdin is not None and h is not first:
                h.stdin.write("\n")
                h.stdin.flush()
        for h in held:
            h.wait(120)
    finally:
        server.cleanup()
        host_upstream.terminate()
    return results


def report(res: dict[str, Any], n: int) -> None:
    dj, gj = res["direct_json"]["total"], res["gateway_json"]["total"]
    ds, gs = res["direct_stream"]["ttfb"], res["gateway_stream"]["ttfb"]
    slow_d, slow_g = res["direct_stream_slow"]["ttfb"], res["gateway_stream_slow"]["ttfb"]
    added = percentile(gj, 50) - percentile(dj, 50)
    rows = [
        row("json_p50_ms", percentile(gj, 50), "ms", "direct_json_p50_ms", percentile(dj, 50),
            "<= 2 ms added", added <= 2.0),
        row("json_p99_ms", percentile(gj, 99), "ms", "direct_json_p99_ms", percentile(dj, 99)),
        row("stream_ttfb_p50_ms", percentile(gs, 50), "ms", "direct_ttfb_p50_ms", percentile(ds, 50),
            "<= 1.1x direct", percentile(gs, 50) <= 1.1 * percentile(ds, 50)),
        row("stream_ttfb_p99_ms", percentile(gs, 99), "ms", "direct_ttfb_p99_ms", percentile(ds, 99)),
        row("stream_ttfb_first_token_50ms_p50_ms", percentile(slow_g, 50), "ms", "direct_p50_ms",
            percentile(slow_d, 50)),
        row("rss_with_200_streams_kb", res["rss_200_streams_kb"], "kB", "rss_idle_kb", res["rss_idle_kb"]),
        row("small_p99_during_200_streams_ms", percentile(res["small_during_streams"], 99), "ms",
            "small_p99_idle_ms", percentile(res["small_idle"], 99)),
    ]
    notes = [f"{3 * n} requests per case (3 interleaved rounds), one at a time, client and direct upstream in the VM, "
             f"gateway upstream on the host; added at p50: {added:.2f} ms",
             f"{res['streams_open']} streams held open (an event every 0.5 s); RSS +"
             f"{(res['rss_200_streams_kb'] - res['rss_idle_kb']) / 1024:.1f} MiB"]
    write("llm", rows, notes)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--requests", type=int, default=100)
    args = ap.parse_args()
    report(main(args.requests), args.requests)
