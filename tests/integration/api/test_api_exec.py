"""POST /exec against a real app server on loopback, with tokens made over real SSH (no VMs needed here)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from ussycode.services.tokens import AUTH_CACHE_TTL
from ussycode.store.schema import api_tokens, utcnow

pytestmark = pytest.mark.asyncio

JSON_ERROR_KEYS = {"error", "code"}


def assert_error(r: httpx.Response, code: int, text: str = "") -> dict[str, Any]:
    assert r.status_code == code, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = r.json()
    assert set(body) == JSON_ERROR_KEYS and body["code"] == code and isinstance(body["error"], str), body
    assert text.lower() in body["error"].lower(), body
    return body


async def test_token_create_list_revoke_over_ssh(server, api) -> None:
    key = await server.register("alice")
    created = await api.create_token(key, "--expires=7d")
    assert set(created) == {"id", "token", "expires_at"}
    assert created["token"].startswith(f"usy1.{created['id']}.") and created["expires_at"].endswith("Z")
    secret = created["token"].split(".")[2]

    # human output: shown once with a curl line
    r = await server.ssh(key, "token", "create", "--cmds=ls,whoami")
    assert r.exit_status == 0, r
    assert "only time it is shown" in r.stdout and "Authorization: Bearer usy1." in r.stdout

    r = await server.ssh(key, "token", "list", "--json")
    assert r.exit_status == 0, r
    listed = sorted(json.loads(r.stdout), key=lambda t: t["cmds"] is not None)  # same second: order by id
    assert [t["status"] for t in listed] == ["active", "active"]
    assert listed[0]["id"] == created["id"] and listed[0]["cmds"] is None and listed[1]["cmds"] == ["ls", "whoami"]
    assert set(listed[0]) == {"id", "cmds", "vm", "created_at", "expires_at", "last_used_at", "revoked_at", "status"}
    assert secret not in r.stdout
    r = await server.ssh(key, "token", "list")
    assert r.exit_status == 0 and created["id"] in r.stdout and secret not in r.stdout

    # stored hashed: the secret appears in no column
    rows = await server.app.services.store.read(lambda c: [dict(x._mapping) for x in c.execute(sa.select(api_tokens))])
    assert len(rows) == 2 and all(secret not in json.dumps(row, default=str) for row in rows)

    r = await server.ssh(key, "token", "revoke", created["id"])
    assert r.exit_status == 0 and "revoked" in r.stdout, r
    r = await server.ssh(key, "token", "revoke", created["id"])
    assert r.exit_status == 0 and "already revoked" in r.stdout, r
    r = await server.ssh(key, "token", "revoke", "nosuchtoken1")
    assert r.exit_status == 1 and "no token" in r.stderr, r
    r = await server.ssh(key, "token", "list", "--json")
    assert {t["id"]: t["status"] for t in json.loads(r.stdout)}[created["id"]] == "revoked"

    # another user cannot see or revoke alice's token
    bob = await server.register("bob")
    r = await server.ssh(bob, "token", "revoke", listed[1]["id"])
    assert r.exit_status == 1 and "no token" in r.stderr
    r = await server.ssh(bob, "token", "list", "--json")
    assert json.loads(r.stdout) == []

    assert [a["target"] for a in await api.audit("token.create")] == [listed[1]["id"], created["id"]]
    assert [a["target"] for a in await api.audit("token.revoke")] == [created["id"]]


@pytest.mark.parametrize(("args", "status", "message"), [
    (["--expires=bogus"], 2, "invalid duration"),
    (["--expires=0d"], 2, "invalid duration"),
    (["--expires=20y"], 2, "too long"),
    (["--cmds=nope"], 2, "unknown command 'nope'"),
    (["--cmds=,"], 2, "at least one command"),
    (["--vm=nosuch"], 1, "no vm named 'nosuch'"),
    (["--vm=nosuch", "--cmds=new"], 2, "cannot run new"),
    (["--bogus"], 2, "unrecognized arguments"),
])
async def test_token_create_validation(server, args: list[str], status: int, message: str) -> None:
    key = await server.register("val")
    r = await server.ssh(key, "token", "create", *args)
    assert r.exit_status == status, r
    assert message in r.stderr.lower(), r


async def test_exec_runs_commands_like_ssh(server, api) -> None:
    key = await server.register("carol")
    token = (await api.create_token(key))["token"]

    reply = await api.run(token, "whoami")
    assert reply["exit_code"] == 0 and "carol" in reply["output"] and "error" not in reply
    # JSON body, and a --json command returns its JSON text in output
    r = await api.exec(token, json_body={"command": "whoami --json"})
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"output", "exit_code"}
    assert json.loads(r.json()["output"])["handle"] == "carol"
    # no content type at all is text too; trailing newline from `echo ls | curl --data-binary @-` is fine
    r = await api.exec(token, b"ls --json\n", content_type=None)
    assert r.status_code == 200 and json.loads(r.json()["output"]) == []
    assert (await api.exec(token, "ls", content_type="text/plain; charset=UTF-8")).status_code == 200
    # the same output as over SSH
    over_ssh = await server.ssh(key, "help")
    assert (await api.run(token, "help"))["output"] == over_ssh.stdout

    # failures mirror SSH: exit status 1 / 2 and the same error text in "error"
    for line in ("rm nosuch --yes", "frobnicate", "ls --bogus", "rm nosuch"):
        reply = await api.run(token, line)
        ssh = await server.ssh(key, *line.split())
        assert reply["exit_code"] == ssh.exit_status and reply["exit_code"] in (1, 2), (line, reply)
        assert reply["error"] == ssh.stderr, (line, reply, ssh)
        assert reply["error"].startswith("error: ")
    # POSIX quoting, as over SSH
    reply = await api.run(token, "help 'ls'")
    assert reply["exit_code"] == 0 and "usage: ls" in reply["output"]
    # ssh needs a terminal: refused at once with the command to use instead
    reply = await api.run(token, "ssh somevm")
    assert reply["exit_code"] == 2 and "ssh -p" in reply["error"]
    # the token is remembered as used
    listed = json.loads((await server.ssh(key, "token", "list", "--json")).stdout)
    assert listed[0]["last_used_at"] is not None


async def test_exec_bad_requests(server, api) -> None:
    key = await server.register("dave")
    token = (await api.create_token(key))["token"]

    # auth
    r = assert_error(await api.exec(None, "whoami"), 401, "missing token")
    for header in ({"Authorization": "Basic ZGF2ZTp4"}, {"Authorization": "Bearer"}, {"Authorization": "Token abc"}):
        r = await api.exec(None, "whoami", headers=header)
        assert_error(r, 401)
        assert r.headers["www-authenticate"].startswith("Bearer")
    wrong_secret = token[:-1] + ("A" if token[-1] != "A" else "B")
    for bad in ("nonsense", "usy1.x.y", "usy1.abcdefghijkl." + "A" * 43, wrong_secret, "usy0.e30.AAAA", "x" * 9000):
        assert_error(await api.exec(bad, "whoami"), 401)

    # method
    for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS"):
        r = await api.exec(token, "whoami", method=method)
        assert_error(r, 405)
        assert r.headers["allow"] == "POST"

    # body
    assert_error(await api.exec(token, b""), 400, "empty command")
    assert_error(await api.exec(token, b"", content_type=None), 400, "empty command")
    assert_error(await api.exec(token, b"  \n\t "), 400, "empty command")
    assert_error(await api.exec(token, b"who\xffami"), 400, "utf-8")
    assert_error(await api.exec(token, b"whoami\x00"), 400, "nul")
    assert_error(await api.exec(token, "help 'unbalanced"), 400, "quotes")
    assert_error(await api.exec(token, "whoami", content_type="text/html"), 415)
    assert_error(await api.exec(token, "whoami", content_type="text/plain; charset=latin-1"), 415, "utf-8")
    for doc in ({"command": 1}, {"command": None}, {"command": ["ls"]}, ["whoami"], "whoami", 3, None,
                {"cmd": "ls"}, {"command": "ls", "extra": 1}, {}, {"command": ""}, {"command": "ls\u0000"}):
        r = await api.exec(token, json.dumps(doc), content_type="application/json")
        assert_error(r, 400)
    assert_error(await api.exec(token, b"{not json", content_type="application/json"), 400, "json")
    assert_error(await api.exec(token, b"\xff\xfe", content_type="application/json"), 400)

    # size: 64 KiB is the limit, by Content-Length and by counting streamed bytes
    big = b"help " + b"a" * (65 * 1024)
    assert_error(await api.exec(token, big), 413, "too large")

    async def stream() -> AsyncIterator[bytes]:
        for _ in range(65):
            yield b"a" * 1024
        yield b"a"

    r = await api.client.post(f"{api.base}/exec", content=stream(),
                              headers={"Authorization": f"Bearer {token}", "Content-Type": "text/plain"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "too large")
    async def pieces() -> AsyncIterator[bytes]:  # a command line in several chunks is put back together
        for part in (b"who", b"", b"ami --j", b"son"):
            yield part

    r = await api.client.post(f"{api.base}/exec", content=pieces(),
                              headers={"Authorization": f"Bearer {token}", "Content-Type": "text/plain"})
    assert r.status_code == 200 and json.loads(r.json()["output"])["handle"], r.text
    # just under the limit is a (long, unknown) command line, not an error of the API
    reply = await api.run(token, "x" * (64 * 1024 - 10))
    assert reply["exit_code"] == 2

    r = await api.client.get(f"{api.base}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    refused = await api.audit("token.refused")
    # 10 refusals from one address, audited aggregated: one row per (reason, token id) and window
    keys = [(a["detail"]["reason"], a["target"]) for a in refused]
    assert len(keys) == len(set(keys)) and len(keys) < 10 and ("missing", "") in keys, keys
    assert all(a["detail"]["client"] == "127.0.0.1" for a in refused)
    assert all(token.split(".")[2] not in json.dumps(a, default=str) for a in refused)


async def test_cmds_token_is_limited(server, api) -> None:
    key = await server.register("erin")
    token = (await api.create_token(key, "--cmds=ls,whoami"))["token"]
    assert (await api.run(token, "ls"))["exit_code"] == 0
    assert (await api.run(token, "whoami --json"))["exit_code"] == 0
    for line in ("new --name=nope", "token create", "help", "delete x --yes", "ssh-key list"):
        assert_error(await api.exec(token, line), 403, "not permitted by this token")
    forbidden = await api.audit("token.forbidden")
    assert [a["detail"]["command"] for a in forbidden][:2] == ["ssh-key", "rm"]
    # a restricted token cannot mint a broader one, even when allowed to run `token`
    narrow = (await api.create_token(key, "--cmds=token"))["token"]
    reply = await api.run(narrow, "token create")
    assert reply["exit_code"] == 1 and "restricted token cannot create tokens" in reply["error"]
    assert (await api.run(narrow, "token list --json"))["exit_code"] == 0
    # an unrestricted token can (it is the user)
    full = (await api.create_token(key))["token"]
    reply = await api.run(full, "token create --cmds=ls --json")
    assert reply["exit_code"] == 0 and json.loads(reply["output"])["token"].startswith("usy1.")


async def test_revoked_and_expired_tokens_get_401(server, api) -> None:
    key = await server.register("frank")
    created = await api.create_token(key, "--expires=1h")
    token = created["token"]
    assert (await api.run(token, "whoami"))["exit_code"] == 0

    # revoke over the API itself, then the token is refused
    reply = await api.run(token, f"token revoke {created['id']}")
    assert reply["exit_code"] == 0, reply
    assert_error(await api.exec(token, "whoami"), 401, "revoked")

    # expiry: move the expiry of a fresh token into the past in the real database
    other = await api.create_token(key, "--expires=30m")
    assert (await api.run(other["token"], "whoami"))["exit_code"] == 0

    def expire(c: sa.Connection) -> None:
        c.execute(api_tokens.update().where(api_tokens.c.id == other["id"]).values(expires_at=utcnow()))

    await server.app.services.store.write(expire)
    await asyncio.sleep(AUTH_CACHE_TTL)  # a verified token is remembered this long (expiry never changes in real life)
    assert_error(await api.exec(other["token"], "whoami"), 401, "expired")
    listed = {t["id"]: t["status"] for t in json.loads((await server.ssh(key, "token", "list", "--json")).stdout)}
    assert listed == {created["id"]: "revoked", other["id"]: "expired"}

    reasons = [(a["target"], a["detail"]["reason"], a["actor_id"]) for a in await api.audit("token.refused")]
    user_id = server.app.services.users and (await server.app.services.users.by_handle("frank")).id
    assert (created["id"], "revoked", user_id) in reasons and (other["id"], "expired", user_id) in reasons


async def test_burst_of_1000_is_rate_limited_and_shared_with_ssh(server_factory, api_factory) -> None:
    server = await server_factory(rate_per_minute=1, rate_burst=30)  # no refill to speak of during the test
    api = api_factory(server)
    key = await server.register("gina")
    token = (await api.create_token(key))["token"]
    settings = server.app.settings

    replies: list[httpx.Response] = []

    async def worker() -> None:  # 64 in flight at once (more only queues inside the client's pool)
        while len(replies) < 1000:
            replies.append(await api.exec(token, "whoami"))

    await asyncio.gather(*(worker() for _ in range(64)))
    replies = replies[:1000]
    codes = [r.status_code for r in replies]
    ok, limited = codes.count(200), codes.count(429)
    assert ok + limited == 1000, sorted(set(codes))
    # the burst, less the one `token create` over SSH spent (the bucket is shared), plus at most one refilled
    assert ok in (settings.rate_burst - 1, settings.rate_burst), ok
    for r in replies:
        if r.status_code == 429:
            assert_error(r, 429, "rate limit")
            assert 1 <= int(r.headers["retry-after"]) <= 60
        else:
            assert r.json()["exit_code"] == 0
    # the limiter is per user and shared with SSH one-shot commands
    r = await server.ssh(key, "whoami")
    assert r.exit_status == 1 and "rate limit" in r.stderr, r
    # other users are not affected, nothing changed, and the server is still up
    other = await server.register("hank")
    other_token = (await api.create_token(other))["token"]
    assert (await api.run(other_token, "whoami"))["exit_code"] == 0
    assert (await api.client.get(f"{api.base}/health")).status_code == 200
    assert await server.app.services.users.vm_count((await server.app.services.users.by_handle("gina")).id) == 0
    assert len(await api.audit("token.refused")) == 0


async def test_idle_keep_alive_connection_is_not_dropped_under_a_client(server) -> None:
    """A connection left idle longer than uvicorn's default 5 s is still served: Caddy (and httpx) reuse idle
    connections for minutes, and a server closing first resets a request sent at that moment."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.app.http_port)
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    for _ in range(2):
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200"), head
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
        await asyncio.sleep(6.5)
        assert not reader.at_eof()
    writer.close()


