"""Pure builders of the VM runtimes: QEMU argv, kernel cmdline, initramfs contents, cpio, modules, config drive."""

from __future__ import annotations

import io
import stat
import tarfile
from pathlib import Path

import pytest

from ussycode.runtime import kernel, rootfs
from ussycode.runtime.kvm import probe_argv
from ussycode.runtime.qemu.argv import (
    TCG_TB_SIZE_MB,
    Accel,
    Machine,
    QemuConfig,
    build_argv,
    kernel_cmdline,
    netdev_arg,
    validate,
)
from ussycode.runtime.qemu.runtime import config_drive, exit_code
from ussycode.types import VmSpec


def cfg(**kw: object) -> QemuConfig:
    base: dict[str, object] = dict(
        vm_id="vm1", cpu=2, memory_mb=1024, kernel=Path("/k/vmlinuz"), initrd=Path("/k/initrd"),
        disk=Path("/d/disk.qcow2"), config_drive=Path("/r/config.tar"), console_log=Path("/d/console.log"),
        qmp_socket=Path("/r/qmp.sock"), pidfile=Path("/r/qemu.pid"),
    )
    base.update(kw)
    return QemuConfig(**base)  # type: ignore[arg-type]


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_argv_q35_tcg() -> None:
    argv = build_argv(cfg())
    assert argv[0] == "qemu-system-x86_64"
    assert opt(argv, "-machine") == ["q35,smm=off,vmport=off"]
    # A bounded translation cache: QEMU's 1 GiB default kept ~100 MiB of it resident per VM (see TCG_TB_SIZE_MB).
    assert opt(argv, "-accel") == [f"tcg,tb-size={TCG_TB_SIZE_MB}"] and TCG_TB_SIZE_MB <= 32
    assert opt(build_argv(cfg(tb_size_mb=64)), "-accel") == ["tcg,tb-size=64"]
    assert opt(argv, "-cpu") == ["max"]
    assert opt(argv, "-smp") == ["2"] and opt(argv, "-m") == ["1024M"]
    assert opt(argv, "-name") == ["ussy-vm1,debug-threads=on"]  # how status() recognises its process
    assert "-no-reboot" in argv and "-nodefaults" in argv and "-daemonize" in argv
    assert opt(argv, "-qmp") == ["unix:/r/qmp.sock,server=on,wait=off"]
    assert opt(argv, "-pidfile") == ["/r/qemu.pid"]
    drives = opt(argv, "-drive")
    assert drives[0].startswith("file=/d/disk.qcow2,if=none,id=root,format=qcow2")
    assert "readonly=on" in drives[1] and "format=raw" in drives[1]
    assert "virtio-blk-pci,drive=root,serial=ussyroot" in opt(argv, "-device")
    assert opt(argv, "-chardev") == ["file,id=console,path=/d/console.log"]


def test_argv_kvm_and_microvm() -> None:
    argv = build_argv(cfg(accel=Accel.KVM, machine=Machine.MICROVM, daemonize=False))
    assert opt(argv, "-cpu") == ["host"]
    assert opt(argv, "-machine")[0].startswith("microvm,") and "accel" not in opt(argv, "-machine")[0]
    assert opt(argv, "-accel") == ["kvm"]  # no TCG options under KVM
    assert "virtio-blk-device,drive=root,serial=ussyroot" in opt(argv, "-device")
    assert "-daemonize" not in argv


def test_netdev_forwards_only_to_namespace_loopback() -> None:
    arg = netdev_arg((22, 8080))
    assert arg.startswith("user,id=net0,")
    assert "hostfwd=tcp:127.0.0.1:22-:22" in arg and "hostfwd=tcp:127.0.0.1:8080-:8080" in arg
    assert "ipv6=off" in arg
    assert "hostfwd=tcp::" not in arg and "0.0.0.0" not in arg  # never all interfaces


@pytest.mark.parametrize(("cpu", "mem", "word"), [(0, 512, "cpu"), (65, 512, "cpu"), (1, 64, "memory")])
def test_invalid_sizes(cpu: int, mem: int, word: str) -> None:
    problem = validate(cpu, mem)
    assert problem is not None and word in problem
    with pytest.raises(ValueError, match=word):
        build_argv(cfg(cpu=cpu, memory_mb=mem))
    assert validate(1, 128) is None


def test_kernel_cmdline() -> None:
    line = kernel_cmdline(("quiet",))
    parts = line.split()
    assert parts[0] == "console=ttyS0"
    assert "rdinit=/init" in parts and "panic=-1" in parts
    assert "ussycode.root=ussyroot" in parts and "ussycode.config=ussycfg" in parts
    assert "ussycode.net=10.0.2.15/24,10.0.2.2" in parts
    assert parts[-1] == "quiet"


