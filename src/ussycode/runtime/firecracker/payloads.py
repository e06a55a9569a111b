"""Pure builders for Firecracker's HTTP API (``src/firecracker/swagger/firecracker.yaml``) and its command lines.

Field names and limits follow the swagger definitions: ``MachineConfiguration`` (vcpu_count 1–32, 1 or even
with SMT; mem_size_mib required), ``BootSource`` (kernel_image_path required; boot_args, initrd_path),
``Drive`` (drive_id and is_root_device required; path_on_host, is_read_only, cache_type Unsafe|Writeback,
io_engine Sync|Async), ``NetworkInterface`` (iface_id and host_dev_name required; guest_mac),
``InstanceActionInfo`` (action_type InstanceStart|SendCtrlAltDel|FlushMetrics).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ussycode.runtime.qemu.argv import kernel_cmdline

MAX_VCPUS = 32
GUEST_MAC_PREFIX = "06:00"


@dataclass(frozen=True)
class ApiCall:
    method: str
    path: str
    body: dict[str, Any]


def machine_config(cpu: int, memory_mb: int, *, smt: bool = False) -> dict[str, Any]:
    """``PUT /machine-config`` body.

    :raise ValueError: outside what the schema allows.
    """
    if not 1 <= cpu <= MAX_VCPUS:
        raise ValueError(f"firecracker supports 1 to {MAX_VCPUS} vCPUs, not {cpu}")
    if smt and cpu != 1 and cpu % 2:
        raise ValueError("with SMT the vCPU count must be 1 or even")
    if memory_mb < 128:
        raise ValueError(f"memory must be at least 128 MiB, not {memory_mb}")
    return {"vcpu_count": cpu, "mem_size_mib": memory_mb, "smt": smt}


def boot_args(extra: tuple[str, ...] = ()) -> str:
    """The guest command line: ours, with Firecracker's serial console and no PCI (virtio-mmio devices)."""
    return kernel_cmdline(("pci=off", *extra), console="ttyS0").replace("reboot=t", "reboot=k")


def boot_source(kernel: Path, initrd: Path, args: str) -> dict[str, Any]:
    """``PUT /boot-source`` body (``kernel`` is the uncompressed ELF vmlinux)."""
    return {"kernel_image_path": str(kernel), "initrd_path": str(initrd), "boot_args": args}


def drive(drive_id: str, path: Path, *, read_only: bool, root: bool = False) -> dict[str, Any]:
    """``PUT /drives/{drive_id}`` body. Our initramfs mounts the root itself, so no drive is the root device."""
    return {
        "drive_id": drive_id,
        "path_on_host": str(path),
        "is_root_device": root,
        "is_read_only": read_only,
        "cache_type": "Writeback",
        "io_engine": "Sync",
    }


def guest_mac(vm_id: str) -> str:
    """A stable, locally administered unicast MAC for the VM."""
    digest = hashlib.sha256(vm_id.encode()).digest()
    return GUEST_MAC_PREFIX + "".join(f":{b:02x}" for b in digest[:4])


def network_interface(iface_id: str, tap: str, mac: str) -> dict[str, Any]:
    """``PUT /network-interfaces/{iface_id}`` body."""
    return {"iface_id": iface_id, "host_dev_name": tap, "guest_mac": mac}


def action(action_type: str) -> dict[str, Any]:
    if action_type not in ("InstanceStart", "SendCtrlAltDel", "FlushMetrics"):
        raise ValueError(f"unknown Firecracker action {action_type}")
    return {"action_type": action_type}


def boot_sequence(
    *,
    vm_id: str,
    cpu: int,
    memory_mb: int,
    vmlinux: Path,
    initrd: Path,
    disk: Path,
    config_drive: Path,
    tap: str,
) -> list[ApiCall]:
    """Every API call, in order, that configures and starts one VM (the root disk is attached first: vda)."""
    return [
        ApiCall("PUT", "/machine-config", machine_config(cpu, memory_mb)),
        ApiCall("PUT", "/boot-source", boot_source(vmlinux, initrd, boot_args())),
        ApiCall("PUT", "/drives/root", drive("root", disk, read_only=False)),
        ApiCall("PUT", "/drives/config", drive("config", config_drive, read_only=True)),
        ApiCall("PUT", "/network-interfaces/eth0", network_interface("eth0", tap, guest_mac(vm_id))),
        ApiCall("PUT", "/actions", action("InstanceStart")),
    ]


def firecracker_argv(binary: str, api_socket: Path, vm_id: str) -> list[str]:
    return [binary, "--api-sock", str(api_socket), "--id", jail_id(vm_id)]


def jail_id(vm_id: str) -> str:
    """Jailer ids are limited to 64 alphanumerics and hyphens."""
    clean = "".join(c if c.isalnum() or c == "-" else "-" for c in vm_id)
    return f"ussy-{clean}"[:64]


def jailer_argv(
    jailer: str, firecracker: str, vm_id: str, chroot_base: Path, netns_path: Path, uid: int = 0, gid: int = 0
) -> list[str]:
    """The jailer: chroot, own network namespace, cgroups and privileges dropped before Firecracker runs.

    Firecracker then creates its API socket at ``<chroot_base>/firecracker/<id>/root/run/firecracker.socket``.
    """
    return [
        jailer,
        "--id", jail_id(vm_id),
        "--exec-file", firecracker,
        "--uid", str(uid),
        "--gid", str(gid),
        "--chroot-base-dir", str(chroot_base),
        "--netns", str(netns_path),
        "--new-pid-ns",
        "--",
        "--api-sock", "/run/firecracker.socket",
    ]


def jail_root(chroot_base: Path, firecracker: str, vm_id: str) -> Path:
    return chroot_base / Path(firecracker).name / jail_id(vm_id) / "root"
