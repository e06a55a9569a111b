"""The core loop with real VMs (container runtime): new → ssh vm@host → persistence → rm, quotas, restarts."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest

from ussycode.runtime.container import ContainerRuntime
from ussycode.store import audit

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _needs_container_runtime(test_image: object) -> None:
    check = ContainerRuntime.check()
    if not check.ok:
        pytest.skip(f"container runtime unavailable: {check.reason}")


async def _new(server, key: Path, *args: str) -> dict:
    r = await server.ssh(key, "new", *args, "--json", timeout=180)
    assert r.exit_status == 0, r
    vm = json.loads(r.stdout)
    assert vm["status"] == "running"
    return vm


async def test_new_ssh_persist_restart_rm(server_factory, tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = await server_factory(data)
    key = await server.register("demo")
    vm = await _new(server, key, "--name=box1", "--env", "'GREETING=hello world'")
    assert set(vm) == {"name", "status", "image", "cpu", "memory_mb", "disk_gb", "url", "ssh", "tags", "created_at"}
    https_port = server.app.settings.https_addr.rsplit(":", 1)[1]
    assert vm["name"] == "box1" and vm["url"] == f"http://box1.localhost:{https_port}"  # the tests run --tls off
    assert vm["ssh"].startswith("ssh -p ") and vm["ssh"].endswith(" box1@localhost")

    r = await server.ssh(key, "echo hi; id -un", user="box1")
    assert r.exit_status == 0, r
    assert r.stdout.split() == ["hi", "ussycode"]
    # exit status, stderr and the environment of login shells
    r = await server.ssh(key, "echo oops >&2; exit 7", user="box1")
    assert r.exit_status == 7 and "oops" in r.stderr
    r = await server.ssh(key, "bash -lc 'echo $USSYCODE_VM_NAME/$USSYCODE_PUBLIC_DOMAIN/$GREETING'", user="box1")
    assert r.stdout.strip() == "box1/localhost/hello world", r
    # passwordless sudo
    r = await server.ssh(key, "sudo -n id -u", user="box1")
    assert r.stdout.strip() == "0", r
    # binary-safe stdin/stdout: a tar stream in and out
    payload = os.urandom(300_000)
    src = tmp_path / "src"
    src.mkdir()
    (src / "blob.bin").write_bytes(payload)
    tar = subprocess.run(["tar", "c", "-C", str(src), "."], capture_output=True, check=True).stdout
    r = await server.ssh(key, "mkdir -p in && tar x -C in && sha256sum in/blob.bin", user="box1", stdin=tar)
    assert r.exit_status == 0, r
    import hashlib
    assert r.stdout.split()[0] == hashlib.sha256(payload).hexdigest()
    proc = await asyncio.create_subprocess_exec(*server.ssh_argv(key, "cat in/blob.bin", user="box1"),
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert out == payload

    # stop/start keeps files
    assert (await server.ssh(key, "echo persisted > ~/note.txt", user="box1")).exit_status == 0
    assert (await server.ssh(key, "stop", "box1")).exit_status == 0
    ls = json.loads((await server.ssh(key, "ls", "--json")).stdout)
    assert ls[0]["status"] == "stopped"
    r = await server.ssh(key, "true", user="box1")
    assert r.exit_status == 1 and "stopped" in r.stderr
    assert (await server.ssh(key, "start", "box1")).exit_status == 0
    assert (await server.ssh(key, "cat ~/note.txt", user="box1")).stdout.strip() == "persisted"

    # a server restart: the VM keeps running and is re-attached, untouched
    pid_before = (await server.ssh(key, "cat /proc/1/stat | cut -d' ' -f22", user="box1")).stdout
    await server.app.stop()
    server = await server_factory(data)
    ls = json.loads((await server.ssh(key, "ls", "--json")).stdout)
    assert ls[0]["status"] == "running"
    assert (await server.ssh(key, "cat ~/note.txt", user="box1")).stdout.strip() == "persisted"
    assert (await server.ssh(key, "cat /proc/1/stat | cut -d' ' -f22", user="box1")).stdout == pid_before

    # rm: confirmation is required non-interactively; then the disk file goes
    disk = data / "disks"
    assert any(disk.iterdir())
    r = await server.ssh(key, "rm", "box1")
    assert r.exit_status == 2 and "--yes" in r.stderr
    assert (await server.ssh(key, "rm", "box1", "--yes")).exit_status == 0
    assert json.loads((await server.ssh(key, "ls", "--json")).stdout) == []
    assert not [p for p in disk.iterdir() if p.suffix == ".ext4"]
    actions = [r["action"] for r in await server.app.services.store.read(lambda c: audit.recent(c))]
    for action in ("vm.create", "vm.start", "vm.stop", "vm.remove"):
        assert action in actions


async def test_vm_comes_back_after_it_was_killed_with_the_server(server_factory, tmp_path: Path) -> None:
    """A VM that was running when the host went down is started again by the next server."""
    data = tmp_path / "data"
    server = await server_factory(data)
    key = await server.register("phoenix")
    await _new(server, key, "--name=phoenix1")
    assert (await server.ssh(key, "echo alive > ~/f", user="phoenix1")).exit_status == 0
    vm = await server.app.services.vms.by_name("phoenix1")
    await server.app.stop()
    rt = server.app.services.vms.runtime
    await rt.load_state(vm.id, vm.runtime_state)
    await rt.stop(vm.id)  # as if the host had rebooted
    server = await server_factory(data)
    ls = json.loads((await server.ssh(key, "ls", "--json")).stdout)
    assert ls[0]["status"] == "running"
    assert (await server.ssh(key, "cat ~/f", user="phoenix1")).stdout.strip() == "alive"
    assert (await server.ssh(key, "rm", "phoenix1", "--yes")).exit_status == 0


async def test_quotas_for_a_newbie(server) -> None:
    await server.register("admin1")  # the first account is the admin
    key = await server.register("newbie1")
    me = json.loads((await server.ssh(key, "whoami", "--json")).stdout)
    assert me["trust_level"] == "newbie"
    r = await server.ssh(key, "new", "--name=big1", "--cpu=2")
    assert r.exit_status == 1 and "vCPU limit" in r.stderr
    r = await server.ssh(key, "new", "--name=big2", "--memory=4096")
    assert r.exit_status == 1 and "memory limit" in r.stderr
    for i in range(3):
        await _new(server, key, f"--name=nb{i}x", "--disk=1")
    r = await server.ssh(key, "new", "--name=nb4x", "--disk=1")
    assert r.exit_status == 1 and "VM limit reached" in r.stderr and "3 of 3" in r.stderr
    r = await server.ssh(key, "cp", "nb0x")
    assert r.exit_status == 1 and "VM limit reached" in r.stderr
    for i in range(3):
        assert (await server.ssh(key, "rm", f"nb{i}x", "--yes")).exit_status == 0


async def test_rename_tag_cp(server) -> None:
    key = await server.register("shuffler")
    await _new(server, key, "--name=orig1", "--disk=1")
    assert (await server.ssh(key, "echo one > ~/f", user="orig1")).exit_status == 0
    assert (await server.ssh(key, "tag", "orig1", "web")).exit_status == 0
    assert (await server.ssh(key, "rename", "orig1", "renamed1")).exit_status == 0
    ls = json.loads((await server.ssh(key, "ls", "--json")).stdout)
    assert [v["name"] for v in ls] == ["renamed1"] and ls[0]["tags"] == ["web"]
    assert (await server.ssh(key, "cat ~/f", user="renamed1")).stdout.strip() == "one"
    r = await server.ssh(key, "true", user="orig1")  # the old name is now just a lobby user name
    assert "unknown command" in r.stderr
    r = await server.ssh(key, "cp", "renamed1", "copy1", "--json", timeout=180)
    assert r.exit_status == 0, r
    assert json.loads(r.stdout)["status"] == "running"
    assert (await server.ssh(key, "cat ~/f", user="copy1")).stdout.strip() == "one"
    assert (await server.ssh(key, "echo two > ~/f", user="copy1")).exit_status == 0
    assert (await server.ssh(key, "cat ~/f", user="renamed1")).stdout.strip() == "one"  # independent
    assert (await server.ssh(key, "tag", "-d", "renamed1", "web")).exit_status == 0
    for name in ("renamed1", "copy1"):
        assert (await server.ssh(key, "rm", name, "--yes")).exit_status == 0


async def test_only_the_owner_gets_in(server) -> None:
    owner = await server.register("owner")
    other = await server.register("intruder")
    await _new(server, owner, "--name=private1", "--disk=1")
    r = await server.ssh(other, "id", user="private1")
    assert r.exit_status != 0 and "ussycode" not in r.stdout  # the intruder lands in the lobby
    r = await server.ssh(other, "stop", "private1")
    assert r.exit_status == 1 and "no VM named" in r.stderr
    r = await server.ssh(other, "new", "--name=private1")
    assert r.exit_status == 1 and "taken" in r.stderr
    assert (await server.ssh(owner, "rm", "private1", "--yes")).exit_status == 0


async def test_pty_sftp_scp_and_port_forward(server, tmp_path: Path) -> None:
    key = await server.register("power")
    await _new(server, key, "--name=power1", "--disk=1")
    conn = await server.connect(key, user="power1")
    async with conn:
        # a PTY whose size follows the client, including resizes
        proc = await conn.create_process("stty size; read x; stty size", term_type="xterm", term_size=(100, 40))
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert first.strip() == "40 100"
        proc.change_terminal_size(132, 50)
        await asyncio.sleep(0.3)
        proc.stdin.write("go\n")
        lines = []
        while len(lines) < 2:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            if line.strip():
                lines.append(line.strip())
        assert lines[-1] == "50 132"
        await proc.wait()
        # sftp
        async with conn.start_sftp_client() as sftp:
            async with sftp.open("sftp.txt", "w") as fh:
                await fh.write("via sftp")
            assert "sftp.txt" in await sftp.listdir(".")
        # -L: a web server in the VM on 8080, reached through the tunnel
        await conn.run("nohup python3 -m http.server 8080 >/dev/null 2>&1 &", check=False)
        await asyncio.sleep(1.5)
        listener = await conn.forward_local_port("127.0.0.1", 0, "localhost", 8080)
        port = listener.get_port()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        body = await asyncio.wait_for(reader.read(), 10)
        assert body.startswith(b"HTTP/1.0 200")
        writer.close()
        listener.close()
    # OpenSSH scp and sftp clients
    local = tmp_path / "up.txt"
    local.write_text("via scp")
    base = ["-P", str(server.port), "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-F", "/dev/null"]
    proc = await asyncio.create_subprocess_exec("scp", "-q", *base, str(local), "power1@127.0.0.1:up.txt")
    assert await proc.wait() == 0
    assert (await server.ssh(key, "cat up.txt sftp.txt", user="power1")).stdout == "via scpvia sftp"
    proc = await asyncio.create_subprocess_exec("scp", "-q", *base, "power1@127.0.0.1:up.txt",
                                                str(tmp_path / "down.txt"))
    assert await proc.wait() == 0
    assert (tmp_path / "down.txt").read_text() == "via scp"
    assert (await server.ssh(key, "rm", "power1", "--yes")).exit_status == 0


async def test_ssh_from_the_lobby(server) -> None:
    key = await server.register("lobbyist")
    await _new(server, key, "--name=hop1", "--disk=1")
    r = await server.ssh(key, "ssh", "hop1", "echo", "from-lobby")
    assert r.exit_status == 0 and r.stdout.strip() == "from-lobby", r
    conn = await server.connect(key)
    async with conn:
        proc = await conn.create_process(term_type="xterm", term_size=(80, 24))
        await asyncio.wait_for(proc.stdout.readuntil("ussy> "), 10)
        proc.stdin.write("ssh hop1\r")
        await asyncio.sleep(1.5)
        proc.stdin.write("echo inside-$((6*7))\r")
        out = await asyncio.wait_for(proc.stdout.readuntil("inside-42"), 20)
        proc.stdin.write("exit\r")
        out = await asyncio.wait_for(proc.stdout.readuntil("ussy> "), 20)
        proc.stdin.write("whoami\r")
        out = await asyncio.wait_for(proc.stdout.readuntil("ussy> "), 10)
        assert "lobbyist" in out
        proc.stdin.write("exit\r")
        await asyncio.wait_for(proc.wait(), 10)
    r = await server.ssh(key, "ssh", "hop1")  # over the API-like one-shot path there is no terminal: still works
    assert r.exit_status == 0
    assert (await server.ssh(key, "rm", "hop1", "--yes")).exit_status == 0


async def test_parallel_new_from_five_users(server) -> None:
    await server.register("root-admin")
    # five people on five machines (the registration limit counts per source address)
    keys = [await server.register(f"user{i}", bind=f"127.0.0.{10 + i}") for i in range(5)]

    async def create(i: int, key: Path) -> tuple[int, str]:
        r = await server.ssh(key, "new", f"--name=par{i}x", "--disk=1", "--json", timeout=300)
        return r.exit_status, r.stderr

    # 4 per newbie: 3 fit the quota, the 4th must be refused with the limit named
    jobs = [create(u * 4 + j, keys[u]) for u in range(5) for j in range(4)]
    results = await asyncio.gather(*jobs)
    ok = [r for r in results if r[0] == 0]
    refused = [r for r in results if r[0] != 0]
    assert len(ok) == 15, results
    assert len(refused) == 5 and all("VM limit reached" in r[1] for r in refused), refused
    assert not any("locked" in r[1] for r in results)
    for _u, key in enumerate(keys):
        vms = json.loads((await server.ssh(key, "ls", "--json")).stdout)
        assert len(vms) == 3 and all(v["status"] == "running" for v in vms)
        for v in vms:
            r = await server.ssh(key, "hostname", user=v["name"])
            assert r.stdout.strip() == v["name"], r
    for key in keys:
        for v in json.loads((await server.ssh(key, "ls", "--json")).stdout):
            assert (await server.ssh(key, "rm", v["name"], "--yes")).exit_status == 0


async def test_a_vm_killed_behind_our_back_is_marked_stopped(server) -> None:
    key = await server.register("crashy")
    await _new(server, key, "--name=crash1", "--disk=1")
    assert await server.kill_vm_and_wait_stopped(key, "crash1")
    assert (await server.ssh(key, "start", "crash1")).exit_status == 0
    assert (await server.ssh(key, "rm", "crash1", "--yes")).exit_status == 0

