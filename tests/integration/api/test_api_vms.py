"""The issue's acceptance path with real VMs (container runtime): a token made over SSH creates, lists and removes
a VM through POST /exec; a --vm token is confined to its VM, here and on the VM's URL."""

from __future__ import annotations

import asyncio
import json

import pytest

from ussycode.runtime.container import ContainerRuntime
from ussycode.services.tokens import AUTH_CACHE_TTL
from ussycode.store import audit

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _needs_container_runtime(test_image: object) -> None:
    check = ContainerRuntime.check()
    if not check.ok:
        pytest.skip(f"container runtime unavailable: {check.reason}")


async def test_new_ls_rm_through_the_api_and_vm_scoped_tokens(server, api) -> None:
    key = await server.register("lena")
    token = (await api.create_token(key))["token"]

    reply = await api.run(token, "new --name=api1 --json")
    assert reply["exit_code"] == 0, reply
    vm = json.loads(reply["output"])
    assert vm["name"] == "api1" and vm["status"] == "running"
    listed = json.loads((await api.run(token, "ls --json"))["output"])
    assert [v["name"] for v in listed] == ["api1"] and listed[0]["status"] == "running"
    # the VM really runs: reachable over SSH
    r = await server.ssh(key, "id -un", user="api1")
    assert r.exit_status == 0 and r.stdout.strip() == "ussycode", r

    # rm without --yes fails at once (no prompt to hang on), and says how
    reply = await api.run(token, "rm api1")
    assert reply["exit_code"] == 2 and "rm api1 --yes" in reply["error"], reply
    assert [v["name"] for v in json.loads((await api.run(token, "ls --json"))["output"])] == ["api1"]

    # a --cmds=ls token may list but not create
    ls_only = (await api.create_token(key, "--cmds=ls"))["token"]
    r = await api.exec(ls_only, "new --name=api2")
    assert r.status_code == 403 and "not permitted" in r.json()["error"]

    # a --vm token: only that VM, only VM commands and ls/whoami
    second = json.loads((await api.run(token, "new --name=api2 --json"))["output"])
    assert second["status"] == "running"
    scoped = await api.create_token(key, "--vm=api1")
    vm_token = scoped["token"]
    assert [v["name"] for v in json.loads((await api.run(vm_token, "ls --json"))["output"])] == ["api1"]
    assert (await api.run(vm_token, "whoami"))["exit_code"] == 0
    for line in ("new --name=api3", "token list", "ssh-key list", "cp api1 api9"):
        r = await api.exec(vm_token, line)
        assert r.status_code == 403, (line, r.text)
    for line in ("stop api2", "rm api2 --yes", "tag api2 x"):
        reply = await api.run(vm_token, line)
        assert reply["exit_code"] == 1 and "no VM named 'api2'" in reply["error"], (line, reply)
    reply = await api.run(vm_token, "tag api1 scripted")
    assert reply["exit_code"] == 0, reply
    listed = json.loads((await api.run(token, "ls --json"))["output"])
    assert {v["name"]: v["status"] for v in listed} == {"api1": "running", "api2": "running"}

    # on VM URLs (forward-auth): the --vm token is good for api1 only; an unrestricted token for any VM
    tokens = server.app.services.tokens
    assert (await tokens.authenticate_for_vm(vm_token, "api1")) is not None
    assert (await tokens.authenticate_for_vm(vm_token, "api2")) is None
    assert (await tokens.authenticate_for_vm(ls_only, "api1")) is None  # --cmds tokens are for the API only
    assert (await tokens.authenticate_for_vm(token, "api2")) is not None
    assert (await tokens.authenticate_for_vm("usy1.bogus", "api1")) is None

    # the scope follows a rename
    assert (await api.run(token, "rename api1 api1b"))["exit_code"] == 0
    await asyncio.sleep(AUTH_CACHE_TTL)  # a verified token is remembered this long
    assert [v["name"] for v in json.loads((await api.run(vm_token, "ls --json"))["output"])] == ["api1b"]

    # removing with --yes works; the VM's token goes with it
    for name in ("api1b", "api2"):
        reply = await api.run(token, f"rm {name} --yes")
        assert reply["exit_code"] == 0, reply
    assert json.loads((await api.run(token, "ls --json"))["output"]) == []
    await asyncio.sleep(AUTH_CACHE_TTL)
    assert (await api.exec(vm_token, "ls")).status_code == 401
    actions = {a["action"] for a in await server.app.services.store.read(lambda c: audit.recent(c, 500))}
    assert {"token.create", "token.forbidden", "token.refused", "vm.create", "vm.remove"} <= actions
