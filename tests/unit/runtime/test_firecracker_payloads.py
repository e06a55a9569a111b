"""Firecracker payload builders against the API schema (swagger ``firecracker.yaml``), and the API client.

The schema facts below are copied from firecracker's ``src/firecracker/swagger/firecracker.yaml`` definitions
(required fields and the allowed properties), so a payload with a misspelt or unknown field fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from ussycode.errors import RuntimeFailure
from ussycode.runtime.firecracker import payloads
from ussycode.runtime.firecracker.runtime import FirecrackerApi, FirecrackerRuntime, firecracker_reason, tap_argvs

SCHEMA: dict[str, tuple[set[str], set[str]]] = {  # definition: (required, allowed properties)
    "MachineConfiguration": (
        {"mem_size_mib", "vcpu_count"},
        {"cpu_template", "smt", "mem_size_mib", "track_dirty_pages", "vcpu_count", "huge_pages"},
    ),
    "BootSource": ({"kernel_image_path"}, {"boot_args", "initrd_path", "kernel_image_path"}),
    "Drive": (
        {"drive_id", "is_root_device"},
        {"drive_id", "partuuid", "is_root_device", "cache_type", "is_read_only", "path_on_host", "rate_limiter",
         "io_engine", "socket"},
    ),
    "NetworkInterface": (
        {"host_dev_name", "iface_id"}, {"guest_mac", "host_dev_name", "iface_id", "mtu", "rx_rate_limiter",
                                        "tx_rate_limiter"},
    ),
    "InstanceActionInfo": ({"action_type"}, {"action_type"}),
}
PATH_SCHEMA = {
    "/machine-config": "MachineConfiguration",
    "/boot-source": "BootSource",
    "/drives/": "Drive",
    "/network-interfaces/": "NetworkInterface",
    "/actions": "InstanceActionInfo",
}


def conforms(definition: str, body: dict[str, object]) -> None:
    required, allowed = SCHEMA[definition]
    assert required <= body.keys(), f"{definition} misses {required - body.keys()}"
    assert body.keys() <= allowed, f"{definition} has unknown fields {body.keys() - allowed}"


def test_machine_config() -> None:
    body = payloads.machine_config(2, 1024)
    conforms("MachineConfiguration", body)
    assert body == {"vcpu_count": 2, "mem_size_mib": 1024, "smt": False}
    assert isinstance(body["vcpu_count"], int)


@pytest.mark.parametrize(("cpu", "mem", "smt"), [(0, 512, False), (33, 512, False), (3, 512, True), (1, 64, False)])
def test_machine_config_limits(cpu: int, mem: int, smt: bool) -> None:
    with pytest.raises(ValueError):
        payloads.machine_config(cpu, mem, smt=smt)


def test_boot_source_and_args() -> None:
    body = payloads.boot_source(Path("/k/vmlinux"), Path("/k/initrd"), payloads.boot_args())
    conforms("BootSource", body)
    args = str(body["boot_args"]).split()
    assert "pci=off" in args and "reboot=k" in args and "reboot=t" not in args
    assert "console=ttyS0" in args and "rdinit=/init" in args


def test_drive_enums() -> None:
    body = payloads.drive("root", Path("/d/disk.raw"), read_only=False)
    conforms("Drive", body)
    assert body["cache_type"] in ("Unsafe", "Writeback") and body["io_engine"] in ("Sync", "Async")
    assert body["is_root_device"] is False  # our initramfs mounts the root disk


def test_network_interface_and_mac() -> None:
    mac = payloads.guest_mac("vm-1")
    assert mac == payloads.guest_mac("vm-1") and mac != payloads.guest_mac("vm-2")
    first = int(mac.split(":")[0], 16)
    assert first & 0b10 and not first & 0b1  # locally administered, unicast
    conforms("NetworkInterface", payloads.network_interface("eth0", "tap0", mac))


def test_actions() -> None:
    for a in ("InstanceStart", "SendCtrlAltDel"):
        conforms("InstanceActionInfo", payloads.action(a))
    with pytest.raises(ValueError):
        payloads.action("Reboot")


def test_boot_sequence_order_and_schema() -> None:
    calls = payloads.boot_sequence(
        vm_id="v", cpu=1, memory_mb=512, vmlinux=Path("/k/vmlinux"), initrd=Path("/k/i"),
        disk=Path("/d/disk.raw"), config_drive=Path("/r/config.tar"), tap="tap0",
    )
    assert [c.path for c in calls] == [
        "/machine-config", "/boot-source", "/drives/root", "/drives/config", "/network-interfaces/eth0", "/actions"]
    assert all(c.method == "PUT" for c in calls)
    for c in calls:
        definition = next(v for k, v in PATH_SCHEMA.items() if c.path.startswith(k))
        conforms(definition, c.body)
        if c.path.startswith("/drives/"):
            assert c.body["drive_id"] == c.path.rsplit("/", 1)[1]  # path id must equal body id
    assert calls[-1].body == {"action_type": "InstanceStart"}


def test_jailer_argv() -> None:
    argv = payloads.jailer_argv("/usr/bin/jailer", "/usr/bin/firecracker", "vm_1", Path("/srv/jail"),
                                Path("/run/netns/ussy-x"))
    assert argv[argv.index("--id") + 1] == "ussy-vm-1"
    assert argv[argv.index("--netns") + 1] == "/run/netns/ussy-x"
    assert argv[argv.index("--") + 1:] == ["--api-sock", "/run/firecracker.socket"]
    assert payloads.jail_root(Path("/srv/jail"), "/usr/bin/firecracker", "vm_1") == Path(
        "/srv/jail/firecracker/ussy-vm-1/root")
    assert len(payloads.jail_id("x" * 100)) == 64


def test_tap_argvs_stay_in_the_namespace() -> None:
    for argv in tap_argvs("ussy-abc"):
        assert argv[:3] == ["ip", "-n", "ussy-abc"]


async def test_api_client_sends_payloads_and_reports_faults() -> None:
    seen: list[tuple[str, str, dict[str, object]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content or b"{}")
        seen.append((request.method, request.url.path, body))
        if request.url.path == "/boot-source":
            return httpx.Response(400, json={"fault_message": "Kernel image path does not exist"})
        return httpx.Response(204)

    api = FirecrackerApi(Path("/nonexistent.sock"), transport=httpx.MockTransport(handler))
    await api.call(payloads.ApiCall("PUT", "/machine-config", payloads.machine_config(1, 256)))
    with pytest.raises(RuntimeFailure, match="Kernel image path does not exist") as info:
        await api.call(payloads.ApiCall("PUT", "/boot-source", payloads.boot_source(Path("/k"), Path("/i"), "")))
    assert "/boot-source" in info.value.evidence
    assert seen[0] == ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 256, "smt": False})


def test_check_says_why_firecracker_cannot_run() -> None:
    reason = firecracker_reason("firecracker-definitely-not-installed")
    assert reason is not None and "not installed" in reason
    check = FirecrackerRuntime.check()
    if not check.ok:
        assert check.reason


async def test_start_refuses_with_the_reason(tmp_path: Path) -> None:
    from ussycode.types import VmSpec

    rt = FirecrackerRuntime(tmp_path, images=None, binary="firecracker-definitely-not-installed",
                            run_dir=tmp_path / "run")
    spec = VmSpec(id="f1", name="fc", image="i", cpu=1, memory_mb=256, disk_gb=1)
    with pytest.raises(RuntimeFailure, match="not installed"):
        await rt.start(spec)
    await rt.close()
