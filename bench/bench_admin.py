"""Admin panel and ``/metrics`` benchmark on a large instance.

1. Every admin panel page (dashboard, users and their pages 1 and 100, a search, a user's page, VMs, a filtered VM
   list, tokens, shares, the audit log and an older audit page, an action-filtered audit page), requested one at a
   time with a signed-in admin session, on a database generated with 10,000 users, 50,000 VMs and 1,000,000 audit
   rows. Goal: p99 < 200 ms per page. Baseline: ``/health`` of the same server, timed the same way.
2. The cost of Prometheus scraping: ``/exec whoami`` req/s (wrk) while ``/metrics`` is scraped every second, against
   the same without scraping (goal: < 2% lower).

Loopback only, the app server's port (the panel's own cost, without Caddy). Writes bench/results/admin.json.
Usage: .venv/bin/python -m bench.bench_admin [--users N] [--vms N] [--audit N] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.admin_data import populate
from bench.bench_exec import run_wrk
from bench.common import percentile, row, write
from ussycode.app import App
from ussycode.auth.identity import Actor
from ussycode.config import load_settings
from ussycode.runtime.fake import FakeRuntime
from ussycode.store.db import Store

EXEC_ROUNDS = 5
PAGES = ["/admin/", "/admin/users", "/admin/users?page=100", "/admin/users?q=user0042", "/admin/users/user00077",
         "/admin/vms", "/admin/vms?status=error&page=20", "/admin/tokens", "/admin/shares", "/admin/audit",
         "/admin/audit?action=vm.stop", "/admin/audit?actor=user00077", "/admin/audit?before=500000"]


async def timed(client: httpx.AsyncClient, url: str, headers: dict[str, str], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        r = await client.get(url, headers=headers)
        out.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200, (url, r.status_code, r.text[:300])
    return out


async def main(n_users: int, n_vms: int, n_audit: int, rounds: int) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="ub-admin-", dir="/var/tmp"))
    results: dict[str, Any] = {}
    try:
        data = tmp / "d"
        data.mkdir()
        store = Store(f"sqlite:///{data / 'ussycode.db'}")
        store.migrate()
        t0 = time.perf_counter()
        host = populate(store, n_users=n_users, n_vms=n_vms, n_audit=n_audit)
        results["generate_s"] = time.perf_counter() - t0
        store.close()
        settings = load_settings(data_dir=str(data), ssh_addr="127.0.0.1:0", smtp_addr="127.0.0.1:0",
                                 admin_addr="127.0.0.1:0", http_addr="127.0.0.1:0", https_addr="127.0.0.1:0",
                                 tls="off", rate_per_minute=10**9, rate_burst=10**9, log_level="WARNING")
        app = App(settings, runtime=FakeRuntime(host))
        await app.start()
        try:
            s = app.services
            assert s is not None and s.sessions is not None and s.tokens is not None
            boss = await s.users.by_handle("boss")
            assert boss is not None
            actor = Actor(boss, "ssh")
            redeemed = await s.sessions.redeem_login_token(await s.sessions.create_login_token(actor), "localhost")
            assert redeemed is not None
            headers = {"Host": "localhost", "Cookie": f"ussy_session={redeemed[0]}"}
            base = f"http://127.0.0.1:{app.http_port}"
            async with httpx.AsyncClient(timeout=60) as c:
                for page in PAGES:  # warm-up (and every page answers 200)
                    await timed(c, base + page, headers, 1)
                results["health"] = await timed(c, base + "/health", {}, rounds)
                results["pages"] = {page: await timed(c, base + page, headers, rounds) for page in PAGES}
            # /metrics scraping cost on /exec throughput
            token = (await s.tokens.create(actor)).token
            wrk_dir = tmp / "wrk"
            wrk_dir.mkdir()
            exec_args = (f"{base}/exec", "POST", "whoami", {"Authorization": f"Bearer {token}",
                                                             "Content-Type": "text/plain"}, 5.0, 8, wrk_dir)
            await run_wrk(*exec_args)  # warm-up
            metrics_url = f"http://127.0.0.1:{app.ops_port}/metrics"
            scrapes: list[float] = []

            async def scrape(stop: asyncio.Event) -> None:
                async with httpx.AsyncClient(timeout=30) as c:
                    while not stop.is_set():
                        t = time.perf_counter()
                        r = await c.get(metrics_url)
                        assert r.status_code == 200
                        scrapes.append((time.perf_counter() - t) * 1000)
                        try:
                            await asyncio.wait_for(stop.wait(), 1.0)
                        except TimeoutError:
                            pass

            quiet, scraped = [], []
            for _ in range(EXEC_ROUNDS):  # interleaved rounds, medians reported
                quiet.append(await run_wrk(*exec_args))
                stop = asyncio.Event()
                scraper = asyncio.ensure_future(scrape(stop))
                scraped.append(await run_wrk(*exec_args))
                stop.set()
                await scraper
            results["exec_quiet"] = sorted(quiet, key=lambda r: r["rps"])[EXEC_ROUNDS // 2]
            results["exec_scraped"] = sorted(scraped, key=lambda r: r["rps"])[EXEC_ROUNDS // 2]
            results["exec_rounds"] = {"quiet": [r["rps"] for r in quiet], "scraped": [r["rps"] for r in scraped]}
            results["scrape_ms"] = scrapes
            async with httpx.AsyncClient(timeout=30) as c:
                results["metrics_bytes"] = len((await c.get(metrics_url)).content)
        finally:
            await app.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def report(res: dict[str, Any], n_users: int, n_vms: int, n_audit: int, rounds: int) -> None:
    health_p99 = percentile(res["health"], 99)
    rows = [row("health_p99_ms", health_p99, "ms", "health_p99_ms", health_p99)]
    worst = 0.0
    for page, times in res["pages"].items():
        p50, p99 = percentile(times, 50), percentile(times, 99)
        worst = max(worst, p99)
        rows.append(row(f"{page[:30]} p50_ms", p50, "ms", "health_p99_ms", health_p99))
        rows.append(row(f"{page[:30]} p99_ms", p99, "ms", "health_p99_ms", health_p99, "< 200 ms", p99 < 200))
    q, sc = res["exec_quiet"], res["exec_scraped"]
    rows.append(row("exec_whoami_rps_while_scraped", sc["rps"], "req/s", "exec_whoami_rps_quiet", q["rps"],
                    ">= 98% of quiet", sc["rps"] >= 0.98 * q["rps"]))
    rows.append(row("metrics_scrape_p50_ms", percentile(res["scrape_ms"], 50), "ms", "health_p99_ms", health_p99))
    notes = [f"generated {n_users} users, {n_vms} VMs, {n_audit} audit rows in {res['generate_s']:.1f} s (SQLite)",
             f"{rounds} sequential requests per page with an admin session, app server port, after a warm-up; "
             f"worst page p99 {worst:.1f} ms",
             f"/exec whoami: wrk -t1 -c8 5 s, {EXEC_ROUNDS} interleaved rounds (median); quiet {q['rps']} req/s, "
             f"scraped every second {sc['rps']} req/s; /metrics is {res['metrics_bytes']} bytes; rounds: "
             f"quiet {res['exec_rounds']['quiet']}, scraped {res['exec_rounds']['scraped']}"]
    write("admin", rows, notes)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--vms", type=int, default=50_000)
    ap.add_argument("--audit", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not installed (apt-get install -y wrk)")
    report(asyncio.run(main(args.users, args.vms, args.audit, args.rounds)), args.users, args.vms, args.audit,
           args.rounds)
