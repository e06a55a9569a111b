"""The guest kernel and the initramfs ussycode builds for it (shared by the qemu and firecracker runtimes).

Debian's cloud kernel has virtio as modules, so a guest needs an initramfs. Ours is tiny and made here, not by
initramfs-tools: busybox-static, the virtio/ACPI modules resolved from ``modules.dep``, ``resize2fs`` with its
libraries, and two scripts from ``runtime/guest``: ``vm-initramfs-init`` (loads modules, configures the network,
grows and mounts the root disk, unpacks the config drive) and ``vm-init`` (PID 1 after ``switch_root``: applies
the spec, starts sshd, powers off on the ACPI button or Ctrl-Alt-Del).

Pure parts (module resolution, the file list, the cpio writer, vmlinux extraction) are separate from
:func:`build_initramfs`, which only reads host files and writes one cached file named by the digest of its inputs.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import os
import re
import shutil
import stat
import subprocess
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lz4.block
import zstandard

from ussycode.errors import ImageError

GUEST_DIR = Path(__file__).parent / "guest"

# Modules the guest needs, by name; their dependencies come from modules.dep.
GUEST_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "button",
    "evdev",
    "qemu_fw_cfg",
    "virtio_rng",
)
# Host programs copied into the initramfs with the shared libraries they link against.
HOST_PROGRAMS: tuple[str, ...] = ("/sbin/resize2fs",)


@dataclass(frozen=True)
class GuestKernel:
    vmlinuz: Path
    release: str
    modules_dir: Path


def find_kernel(boot_dir: Path = Path("/boot"), modules_root: Path = Path("/lib/modules")) -> GuestKernel:
    """The newest kernel in ``boot_dir`` whose modules are installed (cloud kernels preferred).

    :raise ImageError: no usable kernel, with what to install.
    """
    candidates: list[GuestKernel] = []
    for vmlinuz in boot_dir.glob("vmlinuz-*"):
        release = vmlinuz.name.removeprefix("vmlinuz-")
        modules_dir = modules_root / release
        if (modules_dir / "modules.dep").is_file() and os.access(vmlinuz, os.R_OK):
            candidates.append(GuestKernel(vmlinuz, release, modules_dir))
    if not candidates:
        raise ImageError(
            f"no guest kernel with modules under {boot_dir}",
            log_message="install one: apt-get install linux-image-cloud-amd64",
            reason="kernel_missing",
        )
    candidates.sort(key=lambda k: ("cloud" in k.release, _version_key(k.release)))
    return candidates[-1]


def _version_key(release: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", release))


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """``modules.dep`` → {relative path: [dependency paths]}."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[path.strip()] = rest.split()
    return deps


def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def resolve_modules(deps: dict[str, list[str]], wanted: Iterable[str]) -> list[str]:
    """Module paths to load, dependencies before dependants, each once. Built-in (absent) names are skipped."""
    by_name = {module_name(path): path for path in deps}
    order: list[str] = []

    def visit(path: str, stack: tuple[str, ...]) -> None:
        if path in order or path in stack:
            return
        for dep in deps.get(path, []):
            visit(dep, (*stack, path))
        order.append(path)

    for name in wanted:
        path = by_name.get(name.replace("-", "_"))
        if path is not None:
            visit(path, ())
    return order


@dataclass(frozen=True)
class CpioEntry:
    """One initramfs member: a directory, a regular file (``source`` or ``data``) or a symlink (``target``)."""

    path: str
    mode: int
    source: Path | None = None
    data: bytes | None = None
    target: str | None = None


