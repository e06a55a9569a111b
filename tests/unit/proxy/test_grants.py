"""Grants (proxy.grants): the cookie's spelling, the files Caddy checks, their removal; the grants route (pure)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ussycode.proxy.front import (
    ANONYMOUS_ROUTE_ID,
    CREDENTIALS_ROUTE_ID,
    GRANT_HOST_RE,
    GRANTS_ROUTE_ID,
    FrontSettings,
    build_front_config,
    build_vms_route,
    grant_identity,
)
from ussycode.proxy.grants import GRANT_HEADER, Grants, cookie_name, cookie_re
from ussycode.proxy.hygiene import strip_platform_credentials
from ussycode.proxy.manager import caddy_binary
from ussycode.proxy.matchers import HOST_MAX, host_match
from ussycode.proxy.routes import ServerSettings, TlsMode

FRONT = FrontSettings("http://127.0.0.1:8080/__ussycode/forward-auth?k=key",
                      "unix/sockets/{http.request.host}", "/run/u/front/grants", "../bridges")
WHO = {"session": "s" * 43, "host": "web.localhost", "access": "owner", "user_id": "0123456789abcdef",
       "handle": "alice", "email": "alice+dev@example.org", "vm_id": "fedcba9876543210", "port": 8080}


def settings(tls: TlsMode = TlsMode.OFF) -> ServerSettings:
    return ServerSettings(domain="localhost", https_addr="127.0.0.1:8443", http_addr="127.0.0.1:8080", tls=tls)


class Clock:
    def __init__(self) -> None:
        self.generation = 0

    def __call__(self) -> int:
        return self.generation


def make(tmp_path: Path) -> tuple[Grants, Clock]:
    clock = Clock()
    grants = Grants(tmp_path / "front" / "grants", b"k" * 32, clock)
    grants.reset()
    return grants, clock


def test_the_cookie_spells_the_allow_and_nothing_else(tmp_path: Path) -> None:
    grants, _ = make(tmp_path)
    value = grants.value(**WHO)  # type: ignore[arg-type]
    assert value is not None and value.startswith("owner~0123456789abcdef~alice~fedcba9876543210~8080~~alice+dev@")
    assert value == grants.value(**WHO)  # type: ignore[arg-type]  # the same allow, the same name
    for change in ({"session": "t" * 43}, {"host": "other.localhost"}, {"access": "shared"}, {"port": 3000},
                   {"addr": "240.0.0.9"}):
        assert grants.value(**{**WHO, **change}) != value  # type: ignore[arg-type]
    other_key = Grants(tmp_path / "g2", b"x" * 32, Clock()).value(**WHO)  # type: ignore[arg-type]
    assert other_key is not None and other_key != value
    # what cannot be spelled safely gets no grant (that visitor keeps going through forward-auth)
    for bad in ({"email": "a/b@x.org"}, {"email": "a~b@x.org"}, {"email": "a b@x.org"}, {"email": "é@x.org"},
                {"email": "a" * 200 + "@x.org"}, {"handle": "../x"}, {"vm_id": "vm/1"}, {"user_id": "*"},
                {"access": "bearer"}, {"port": 0}, {"port": 70000}, {"addr": "127.0.0.1"}, {"addr": "240.0.0.1/x"},
                {"addr": "240.0.0.1:80"}):
        assert grants.value(**{**WHO, **bad}) is None, bad  # type: ignore[arg-type]
    assert grants.value(**{**WHO, "email": None}) is not None  # type: ignore[arg-type]
    # Caddy's regexp (also Python's) finds exactly our cookie among the others, by its exact name
    header = f"a=1; {cookie_name(True)}={value}; b=2"
    found = re.search(cookie_re(True), header)
    assert found and found["value"] == value and found["handle"] == "alice" and found["vm"] == "fedcba9876543210"
    assert found["email"] == "alice+dev@example.org" and found["port"] == "8080" and found["addr"] == ""
    routed = grants.value(**{**WHO, "addr": "240.0.0.9"})  # type: ignore[arg-type]
    found = re.search(cookie_re(True), f"{cookie_name(True)}={routed}")
    assert found and found["addr"] == "240.0.0.9" and found["email"] == "alice+dev@example.org"
    assert not re.search(cookie_re(True), f"ussy_grant={value}")  # not the __Host- cookie
    assert re.search(cookie_re(False), f"ussy_grant={value}")
    for hostile in (value.replace("~alice~", "~../x~"), value + "/x", value.replace("owner", "o*"), value[:-1]):
        assert not re.search(cookie_re(True), f"{cookie_name(True)}={hostile}"), hostile
    # the route captures only the parts it reads (Caddy pays for every group), and matches exactly the same values
    for parts in (("access", "user", "handle", "email", "addr"), ("access", "user", "handle", "email", "vm", "port")):
        pattern = cookie_re(True, parts)
        assert re.compile(pattern).groupindex.keys() == {"value", *parts}
        for cookie in (header, f"{cookie_name(True)}={routed}"):
            full, few = re.search(cookie_re(True), cookie), re.search(pattern, cookie)
            assert full and few and few.groupdict() == {k: full[k] for k in ("value", *parts)}
        for hostile in (value.replace("~alice~", "~../x~"), value + "/x", value.replace("owner", "o*"), value[:-1]):
            assert not re.search(pattern, f"{cookie_name(True)}={hostile}"), hostile


async def test_a_grant_is_made_only_on_what_the_database_still_says(tmp_path: Path) -> None:
    grants, clock = make(tmp_path)
    value = grants.value(**WHO)  # type: ignore[arg-type]
    assert value is not None
    soon = time.monotonic() + 60
    clock.generation = 5
    assert not grants.admit("web.localhost", value, 4, soon)  # a write since the allow was decided
    assert not grants.admit("web.localhost", value, 5, time.monotonic() - 1)  # already over
    for host in ("..", "a/b", "Web.localhost", ""):
        assert not grants.admit(host, value, 5, soon)
    assert not grants.admit("web.localhost", value + "/x", 5, soon)
    assert grants.count == 0 and list(grants.root.iterdir()) == []
    assert grants.admit("web.localhost", value, 5, soon)
    assert (grants.root / "web.localhost" / value).is_file() and grants.count == 1
    assert os.stat(grants.root).st_mode & 0o777 == 0o711  # names can be looked up, never listed
    # any write: every grant goes at once, the directory stays (Caddy's root)
    grants.wipe()
    assert grants.root.is_dir() and list(grants.root.iterdir()) == [] and grants.count == 0
    await asyncio.sleep(0.1)
    assert [p.name for p in grants.root.parent.iterdir()] == ["grants"]  # the old files went in the background
    grants.close()
    assert not grants.root.exists()


async def test_a_grant_ends_at_its_deadline(tmp_path: Path) -> None:
    grants, _ = make(tmp_path)
    short, long = (grants.value(**{**WHO, "session": s}) for s in ("a" * 43, "b" * 43))  # type: ignore[arg-type]
    assert short and long
    assert grants.admit("web.localhost", short, 0, time.monotonic() + 0.05)
    assert grants.admit("web.localhost", long, 0, time.monotonic() + 5)
    await asyncio.sleep(0.2)
    assert sorted(p.name for p in (grants.root / "web.localhost").iterdir()) == [long] and grants.count == 1
    assert grants.admit("web.localhost", short, 0, time.monotonic() + 0.05)  # made again, ends again
    assert grants.admit("web.localhost", short, 0, time.monotonic() + 5)  # ... unless renewed meanwhile
    await asyncio.sleep(0.2)
    assert (grants.root / "web.localhost" / short).exists()
    grants.close()


def test_a_previous_servers_grants_are_gone_at_start(tmp_path: Path) -> None:
    root = tmp_path / "front" / "grants"
    (root / "web.localhost").mkdir(parents=True)
    (root / "web.localhost" / "old").touch()
    (tmp_path / "front" / "grants.old-3").mkdir()
    grants, _ = make(tmp_path)
    assert list(grants.root.iterdir()) == [] and not (tmp_path / "front" / "grants.old-3").exists()


def test_the_grants_route_checks_the_file_and_dials_the_bridge_named() -> None:
    server = build_front_config(settings(TlsMode.INTERNAL), FRONT)["apps"]["http"]["servers"]["ussycode"]
    routes = server["routes"]
    assert [r.get("@id") for r in routes][1:4] == [GRANTS_ROUTE_ID, ANONYMOUS_ROUTE_ID, CREDENTIALS_ROUTE_ID]
    route = routes[1]
    match = route["match"][0]
    # the cookie's pattern captures exactly the parts the route reads: the identity, and the bridge's VM and port
    who = {"access", "user", "handle", "email"}
    assert match["header_regexp"]["Cookie"] == {"name": "ussy_grant", "pattern": cookie_re(True, who | {"vm", "port"})}
    routed = build_front_config(settings(TlsMode.INTERNAL), dataclasses.replace(FRONT, routed=True))
    routed_match = routed["apps"]["http"]["servers"]["ussycode"]["routes"][1]["match"][0]
    assert routed_match["header_regexp"]["Cookie"]["pattern"] == cookie_re(True, who | {"addr"})
    assert {k: match[k] for k in ("vars_regexp", "not")} == host_match(GRANT_HOST_RE, HOST_MAX)
    assert not any(re.fullmatch(GRANT_HOST_RE, h) for h in ("..", "../x", "a/b", "*", "a*", "[a]", "Web.localhost"))
    fast, fallback = route["handle"][0]["routes"]
    # the file matcher runs inside the subroute, after the cookie's parts were captured
    # (one entry, first_exist_fallback: Caddy opens the file once, by globbing it; a missing file yields nothing)
    assert fast["match"] == [{"file": {"root": "/run/u/front/grants",
                                       "try_files": ["/{http.request.host}/{http.regexp.ussy_grant.value}"],
                                       "try_policy": "first_exist_fallback"}}]
    chain = fast["handle"]
    assert chain[2] == grant_identity() and chain[-2] == strip_platform_credentials()
    assert chain[-1]["upstreams"] == [
        {"dial": "unix/../bridges/{http.regexp.ussy_grant.vm}-{http.regexp.ussy_grant.port}.sock"}]
    assert fallback == {"handle": build_vms_route(settings(TlsMode.INTERNAL), FRONT)["handle"]}
    # the identity the cookie spells, and the e-mail only when there is one
    identity = json.dumps(grant_identity())
    assert "{http.regexp.ussy_grant.handle}" in identity and "{http.regexp.ussy_grant.access}" in identity
    # a bridge the grant named that is gone (or dead): nothing was sent, forward-auth starts it again
    patterns = [m["vars_regexp"]["{http.error.message}"]["pattern"] for m in server["errors"]["routes"][0]["match"]]
    gone = "dial unix ../bridges/fedcba9876543210-8080.sock: connect: "
    assert any(re.fullmatch(p, gone + "no such file or directory") for p in patterns)
    assert any(re.fullmatch(p, gone + "connection refused") for p in patterns)
    for other in (gone + "connection reset by peer", "dial unix ../bridges/x/../y-1.sock: connect: connection refused",
                  "dial unix /run/u/bridges/fedcba9876543210-8080.sock: connect: no such file or directory"):
        assert not any(re.fullmatch(p, other) for p in patterns), other
    # forward-auth's grant cookie goes to the browser, not to the VM
    auth = build_vms_route(settings(), FRONT)["handle"][2]
    added = auth["handle_response"][0]["routes"][1]
    assert added["handle"] == [{"handler": "headers", "response": {"add": {
        "Set-Cookie": ["{http.reverse_proxy.header." + GRANT_HEADER + "}"]}}}]
    # our grant cookie never reaches an app
    assert "grant" in json.dumps(strip_platform_credentials())


def test_no_grants_route_where_it_cannot_work() -> None:
    for front in (FrontSettings(FRONT.auth_url, FRONT.public_dial),
                  FrontSettings(FRONT.auth_url, FRONT.public_dial, "/g", "/" + "b" * 90)):
        server = build_front_config(settings(), front)["apps"]["http"]["servers"]["ussycode"]
        assert GRANTS_ROUTE_ID not in [r.get("@id") for r in server["routes"]]
        assert len(server["errors"]["routes"][0]["match"]) == 1
    for bad in (("g", "../bridges"), ("/g", ""), ("", "../bridges")):
        with pytest.raises(ValueError):
            FrontSettings(FRONT.auth_url, FRONT.public_dial, *bad)


@pytest.mark.skipif(not shutil.which(caddy_binary()), reason="caddy not installed")
def test_the_grants_route_validates_with_the_real_caddy(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(build_front_config(settings(TlsMode.INTERNAL), FRONT)))
    proc = subprocess.run([caddy_binary(), "validate", "--config", str(path)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
