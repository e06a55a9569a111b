"""The arena with real VMs: a two-player speed-build match (a VM each, outside quotas, scored by the scenario's
scorer in the target VM, ELO 1200/K=32), a player who leaves, a crashing scorer (no contest, ratings unchanged),
and joins racing for the last seat."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ussycode.services.arena_rules import elo

ANSWER_APP = r'''
import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"answer": 42}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
'''


def test_elo_pairwise() -> None:
    assert elo({"a": 1200, "b": 1200}, {"a": 10, "b": 0}) == {"a": 1216, "b": 1184}
    assert elo({"a": 1200, "b": 1200}, {"a": 5, "b": 5}) == {"a": 1200, "b": 1200}
    three = elo({"a": 1200, "b": 1200, "c": 1200}, {"a": 3, "b": 2, "c": 1})
    assert three == {"a": 1232, "b": 1200, "c": 1168} and sum(three.values()) == 3600


async def arena(s, key, *args: str) -> dict:  # type: ignore[no-untyped-def]
    r = await s.ssh(key, "arena", *args, "--json", timeout=300)
    assert r.exit_status == 0, (args, r)
    return json.loads(r.stdout)


async def wait_state(s, key, match: str, states: tuple[str, ...], timeout: float = 120) -> dict:  # type: ignore
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        view = await arena(s, key, "spectate", match)
        if view["state"] in states:
            return view
        assert asyncio.get_running_loop().time() < deadline, view
        await asyncio.sleep(0.5)


@pytest.mark.asyncio
async def test_a_real_match(web_factory, needs_vms: None) -> None:
    web = await web_factory(community_links={"chat": "https://chat.example.org/ussy"})
    s = web.server
    alice, bob = await s.register("alice"), await s.register("bob")
    scenarios = {x["name"] for x in await arena(s, alice, "scenarios")}
    assert {"speed-build", "web-exploit"} <= scenarios
    m = await arena(s, alice, "create", "--scenario=speed-build")
    match = m["id"]
    assert m["state"] == "open" and [p["handle"] for p in m["players"]] == ["alice"]
    joined = await arena(s, bob, "join", match)  # the last seat: the match starts, a VM each plus the target
    assert joined["state"] == "running"
    listing = {v["name"] for v in json.loads((await s.ssh(alice, "ls", "--json")).stdout)}
    assert {f"{match}-alice", f"{match}-target"} <= listing
    # arena VMs do not count against the quota
    assert json.loads((await s.ssh(alice, "whoami", "--json")).stdout)["vm_count"] == 0
    # alice builds the endpoint in her VM; bob does nothing
    r = await s.ssh(alice, "cat > /tmp/a.py && (setsid nohup python3 /tmp/a.py > /dev/null 2>&1 &) && sleep 1",
                    user=f"{match}-alice", stdin=ANSWER_APP.encode())
    assert r.exit_status == 0, r
    await arena(s, alice, "submit", match)
    await arena(s, bob, "submit", match)
    done = await wait_state(s, alice, match, ("done", "no_contest"))
    assert done["state"] == "done", done
    scores = {p["handle"]: p["score"] for p in done["players"]}
    assert scores["bob"] == 0 and 900 < scores["alice"] <= 1000
    board = await arena(s, alice, "leaderboard")
    assert [(r["handle"], r["rating"], r["rank"]) for r in board] == [("alice", 1216.0, 1), ("bob", 1184.0, 2)]
    community = json.loads((await s.ssh(alice, "community", "--json")).stdout)
    assert community["you"] == {"handle": "alice", "rating": 1216.0, "rank": 1, "matches": 1}
    assert community["users"] == 2 and community["arena_matches"] == 1
    assert community["links"] == {"chat": "https://chat.example.org/ussy"}
    bob_view = json.loads((await s.ssh(bob, "community", "--json")).stdout)["you"]
    assert bob_view["rank"] == 2 and bob_view["rating"] == 1184.0
    # the match's VMs are gone; it is in both players' history
    async def gone() -> bool:
        names = {v["name"] for v in json.loads((await s.ssh(alice, "ls", "--json")).stdout)}
        return not any(n.startswith(match) for n in names)
    for _ in range(60):
        if await gone():
            break
        await asyncio.sleep(0.5)
    assert await gone()
    assert [h["id"] for h in await arena(s, bob, "history")] == [match]

    # a crashing scorer (an operator's scenario): no contest, ratings unchanged
    broken = Path(s.data_dir) / "arena" / "crashy"
    broken.mkdir(parents=True)
    (broken / "scenario.toml").write_text('description = "scorer crashes"\nplayers = [2, 2]\nduration = "5m"\n'
                                          'probes = ["/"]\nscorer = "import sys; sys.exit(3)"\n')
    m2 = (await arena(s, alice, "create", "--scenario=crashy"))["id"]
    await arena(s, bob, "join", m2)
    await arena(s, alice, "submit", m2)
    # bob leaves the running match: he forfeits, and that ends it (everyone is in)
    r = await s.ssh(bob, "arena", "leave", m2)
    assert r.exit_status == 0, r
    ended = await wait_state(s, alice, m2, ("done", "no_contest"))
    assert ended["state"] == "no_contest" and "scorer failed" in ended["note"]
    board = await arena(s, alice, "leaderboard")
    assert [(r["handle"], r["rating"]) for r in board] == [("alice", 1216.0), ("bob", 1184.0)]

    # joins racing for the last seat: exactly one gets it
    carol, dave, erin = (await s.register("carol"), await s.register("dave"), await s.register("erin"))
    m3 = (await arena(s, carol, "create", "--scenario=speed-build"))["id"]
    results = await asyncio.gather(*(s.ssh(k, "arena", "join", m3, timeout=300) for k in (dave, erin, alice)))
    assert sorted(r.exit_status for r in results) == [0, 1, 1], results
    assert all("full" in r.stderr or "not open" in r.stderr for r in results if r.exit_status)
    view = await arena(s, carol, "spectate", m3)
    assert len(view["players"]) == 2 and view["state"] == "running"
    # bad input
    for args, code in ((("create", "--scenario=../x"), 2), (("create", "--scenario=nosuch"), 1),
                       (("create", "--scenario=speed-build", "--players=99"), 2), (("join", "nosuch"), 1),
                       (("submit", m3), 1)):
        r = await s.ssh(bob, "arena", *args)  # bob is not in that match
        assert r.exit_status == code and r.stderr.startswith("error:"), (args, r)


@pytest.mark.asyncio
async def test_web_exploit_scores_the_fix(web, needs_vms: None) -> None:
    """The shipped web-exploit scenario: each player's VM runs the vulnerable app; the one who fixes the injection
    (and keeps the app serving) wins, the one who does not scores only for serving."""
    s = web.server
    fixer, idler = await s.register("fixer"), await s.register("idler")
    match = (await arena(s, fixer, "create", "--scenario=web-exploit"))["id"]
    await arena(s, idler, "join", match)
    # the app answers and is injectable as shipped
    probe = ("python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/ping?host="
             "127.0.0.1%3Becho%20INJECTED').read().decode())\"")
    for _ in range(20):
        r = await s.ssh(fixer, probe, user=f"{match}-fixer")
        if r.exit_status == 0:
            break
        await asyncio.sleep(0.5)
    assert "INJECTED" in r.stdout.replace("echo INJECTED", ""), r
    # the fix: no shell
    fix = ("sed -i 's/subprocess.run(\"echo pinging \" + host, shell=True/subprocess.run([\"echo\", \"pinging\", "
           "host]/' ~/app/app.py && pkill -f '^python3 app.py$'; while pgrep -f '^python3 app.py$' > /dev/null; "
           "do sleep 0.1; done; cd ~/app && (setsid nohup python3 app.py > app.log 2>&1 < /dev/null &) && "
           "for i in $(seq 50); do python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 8080))' "
           "2>/dev/null && exit 0; sleep 0.1; done; exit 1")
    assert (await s.ssh(fixer, fix, user=f"{match}-fixer")).exit_status == 0
    await arena(s, fixer, "submit", match)
    await arena(s, idler, "submit", match)
    done = await wait_state(s, fixer, match, ("done", "no_contest"))
    assert done["state"] == "done", done
    assert {p["handle"]: p["score"] for p in done["players"]} == {"fixer": 1000.0, "idler": 100.0}
