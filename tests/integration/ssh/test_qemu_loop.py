"""The core loop on the qemu runtime (TCG here): a real guest kernel behind the same lobby and gateway."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest

from ussycode.runtime.qemu import QemuRuntime

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _needs_qemu(test_image: object) -> None:
    check = QemuRuntime.check()
    if not check.ok:
        pytest.skip(f"qemu runtime unavailable: {check.reason}")


async def test_qemu_vm_through_the_gateway(server_factory, tmp_path: Path) -> None:
    server = await server_factory(tmp_path / "data", runtime="qemu")
    key = await server.register("kernelfan")
    r = await server.ssh(key, "new", "--name=vm1", "--disk=2", "--memory=512", "--json", timeout=400)
    assert r.exit_status == 0, r
    assert json.loads(r.stdout)["status"] == "running"
    r = await server.ssh(key, "uname -r", user="vm1")
    assert r.exit_status == 0, r
    guest_kernel = r.stdout.strip()
    assert guest_kernel and guest_kernel != platform.release()  # the guest's own kernel, not the host's
    # the metadata service answers inside a qemu guest too, with this VM's identity and the gateway's URLs
    fetch = ("python3 -c \"import urllib.request as u; print(u.urlopen('http://169.254.169.254/{}', "
             "timeout=30).read().decode())\"")
    r = await server.ssh(key, fetch.format("hostname"), user="vm1")
    assert r.exit_status == 0 and r.stdout.strip() == "vm1", r
    r = await server.ssh(key, fetch.format("env"), user="vm1")
    assert "OPENAI_BASE_URL=http://169.254.169.254/gateway/llm/openai/v1" in r.stdout, r
    assert "USSYCODE_VM_NAME=vm1" in r.stdout
    assert (await server.ssh(key, "echo kept > ~/f && sync", user="vm1")).exit_status == 0
    assert (await server.ssh(key, "stop", "vm1", timeout=200)).exit_status == 0
    assert (await server.ssh(key, "start", "vm1", timeout=400)).exit_status == 0
    assert (await server.ssh(key, "cat ~/f", user="vm1")).stdout.strip() == "kept"

    # cp: an independent copy
    r = await server.ssh(key, "cp", "vm1", "vm2", "--json", timeout=600)
    assert r.exit_status == 0, r
    assert (await server.ssh(key, "echo changed > ~/f && sync", user="vm2")).exit_status == 0
    assert (await server.ssh(key, "cat ~/f", user="vm1")).stdout.strip() == "kept"
    assert (await server.ssh(key, "rm", "vm2", "--yes", timeout=200)).exit_status == 0

    # killing QEMU from outside: the DB soon stops claiming the VM runs
    assert await server.kill_vm_and_wait_stopped(key, "vm1")
    assert (await server.ssh(key, "rm", "vm1", "--yes", timeout=200)).exit_status == 0
