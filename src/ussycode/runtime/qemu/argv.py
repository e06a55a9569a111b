"""Pure builders: what QEMU is started with for one VM (no I/O here; unit-tested in tests/unit/runtime)."""

from __future__ import annotations

import enum
import shlex
from dataclasses import dataclass, field
from pathlib import Path

# The guest's user-mode network (QEMU's slirp). The host never routes to it: QEMU runs inside the VM's own
# network namespace and forwards guest ports to that namespace's loopback only.
GUEST_NET = "10.0.2.0/24"
GUEST_ADDR = "10.0.2.15/24"
GUEST_GW = "10.0.2.2"
GUEST_DNS = "10.0.2.3"
ROOT_SERIAL = "ussyroot"
CONFIG_SERIAL = "ussycfg"
MAX_CPUS = 64
MIN_MEMORY_MB = 128
MAX_MEMORY_MB = 1 << 20


class Machine(enum.StrEnum):
    Q35 = "q35"
    MICROVM = "microvm"


class Accel(enum.StrEnum):
    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True)
class QemuConfig:
    """Everything that decides QEMU's command line for one boot."""

    vm_id: str
    cpu: int
    memory_mb: int
    kernel: Path
    initrd: Path
    disk: Path
    config_drive: Path
    console_log: Path
    qmp_socket: Path
    pidfile: Path
    machine: Machine = Machine.Q35
    accel: Accel = Accel.TCG
    forwards: tuple[int, ...] = (22,)
    binary: str = "qemu-system-x86_64"
    daemonize: bool = True
    extra_cmdline: tuple[str, ...] = field(default_factory=tuple)


def validate(cpu: int, memory_mb: int) -> str | None:
    """Why these sizes cannot boot, or ``None``."""
    if not 1 <= cpu <= MAX_CPUS:
        return f"cpu must be between 1 and {MAX_CPUS}, not {cpu}"
    if not MIN_MEMORY_MB <= memory_mb <= MAX_MEMORY_MB:
        return f"memory must be between {MIN_MEMORY_MB} MB and {MAX_MEMORY_MB} MB, not {memory_mb} MB"
    return None


def kernel_cmdline(extra: tuple[str, ...] = (), *, console: str = "ttyS0") -> str:
    """The guest kernel command line (shared with firecracker): quiet boot, our initramfs, root by serial."""
    parts = [
        f"console={console}",
        "panic=-1",
        "reboot=t" if console == "ttyS0" else "reboot=k",
        "loglevel=4",
        "random.trust_cpu=on",
        "rdinit=/init",
        f"ussycode.root={ROOT_SERIAL}",
        f"ussycode.config={CONFIG_SERIAL}",
        f"ussycode.net={GUEST_ADDR},{GUEST_GW}",
        *extra,
    ]
    return " ".join(parts)


def hostfwd(port: int) -> str:
    """A slirp forward from the namespace's loopback to the same guest port."""
    return f"tcp:127.0.0.1:{port}-:{port}"


def netdev_arg(forwards: tuple[int, ...]) -> str:
    fwd = "".join(f",hostfwd={hostfwd(p)}" for p in forwards)
    return f"user,id=net0,net={GUEST_NET},host={GUEST_GW},dns={GUEST_DNS},ipv6=off{fwd}"


def build_argv(cfg: QemuConfig) -> list[str]:
    """QEMU's argv for ``cfg``.

    :raise ValueError: cpu or memory out of range.
    """
    problem = validate(cfg.cpu, cfg.memory_mb)
    if problem:
        raise ValueError(problem)
    micro = cfg.machine is Machine.MICROVM
    bus = "device" if micro else "pci"
    if micro:
        machine = f"microvm,accel={cfg.accel},pit=off,pic=off,isa-serial=on,rtc=on,acpi=on"
    else:
        machine = f"q35,accel={cfg.accel},smm=off,vmport=off"
    cpu_model = "host" if cfg.accel is Accel.KVM else "max"
    argv = [
        cfg.binary,
        "-name", f"ussy-{cfg.vm_id},debug-threads=on",
        "-machine", machine,
        "-cpu", cpu_model,
        "-smp", str(cfg.cpu),
        "-m", f"{cfg.memory_mb}M",
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        "-no-reboot",
        "-kernel", str(cfg.kernel),
        "-initrd", str(cfg.initrd),
        "-append", kernel_cmdline(cfg.extra_cmdline),
        "-chardev", f"file,id=console,path={cfg.console_log}",
        "-serial", "chardev:console",
        "-drive", f"file={cfg.disk},if=none,id=root,format=qcow2,discard=unmap,cache=writeback",
        "-device", f"virtio-blk-{bus},drive=root,serial={ROOT_SERIAL}",
        "-drive", f"file={cfg.config_drive},if=none,id=cfg,format=raw,readonly=on",
        "-device", f"virtio-blk-{bus},drive=cfg,serial={CONFIG_SERIAL}",
        "-netdev", netdev_arg(cfg.forwards),
        "-device", f"virtio-net-{bus},netdev=net0",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", f"virtio-rng-{bus},rng=rng0",
        "-qmp", f"unix:{cfg.qmp_socket},server=on,wait=off",
        "-pidfile", str(cfg.pidfile),
    ]
    if cfg.daemonize:
        argv.append("-daemonize")
    return argv


def format_argv(argv: list[str]) -> str:
    return shlex.join(argv)