def test_probe_argv_boots_to_probe_mode() -> None:
    argv = probe_argv("qemu-system-x86_64", Path("/k"), Path("/i"), "kvm")
    assert "q35,accel=kvm" in argv and "host" in argv
    assert "ussycode.probe=1" in argv[argv.index("-append") + 1]


DEP = """kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/acpi/button.ko:
"""
V = "kernel/drivers/virtio/"
DEP += f"{V}virtio_pci.ko: {V}virtio_pci_modern_dev.ko {V}virtio.ko {V}virtio_ring.ko\n"
N = "kernel/drivers/net/"
DEP += f"{N}virtio_net.ko: {N}net_failover.ko kernel/net/core/failover.ko {V}virtio.ko\n"


def test_resolve_modules_orders_dependencies_first_once() -> None:
    order = kernel.resolve_modules(kernel.parse_modules_dep(DEP), ["virtio_pci", "virtio_blk", "virtio_net", "ext4"])
    names = [kernel.module_name(p) for p in order]
    assert names.count("virtio") == 1 and names.count("failover") == 1
    for mod, deps in (("virtio_pci", ["virtio", "virtio_ring", "virtio_pci_modern_dev"]),
                      ("virtio_net", ["net_failover", "failover", "virtio"])):
        for dep in deps:
            assert names.index(dep) < names.index(mod)
    assert "ext4" not in names  # built in: nothing to load
    assert "button" not in names  # not asked for


def test_module_name_handles_compressed_and_dashes() -> None:
    assert kernel.module_name("a/b/virtio-pci.ko.xz") == "virtio_pci"
    assert kernel.module_name("x/ext4.ko") == "ext4"


def test_initramfs_entries() -> None:
    entries = kernel.initramfs_entries(
        Path("/bin/busybox"), Path("/lib/modules/r"),
        ["kernel/drivers/virtio/virtio.ko", "kernel/drivers/block/virtio_blk.ko"],
        [(Path("/sbin/resize2fs"), [Path("/lib/x86_64-linux-gnu/libext2fs.so.2"), Path("/lib64/ld-linux-x86-64.so.2")])],  # noqa: E501
    )
    by_path = {e.path: e for e in entries}
    assert by_path["init"].source == kernel.GUEST_DIR / "vm-initramfs-init"
    assert by_path["vm-init"].source == kernel.GUEST_DIR / "vm-init"
    assert by_path["bin/sh"].target == "busybox"
    assert by_path["lib/modules/order"].data == b"virtio.ko\nvirtio_blk.ko\n"
    assert by_path["lib/modules/virtio_blk.ko"].source == Path("/lib/modules/r/kernel/drivers/block/virtio_blk.ko")
    assert "sbin/resize2fs" in by_path and "lib64/ld-linux-x86-64.so.2" in by_path
    paths = [e.path for e in entries]
    for e in entries:  # every parent directory comes before its children
        parent = e.path.rsplit("/", 1)[0] if "/" in e.path else ""
        if parent:
            assert stat.S_ISDIR(by_path[parent].mode) and paths.index(parent) < paths.index(e.path)
    assert len(paths) == len(set(paths))


def test_guest_scripts_exist_and_are_executable() -> None:
    for name in ("vm-initramfs-init", "vm-init"):
        path = kernel.GUEST_DIR / name
        assert path.read_text().startswith("#!")
        assert path.stat().st_mode & 0o111


def test_write_newc_is_a_valid_cpio(tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"hello")
    data = kernel.write_newc([
        kernel.CpioEntry("d", stat.S_IFDIR | 0o755),
        kernel.CpioEntry("d/f", stat.S_IFREG | 0o644, source=src),
        kernel.CpioEntry("l", stat.S_IFLNK | 0o777, target="d/f"),
    ])
    assert data.startswith(b"070701") and len(data) % 512 == 0
    assert b"TRAILER!!!" in data
    import subprocess

    out = subprocess.run(["cpio", "-t", "-v"], input=data, capture_output=True, check=False)
    if out.returncode == 0:  # cpio(1) may be absent; the format checks above still ran
        listing = out.stdout.decode()
        assert "d/f" in listing and "l -> d/f" in listing


def test_lz4_legacy_roundtrip_with_overlapping_matches() -> None:
    import lz4.block

    data = b"ab" * 500 + b"Z" * 40  # matches that overlap what they copy (offsets 2 and 1)
    block = lz4.block.compress(data, store_size=False)
    frame = b"\x02\x21\x4c\x18" + len(block).to_bytes(4, "little") + block
    assert kernel.lz4_legacy_decompress(frame) == data
    with pytest.raises(ValueError, match="lz4"):
        kernel.lz4_legacy_decompress(b"\x02\x21\x4c\x18" + (5).to_bytes(4, "little") + b"\xff" * 5)