async def test_openapi_document(server, api) -> None:
    r = await api.client.get(f"{api.base}/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.") and {"/exec", "/health", "/openapi.json"} <= set(doc["paths"])
    exec_op = doc["paths"]["/exec"]["post"]
    assert {"200", "400", "401", "403", "413", "415", "429", "504"} <= set(exec_op["responses"])
    assert set(exec_op["requestBody"]["content"]) == {"text/plain", "application/json"}


async def test_plain_curl_d_works_as_typed(server, api) -> None:
    """`curl -d` (form content type) as a user types it: the body is the command line, verbatim."""
    key = await server.register("curler")
    token = json.loads((await server.ssh(key, "token", "create", "--json")).stdout)["token"]
    url = f"http://127.0.0.1:{server.app.http_port}/exec"
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-H", f"Authorization: Bearer {token}", "-d", "whoami --json", url,
        stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    reply = json.loads(out)
    assert reply["exit_code"] == 0 and json.loads(reply["output"])["handle"] == "curler"
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-H", f"Authorization: Bearer {token}", "-d", "help a+b%20c", url,
        stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert "a+b%20c" in json.loads(out)["error"]  # no form decoding


async def test_bad_token_flood_is_rate_limited_per_address_and_audited_once(server, api, caplog) -> None:
    caplog.set_level(logging.INFO, logger="ussycode.services.tokens")
    key = await server.register("flood")
    token = (await api.create_token(key))["token"]
    codes = [(await api.exec("usy1.abcdefghijkl." + "A" * 43, "whoami")).status_code for _ in range(60)]
    assert codes[:20] == [401] * 20 and set(codes[20:]) == {429}, codes
    r = await api.exec("usy1.abcdefghijkl." + "A" * 43, "whoami")
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and r.json()["code"] == 429
    # refused before any check: even a good token from this address waits
    assert (await api.exec(token, "whoami")).status_code == 429
    refused = [a for a in await api.audit("token.refused") if a["target"] == "abcdefghijkl"]
    assert len(refused) == 1, refused  # 20 refusals, one audit row (the window folds the rest)
    lines = [r.getMessage() for r in caplog.records if r.name == "ussycode.services.tokens"
             and "abcdefghijkl" in r.getMessage()]
    assert len(lines) == 1 and "refused api token" in lines[0], lines  # and one log line


async def test_token_cannot_outlive_the_token_that_creates_it(server, api) -> None:
    key = await server.register("mint")
    parent = await api.create_token(key, "--expires=1h")
    reply = await api.run(parent["token"], "token create --expires=2h")
    assert reply["exit_code"] == 2 and "cannot outlive" in reply["error"], reply
    reply = await api.run(parent["token"], "token create --json")  # no --expires: the parent's expiry
    assert reply["exit_code"] == 0
    child = json.loads(reply["output"])
    assert child["expires_at"] == parent["expires_at"], (child, parent)
    reply = await api.run(parent["token"], "token create --expires=30m --json")
    assert reply["exit_code"] == 0 and json.loads(reply["output"])["expires_at"] < parent["expires_at"]