def initramfs_entries(
    busybox: Path,
    modules_dir: Path,
    modules: Sequence[str],
    programs: Sequence[tuple[Path, Sequence[Path]]],
    guest_dir: Path = GUEST_DIR,
) -> list[CpioEntry]:
    """The initramfs file list (pure: no file is read). ``programs`` = [(binary, [its shared libraries])]."""
    entries: list[CpioEntry] = []
    dirs: set[str] = set()

    def add_dir(path: str) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in dirs:
                dirs.add(d)
                entries.append(CpioEntry(d, stat.S_IFDIR | 0o755))

    for d in ("bin", "sbin", "dev", "proc", "sys", "newroot", "etc", "lib/modules", "run", "tmp"):
        add_dir(d)
    entries.append(CpioEntry("bin/busybox", stat.S_IFREG | 0o755, source=busybox))
    entries.append(CpioEntry("bin/sh", stat.S_IFLNK | 0o777, target="busybox"))
    entries.append(CpioEntry("etc/mtab", stat.S_IFLNK | 0o777, target="/proc/mounts"))
    entries.append(CpioEntry("init", stat.S_IFREG | 0o755, source=guest_dir / "vm-initramfs-init"))
    entries.append(CpioEntry("vm-init", stat.S_IFREG | 0o755, source=guest_dir / "vm-init"))
    names = []
    for rel in modules:
        name = rel.rsplit("/", 1)[-1]
        names.append(name)
        entries.append(CpioEntry(f"lib/modules/{name}", stat.S_IFREG | 0o644, source=modules_dir / rel))
    entries.append(CpioEntry("lib/modules/order", stat.S_IFREG | 0o644, data="".join(f"{n}\n" for n in names).encode()))
    seen: set[str] = set()
    for binary, libs in programs:
        for path in (binary, *libs):
            rel = str(path).lstrip("/")
            if rel in seen:
                continue
            seen.add(rel)
            add_dir(rel.rsplit("/", 1)[0])
            entries.append(CpioEntry(rel, stat.S_IFREG | 0o755, source=path))
    return entries


def write_newc(entries: Iterable[CpioEntry], read: Callable[[Path], bytes] | None = None) -> bytes:
    """Serialise entries as a ``newc`` cpio archive (what the kernel unpacks as initramfs). Owned by root."""
    reader = read or (lambda p: p.read_bytes())
    out = bytearray()
    ino = 1
    for entry in entries:
        if entry.target is not None:
            body = entry.target.encode()
        elif entry.data is not None:
            body = entry.data
        elif entry.source is not None:
            body = reader(entry.source)
        else:
            body = b""
        _cpio_member(out, entry.path, entry.mode, body, ino)
        ino += 1
    _cpio_member(out, "TRAILER!!!", 0, b"", 0)
    out += b"\0" * (-len(out) % 512)
    return bytes(out)


def _cpio_member(out: bytearray, name: str, mode: int, body: bytes, ino: int) -> None:
    namez = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(body), 0, 0, 0, 0, len(namez), 0)
    out += b"070701" + b"".join(f"{f:08X}".encode() for f in fields)
    out += namez
    out += b"\0" * (-len(out) % 4)
    out += body
    out += b"\0" * (-len(out) % 4)


def shared_libraries(binary: Path) -> list[Path]:
    """The shared libraries ``binary`` loads (from ``ldd``), the dynamic loader included."""
    result = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False, timeout=30)
    libs: list[Path] = []
    for line in result.stdout.splitlines():
        match = re.search(r"(/\S+)\s+\(0x", line)
        if match:
            libs.append(Path(match.group(1)))
    return libs


def build_initramfs(cache_dir: Path, kernel: GuestKernel | None = None, busybox: Path | None = None) -> Path:
    """Build (or reuse) the initramfs for ``kernel``; returns its path under ``cache_dir``.

    :raise ImageError: busybox-static or the kernel is missing.
    """
    kernel = kernel or find_kernel()
    busybox = busybox or _find_busybox()
    deps = parse_modules_dep((kernel.modules_dir / "modules.dep").read_text())
    modules = resolve_modules(deps, GUEST_MODULES)
    programs = [(Path(p), shared_libraries(Path(p))) for p in HOST_PROGRAMS if Path(p).exists()]
    entries = initramfs_entries(busybox, kernel.modules_dir, modules, programs)
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(entry.path.encode() + b"\0" + str(entry.mode).encode())
        if entry.source is not None:
            st = entry.source.stat()
            digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            if entry.source.parent == GUEST_DIR:
                digest.update(entry.source.read_bytes())
        digest.update(entry.data or b"")
        digest.update((entry.target or "").encode())
    out = cache_dir / f"initramfs-{kernel.release}-{digest.hexdigest()[:16]}.cpio"
    if out.exists():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(write_newc(entries))
    os.replace(tmp, out)
    return out


