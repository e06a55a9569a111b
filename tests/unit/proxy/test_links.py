"""Routed public hosts' pure parts (proxy.links) and the routed fast path's Caddy route (proxy.front)."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from ussycode.proxy import links
from ussycode.proxy.front import (
    ROUTED_HOST_RE,
    FrontSettings,
    build_anonymous_route,
    build_front_errors,
    build_public_route,
)
from ussycode.proxy.manager import caddy_binary
from ussycode.proxy.matchers import HOST_MAX, host_match, host_matches
from ussycode.proxy.routes import ServerSettings

FRONT = FrontSettings("http://127.0.0.1:8080/a?k=key", "unix/sockets/{http.request.host}", routed=True)
SETTINGS = ServerSettings(domain="localhost", http_addr="127.0.0.1:8080")


def test_link_names_fit_and_differ() -> None:
    names = {links.dev_name(f"ussy-{i:012x}") for i in range(1000)}
    assert len(names) == 1000 and all(len(n) <= 15 and n.startswith(links.DEV_PREFIX) for n in names)


def test_hosts_file_names_only_routed_hosts() -> None:
    text = links.hosts_text({"b.localhost": "240.0.0.2", "a.localhost": "240.0.0.1"})
    body = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert body == ["240.0.0.1 a.localhost", "240.0.0.2 b.localhost"]
    assert "\nlocalhost" not in text and " localhost\n" not in text and "127." not in text and "::1" not in text
    assert links.hosts_text({}).count("\n") == 1


def test_link_batches_and_argvs() -> None:
    host, vm = links.link_batches("ussy-abc")
    dev = links.dev_name("ussy-abc")
    assert host.splitlines()[0] == f"link add {dev} type veth peer name {links.VM_DEV} netns ussy-abc"
    assert "addr" not in host  # the host's ends are on its loopback
    assert f"route add {links.HOST_ADDR}/32 dev {links.VM_DEV}" in vm
    argv = links.caddy_argv(links.Path("/r/hosts"), links.Path("/r/run"), ["caddy", "run"])
    assert argv[:4] == ["unshare", "--mount", "--propagation", "slave"]
    assert argv[-4:] == ["/r/hosts", "/r/run", "caddy", "run"]
    assert links.remount_argv(42, links.Path("/r/hosts"))[:4] == ["nsenter", "-t", "42", "-m"]


def test_vm_rules_admit_only_caddys_address() -> None:
    rules = links.VM_RULESET
    assert f"ip saddr {links.HOST_ADDR} tcp dport {links.DIAL_PORT} dnat" in rules
    assert f'iifname "{links.VM_DEV}" ip saddr {links.HOST_ADDR} ct status dnat accept' in rules
    host = links.HOST_RULESET
    for rule in ("fib saddr . iif oif missing drop", "ct state established,related accept",
                 f'iifname "{links.DEV_PREFIX}*" drop', f'oifname "{links.DEV_PREFIX}*" drop'):
        assert rule in host


def test_addresses_are_never_given_twice(tmp_path: links.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(links, "COUNTER", tmp_path / "run" / "counter")
    first = links.FrontLinks(tmp_path / "a")
    seen = [first._allocate() for _ in range(5)]
    again = links.FrontLinks(tmp_path / "b")  # another server (or the next one) on the same host goes on counting
    seen += [again._allocate() for _ in range(5)]
    assert len(set(seen)) == 10 and links.SINK not in seen
    assert all(ipaddress.ip_address(a) in links.POOL for a in seen)
    links.COUNTER.write_text(str(links.POOL.num_addresses - 1))
    with pytest.raises(links.RuntimeFailure):
        again._allocate()
    links.COUNTER.write_text("garbage")
    with pytest.raises(links.RuntimeFailure):
        again._allocate()


@pytest.mark.parametrize("host, dialed", [
    ("web.localhost", True), ("3000-web.dev.example.com", True), ("a.b", True),
    ("127.0.0.1", False), ("10.0.0.1", False), ("240.0.0.5", False), ("web.localhost.", False),
    ("WEB.localhost", False), ("web.localhost:8080", False), ("[::1]", False), ("web/..", False), ("", False),
    ("-web.localhost", False), ("x" * 260 + ".com", False), ("x" * 249 + ".com", True), ("x" * 250 + ".com", False),
])
def test_routed_names_are_names(host: str, dialed: bool) -> None:
    assert host_matches(build_public_route(SETTINGS, FRONT)["match"][0], host) is dialed  # type: ignore[index]


def test_host_matchers_have_no_counted_repetition() -> None:
    """Go's regexp walks every step of a counted repetition in parallel: a shape has none, the bound is fixed."""
    matcher = host_match(ROUTED_HOST_RE, HOST_MAX)
    assert not re.search(r"\{\d*,\d*\}", matcher["vars_regexp"]["{http.request.host}"]["pattern"])
    assert matcher["not"] == [{"vars_regexp": {"{http.request.host}": {"pattern": "^.{254}"}}}]
    assert host_matches(matcher, "a" * 252 + "b") and not host_matches(matcher, "a" * 253 + "b")


