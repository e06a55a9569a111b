"""VM disks: sparse ext4 image files, loop mounts and the overlay that puts a VM's writes on its own disk.

Layout of a mounted container VM (``run/<vm_id>/``)::

    disk/        the VM's ext4 disk (``disks/<vm_id>.ext4``) loop-mounted
    disk/upper   overlay upper layer: every file the VM wrote
    disk/work    overlay work directory
    root/        overlay of the image rootfs (read-only lower) and disk/upper: the VM's /

Builders are pure; the effectors are plain blocking calls (the runtime runs them in a thread).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

from ussycode.errors import RuntimeFailure

log = logging.getLogger(__name__)

GIB = 2**30


def mkfs_argv(path: Path, label: str = "ussycode") -> list[str]:
    # -m 0: no blocks reserved for root (the VM's user is root through sudo anyway).
    return ["mkfs.ext4", "-F", "-q", "-m", "0", "-L", label[:16], str(path)]


def loop_mount_argv(disk: Path, mountpoint: Path) -> list[str]:
    # discard: a deleted file's blocks are discarded at once; the loop device turns a discard into a hole punched
    # in the sparse image, so the host gets the space back.
    return ["mount", "-t", "ext4", "-o", "loop,noatime,discard", str(disk), str(mountpoint)]


def overlay_options(lower: Path, upper: Path, work: Path) -> str:
    """Overlay mount options (pure); rejects paths that would break the option syntax."""
    for path in (lower, upper, work):
        if any(ch in str(path) for ch in ",:\\\n"):
            raise RuntimeFailure(f"path {path} cannot be used in an overlay mount (contains , : or \\)")
    return f"lowerdir={lower},upperdir={upper},workdir={work}"


def overlay_mount_argv(lower: Path, upper: Path, work: Path, merged: Path) -> list[str]:
    return ["mount", "-t", "overlay", "overlay", "-o", overlay_options(lower, upper, work), str(merged)]


def parse_mountpoints(mountinfo: str) -> set[str]:
    """Mount points listed in a ``/proc/self/mountinfo`` text (pure; octal escapes decoded)."""
    points = set()
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            points.add(fields[4].encode().decode("unicode_escape"))
    return points


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return str(path) in parse_mountpoints(f.read())


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeFailure(
            f"{what} failed (exit {proc.returncode})",
            evidence=f"$ {' '.join(argv)}\n{proc.stderr.strip() or proc.stdout.strip()}",
        )


def create_disk(path: Path, size_gb: int) -> None:
    """A sparse file of exactly ``size_gb`` GiB with an ext4 filesystem on it. Fails if ``path`` exists."""
    if size_gb < 1:
        raise RuntimeFailure(f"disk size must be at least 1 GiB, not {size_gb}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size_gb * GIB)
    finally:
        os.close(fd)
    try:
        _run(mkfs_argv(path), "mkfs.ext4")
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def mount_disk(disk: Path, mountpoint: Path) -> None:
    """Loop-mount ``disk`` at ``mountpoint`` (idempotent). The loop device is freed on unmount (autoclear)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    if not is_mounted(mountpoint):
        _run(loop_mount_argv(disk, mountpoint), f"mounting disk {disk.name}")


def prepare_overlay_dirs(disk_mount: Path) -> None:
    """The overlay's upper and work directories at the top of a mounted disk (the guest never sees this level)."""
    (disk_mount / "upper").mkdir(mode=0o755, exist_ok=True)
    (disk_mount / "work").mkdir(mode=0o700, exist_ok=True)


def unmount(path: Path) -> None:
    """Unmount ``path`` if mounted; falls back to a lazy unmount when busy. Idempotent."""
    if not is_mounted(path):
        return
    proc = subprocess.run(["umount", str(path)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 and is_mounted(path):
        _run(["umount", "--lazy", str(path)], f"unmounting {path}")


def copy_disk(src: Path, dst: Path) -> None:
    """An independent copy of a disk image: reflinked where the filesystem can, sparse otherwise."""
    if dst.exists():
        raise RuntimeFailure(f"disk {dst} already exists")
    try:
        _run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)], "copying the disk")
    except BaseException:
        dst.unlink(missing_ok=True)
        raise


def allocated_bytes(path: Path) -> int:
    """Bytes the (sparse) file really occupies on the host."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (deepest first), from /proc/self/mountinfo (octal escapes undone)."""
    root = str(Path(path).resolve())
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) > 4:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if point == root or point.startswith(root + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path) -> bool:
    """Remove a directory tree, never what is mounted inside it: mounts below it (a VM's image and disk, a killed
    build's /dev/shm) are unmounted first, and if one stays the tree is left alone, as removing it would delete
    files through the mount. True when the tree is gone."""
    path = Path(path)
    if not path.exists():
        return True
    for point in mounts_under(path):
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False, timeout=60)
    left = mounts_under(path)
    if left:
        log.error("not removing %s: %s still mounted there", path, ", ".join(left[:3]))
        return False
    shutil.rmtree(path, ignore_errors=True)
    return not path.exists()