def _find_busybox() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.exists():
            out = subprocess.run(["ldd", candidate], capture_output=True, text=True, check=False, timeout=30)
            if "not a dynamic executable" in out.stdout + out.stderr:
                return path
    found = shutil.which("busybox")
    raise ImageError(
        "the guest initramfs needs a static busybox",
        log_message=f"found {found or 'none'}; install it: apt-get install busybox-static",
        reason="busybox_missing",
    )


# --- vmlinux extraction (Firecracker boots an uncompressed ELF kernel) -------------------------------------

_ELF_MAGIC = b"\x7fELF"
_LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
_LZ4_LEGACY_BLOCK = 8 << 20
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The ELF kernel inside a bzImage, like the kernel's ``scripts/extract-vmlinux``.

    Tries every known compression header at every offset where it appears (gzip, xz, lzma, lz4 legacy, zstd,
    bzip2) and
    returns the first decompressed payload that is an ELF file.

    :raise ImageError: none of them yields an ELF image.
    """
    if vmlinuz.startswith(_ELF_MAGIC):
        return vmlinuz
    decoders = (
        (b"\x1f\x8b\x08", _gunzip),
        (b"\xfd7zXZ\x00", lambda d: lzma.decompress(d, format=lzma.FORMAT_XZ)),
        (b"\x5d\x00\x00\x00", lambda d: lzma.decompress(d, format=lzma.FORMAT_ALONE)),
        (_LZ4_LEGACY_MAGIC, lz4_legacy_decompress),
        (_ZSTD_MAGIC, zstd_decompress),
        (b"BZh", bz2.decompress),
    )
    for magic, decode in decoders:
        start = vmlinuz.find(magic)
        while start != -1:
            try:
                payload = decode(vmlinuz[start:])
            except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error, IndexError, zstandard.ZstdError):
                payload = b""
            if payload.startswith(_ELF_MAGIC):
                return payload
            start = vmlinuz.find(magic, start + 1)
    raise ImageError("could not find an ELF kernel inside the compressed kernel image", reason="kernel_format")


def _gunzip(data: bytes) -> bytes:
    decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
    return decomp.decompress(data)


def lz4_legacy_decompress(data: bytes) -> bytes:
    """Decode an LZ4 "legacy" frame (what the kernel's ``KERNEL_LZ4`` uses): blocks of at most 8 MiB, each
    decoded by the ``lz4`` library. Stops at the first block header that cannot be a block (the kernel appends
    its size after the frame)."""
    if not data.startswith(_LZ4_LEGACY_MAGIC):
        raise ValueError("not an lz4 legacy frame")
    pos = 4
    out = bytearray()
    while pos + 4 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "little")
        if size == int.from_bytes(_LZ4_LEGACY_MAGIC, "little") or size == 0 or pos + 4 + size > len(data):
            break
        if size > _LZ4_LEGACY_BLOCK + (8 << 12):
            break
        try:
            out += lz4.block.decompress(data[pos + 4 : pos + 4 + size], uncompressed_size=_LZ4_LEGACY_BLOCK)
        except lz4.block.LZ4BlockError as exc:
            raise ValueError(f"lz4: {exc}") from None
        pos += 4 + size
    return bytes(out)


def zstd_decompress(data: bytes) -> bytes:
    """Decode one zstd frame (the kernel's ``KERNEL_ZSTD``), ignoring what follows it."""
    return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(data))


def build_vmlinux(cache_dir: Path, kernel: GuestKernel | None = None) -> Path:
    """Extract (or reuse) the uncompressed kernel for Firecracker."""
    kernel = kernel or find_kernel()
    out = cache_dir / f"vmlinux-{kernel.release}"
    if out.exists():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(extract_vmlinux(kernel.vmlinuz.read_bytes()))
    os.replace(tmp, out)
    return out


__all__ = [
    "GUEST_MODULES",
    "CpioEntry",
    "GuestKernel",
    "build_initramfs",
    "build_vmlinux",
    "extract_vmlinux",
    "find_kernel",
    "initramfs_entries",
    "lz4_legacy_decompress",
    "zstd_decompress",
    "parse_modules_dep",
    "resolve_modules",
    "write_newc",
]
