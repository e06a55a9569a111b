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
# TCG's translation-block cache (MiB). QEMU 7.2 reserves 1 GiB by default and every page of it the guest's code
# ever filled stays resident. bench_qemu_boot (512 MB guest, QEMU 7.2, 2 busy cores), host memory beyond guest RAM
# -> boot to SSH (restart median): default 145.5 MiB -> 10.1 s; 64: 121.3 MiB -> 8.2 s; 32: 86.4 MiB -> 10.1 s;
# 16: ~70 MiB -> 13 s and 8: ~62 MiB -> 29.5 s (one boot each: the cache thrashes). The other ~55 MiB is QEMU itself
# (binary and libraries, the kernel copy kept for fw_cfg, heap), not the cache.
TCG_TB_SIZE_MB = 32


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
    tb_size_mb: int | None = None  # None: TCG_TB_SIZE_MB (ignored under KVM)


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
        machine = "microvm,pit=off,pic=off,isa-serial=on,rtc=on,acpi=on"
    else:
        machine = "q35,smm=off,vmport=off"
    # -accel rather than -machine accel=: only -accel takes the accelerator's own options.
    accel = "kvm" if cfg.accel is Accel.KVM else f"tcg,tb-size={cfg.tb_size_mb or TCG_TB_SIZE_MB}"
    cpu_model = "host" if cfg.accel is Accel.KVM else "max"
    argv = [
        cfg.binary,
        "-name", f"ussy-{cfg.vm_id},debug-threads=on",
        "-machine", machine,
        "-accel", accel,
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