def test_lz4_legacy_frame_of_several_blocks_made_by_the_library() -> None:
    import lz4.block

    elf = b"\x7fELF" + bytes(range(256)) * 40000  # 10 MB: two blocks of at most 8 MiB
    chunks = [elf[i : i + (8 << 20)] for i in range(0, len(elf), 8 << 20)]
    frame = b"\x02\x21\x4c\x18"
    for chunk in chunks:
        block = lz4.block.compress(chunk, store_size=False)
        frame += len(block).to_bytes(4, "little") + block
    frame += len(elf).to_bytes(4, "little")  # the kernel appends the uncompressed size
    assert len(chunks) == 2 and kernel.lz4_legacy_decompress(frame) == elf
    assert kernel.extract_vmlinux(b"MZ stub" + frame) == elf


def test_extract_vmlinux_finds_zstd_and_bzip2_payloads() -> None:
    import bz2

    import zstandard

    elf = b"\x7fELF" + b"kernel" * 1000
    assert kernel.extract_vmlinux(b"MZ stub" + zstandard.ZstdCompressor().compress(elf) + b"size") == elf
    assert kernel.extract_vmlinux(b"MZ stub" + bz2.compress(elf)) == elf
    with pytest.raises(Exception, match="ELF"):
        kernel.extract_vmlinux(b"MZ stub" + zstandard.ZstdCompressor().compress(b"not a kernel"))


def test_extract_vmlinux_finds_gzip_payload() -> None:
    import gzip

    elf = b"\x7fELF" + b"\0" * 100
    blob = b"MZ boot stub \x1f\x8b\x08 not really" + gzip.compress(elf) + b"tail"
    assert kernel.extract_vmlinux(blob) == elf


def test_extract_vmlinux_of_this_hosts_kernel() -> None:
    try:
        guest = kernel.find_kernel()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no kernel: {exc}")
    vmlinux = kernel.extract_vmlinux(guest.vmlinuz.read_bytes())
    assert vmlinux[:4] == b"\x7fELF" and vmlinux[4] == 2  # 64-bit ELF


def test_config_drive_is_a_tar_with_quoted_env() -> None:
    spec = VmSpec(id="x", name="box", image="i", cpu=1, memory_mb=512, disk_gb=2,
                  env={"A": "it's $HOME", "bad-name": "x"}, authorized_keys=("ssh-ed25519 AAA user",))
    data = config_drive(spec, ("ssh-ed25519 BBB runtime",))
    assert len(data) % 512 == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        files = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert files["hostname"] == "box\n"
    assert files["authorized_keys"] == "ssh-ed25519 AAA user\nssh-ed25519 BBB runtime\n"
    assert "export A='it'\"'\"'s $HOME'" in files["env.sh"]
    assert "bad-name" not in files["env.sh"]
    assert files["vm-id"] == "x\n"  # the guest makes new host keys when a copied disk meets a new VM id


def test_vm_init_remakes_host_keys_for_a_copied_disk_and_prevents_thrashing() -> None:
    init = (kernel.GUEST_DIR / "vm-init").read_text()
    assert '"$CFG/vm-id"' in init and "keys-vm-id" in init
    assert "lru_gen/min_ttl_ms" in init  # the OOM killer acts before the guest thrashes


@pytest.mark.parametrize(
    ("status", "sig", "code"),
    [(0, None, 0), (1, None, 1), (None, None, 255), (-1, ("KILL", False, "", ""), 137),
     (-1, ("TERM", False, "", ""), 143), (-1, ("SIGSEGV", True, "", ""), 139), (-1, ("NOPE", False, "", ""), 255)],
)
def test_exec_exit_code_is_shell_style(status: int | None, sig: tuple[str, bool, str, str] | None, code: int) -> None:
    """A process killed by a signal (the guest's OOM killer) reads as 128 + n, as from the container runtime."""
    assert exit_code(status, sig) == code


def test_disk_argvs() -> None:
    assert rootfs.qcow2_overlay_argv(Path("/b.ext4"), Path("/d.qcow2"), 5) == [
        "qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/b.ext4", "/d.qcow2", "5G"]
    argv = rootfs.mkfs_argv(Path("/tree"), Path("/out.ext4"), 300)
    assert argv[0] == "mkfs.ext4" and argv[argv.index("-d") + 1] == "/tree" and argv[-1] == "300M"
