"""Image tree → ext4 base → per-VM qcow2 disk (the disks of the qemu and firecracker runtimes).

The image is the same directory tree the container runtime uses. :func:`ensure_base_ext4` turns it into one
read-only ext4 file per image digest (``mkfs.ext4 -d``, no mount, no root-only tricks), cached next to the other
VM artefacts. Each VM disk is a qcow2 overlay whose backing file is that base: creating one copies nothing, and
its virtual size is the VM's disk size (the guest grows the file system on boot).

``copy_disk`` makes an independent disk without copying unchanged blocks: it copies only the source's top layer
(its qcow2 file: the blocks the VM itself wrote), which keeps the *same* immutable base as backing file.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ussycode.errors import ImageError, RuntimeFailure
from ussycode.runtime.proc import run as run_command

# Room for the base image's own metadata and a little free space; the VM disk gives the real size.
_BASE_SLACK = 1.25
_BASE_MIN_MB = 256


@dataclass(frozen=True)
class ImageRef:
    """A built image as the VM runtimes need it: its tree and a digest that names the tree's contents."""

    name: str
    digest: str
    rootfs: Path


def mkfs_argv(tree: Path, out: Path, size_mb: int, label: str = "ussyroot") -> list[str]:
    """``mkfs.ext4`` filling ``out`` from ``tree`` (pure)."""
    return [
        "mkfs.ext4", "-q", "-F", "-L", label, "-d", str(tree),
        "-E", "root_owner=0:0", "-m", "0", str(out), f"{size_mb}M",
    ]


def qcow2_overlay_argv(base: Path, out: Path, size_gb: int) -> list[str]:
    """``qemu-img create`` of a copy-on-write disk backed by ``base`` (pure)."""
    return ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(out), f"{size_gb}G"]


def tree_size_mb(tree: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(tree):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size + 4096
            except OSError:
                pass
    return max(_BASE_MIN_MB, int(total / 2**20 * _BASE_SLACK) + 64)


async def _run(argv: list[str], what: str, timeout: float = 900.0) -> str:
    done = await run_command(argv, timeout=timeout, what=what)
    text = done.output
    if done.returncode != 0:
        raise RuntimeFailure(
            f"{what} failed", evidence=f"$ {' '.join(argv)}\n{text[-2000:]}", reason="disk"
        )
    return text


async def ensure_base_ext4(image: ImageRef, cache_dir: Path) -> Path:
    """The read-only ext4 base for ``image`` (built once per digest).

    :raise ImageError: the image tree is missing or mkfs failed.
    """
    out = cache_dir / f"{image.name}-{image.digest}.ext4"
    if out.exists():
        return out
    if not (image.rootfs / "etc").is_dir():
        raise ImageError(
            f"image {image.name} has no root file system at {image.rootfs}",
            log_message="rebuild it: ussycode image build",
            reason="image_missing",
        )
    os.makedirs(cache_dir, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    size = await asyncio.to_thread(tree_size_mb, image.rootfs)
    try:
        await _run(mkfs_argv(image.rootfs, tmp, size), f"making the ext4 base of image {image.name}")
        tmp.chmod(0o444)
        os.replace(tmp, out)
    except RuntimeFailure as exc:
        tmp.unlink(missing_ok=True)
        raise ImageError(exc.user_message, evidence=exc.evidence, reason="image_build") from exc
    return out


async def create_disk(base: Path, disk: Path, size_gb: int) -> None:
    """A new VM disk: a qcow2 overlay on ``base`` of ``size_gb`` (no data copied)."""
    os.makedirs(disk.parent, exist_ok=True)
    base_bytes = os.stat(base).st_size
    if size_gb * 2**30 < base_bytes:
        raise ImageError(
            f"disk size {size_gb} GB is smaller than the image ({base_bytes / 2**30:.1f} GB)", reason="disk_size"
        )
    await _run(qcow2_overlay_argv(base, disk, size_gb), "creating the VM disk")


async def disk_info(disk: Path) -> dict[str, object]:
    text = await _run(["qemu-img", "info", "--output=json", "-U", str(disk)], "reading the VM disk")
    info: dict[str, object] = json.loads(text)
    return info


async def check_disk(disk: Path) -> None:
    """:raise RuntimeFailure: the qcow2 or its backing file is unreadable (a corrupt or missing image)."""
    info = await disk_info(disk)
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if isinstance(backing, str) and not os.access(backing, os.F_OK):
        raise ImageError(f"the disk's image {backing} is missing", reason="image_missing")
    await _run(["qemu-img", "check", "-q", "-U", str(disk)], "checking the VM disk")


async def copy_disk(src: Path, dst: Path) -> None:
    """An independent copy of ``src`` sharing its immutable base: only the source's own layer is copied.

    A VM disk's qcow2 file *is* its top layer (the clusters the VM wrote, plus metadata) over the shared,
    read-only base, so a sparse copy of that one file is a complete, independent disk and unchanged image
    blocks are never copied. The copy is checked before it replaces ``dst``.
    """
    await check_disk(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    try:
        await _run(["cp", "--sparse=always", "--reflink=auto", str(src), str(tmp)], "copying the VM disk")
        await check_disk(tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def allocated_bytes(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


async def resize_disk(disk: Path, size_gb: int) -> None:
    """Grow a VM disk to ``size_gb`` (the guest grows its file system at the next boot)."""
    await _run(["qemu-img", "resize", "-q", "-f", "qcow2", str(disk), f"{size_gb}G"], "growing the VM disk")