def test_routed_public_route_and_its_fallback() -> None:
    route = build_public_route(SETTINGS, FRONT)
    assert route is not None and route["match"] == [host_match(ROUTED_HOST_RE, HOST_MAX)]
    proxy = route["handle"][-1]
    assert proxy["upstreams"] == [{"dial": f"{links.SINK}:{links.DIAL_PORT}"}]
    assert proxy["transport"] == {"protocol": "http", "local_address": links.HOST_ADDR}
    dyn = proxy["dynamic_upstreams"]
    assert dyn["name"] == "{http.request.host}" and dyn["resolver"]["addresses"] == [links.NO_RESOLVER]
    pattern = FRONT.not_public_error
    assert re.fullmatch(pattern, "dial tcp 240.0.0.0:8080: connect: no route to host")
    assert re.fullmatch(pattern, "dial tcp 240.12.3.4:8080: connect: no route to host")
    assert re.fullmatch(pattern, "dial tcp 169.254.77.1:0->240.0.0.0:8080: connect: no route to host")
    assert not re.fullmatch(pattern, "dial tcp 169.254.77.1:0->240.0.0.0:8080: bind: cannot assign requested address")
    for other in ("dial tcp 240.0.0.1:8080: connect: connection refused", "dial tcp 10.0.0.1:8080: connect: no "
                  "route to host", "dial tcp 240.0.0.1:8080: i/o timeout", "read: connection reset by peer"):
        assert not re.fullmatch(pattern, other)
    errors = build_front_errors(SETTINGS, FRONT)
    assert errors["routes"][0]["match"][0]["vars_regexp"]["{http.error.message}"]["pattern"] == pattern
    sockets = build_public_route(SETTINGS, dataclasses.replace(FRONT, routed=False))
    assert sockets is not None and "dynamic_upstreams" not in sockets["handle"][-1]


def caddy_decides(tmp_path: Path, matcher: dict, requests: list[tuple[str, str, dict[str, str]]]) -> list[bool]:
    """Whether the real Caddy's matcher set ``matcher`` takes each request (host, path, headers)."""
    sock = tmp_path / "c.sock"
    config = {"admin": {"disabled": True}, "apps": {"http": {"servers": {"s": {
        "listen": [f"unix/{sock}"], "automatic_https": {"disable": True},
        "routes": [{"match": [matcher], "handle": [{"handler": "static_response", "body": "in"}], "terminal": True},
                   {"handle": [{"handler": "static_response", "body": "out"}]}]}}}}}
    (tmp_path / "c.json").write_text(json.dumps(config))
    caddy = subprocess.Popen([caddy_binary(), "run", "--config", str(tmp_path / "c.json")], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "HOME": str(tmp_path)})
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as client:
            said = [client.get(f"http://x{path}", headers={"Host": host, **headers}).text
                    for host, path, headers in requests]
    finally:
        caddy.kill()
        caddy.wait()
    assert set(said) <= {"in", "out"}, said
    return [s == "in" for s in said]


@pytest.mark.skipif(not shutil.which(caddy_binary()), reason="caddy not installed")
def test_caddy_decides_hosts_as_host_matches(tmp_path: Path) -> None:
    """The real Caddy (Go's regexp) matches what host_matches says, at the length bound and around it."""
    matcher = host_match(ROUTED_HOST_RE, HOST_MAX)
    hosts = ["web.localhost", "a.b", "a" * 252 + "b", "a" * 253 + "b", "a" * 300 + "b", "web.localhost.", "10.0.0.1",
             "-web.localhost", "web_x.localhost", "Web.localhost", "w"]
    assert caddy_decides(tmp_path, matcher, [(h, "/", {}) for h in hosts]) == [host_matches(matcher, h) for h in hosts]


@pytest.mark.skipif(not shutil.which(caddy_binary()), reason="caddy not installed")
def test_only_requests_carrying_nothing_take_the_anonymous_route(tmp_path: Path) -> None:
    """A Cookie or an Authorization header (even empty), a share parameter or a /__ussycode path sends a request
    to the routes with the whole trust chain; nothing else does."""
    (matcher,) = build_anonymous_route(SETTINGS, FRONT)["match"]  # type: ignore[index]
    cases = [
        ("web.localhost", "/", {}, True), ("web.localhost", "/a/b?x=1&y", {"Accept": "*/*"}, True),
        ("web.localhost", "/", {"X-Ussy-User-Id": "forged", "X_Ussy_Access": "owner"}, True),
        ("web.localhost", "/", {"Cookie": ""}, False), ("web.localhost", "/", {"Cookie": "theme=dark"}, False),
        ("web.localhost", "/", {"Authorization": ""}, False),
        ("web.localhost", "/", {"Authorization": "Basic eDp5"}, False),
        ("web.localhost", "/?ussy_share=abc", {}, False), ("web.localhost", "/?a=1&ussy_share=", {}, False),
        ("web.localhost", "/__ussycode", {}, False), ("web.localhost", "/__ussycode/logout", {}, False),
        ("Web.localhost", "/", {}, False), ("a" * 254 + "b", "/", {}, False),
    ]
    took = caddy_decides(tmp_path, matcher, [(h, p, hd) for h, p, hd, _ in cases])
    assert took == [expected for *_, expected in cases], list(zip(cases, took, strict=True))
