"""lxcfs: one host daemon that makes /proc/meminfo, cpuinfo, stat, uptime… show each container VM its own limits.

lxcfs (Debian's package, as LXD uses it) is a FUSE file system that answers a read from the reader's cgroups and
PID namespace. One daemon serves every VM: the container runtime binds ``<dir>/proc/<file>`` over the guest's
``/proc/<file>`` at boot. The runtime starts the daemon when it is not running (detached: VMs outlive the server,
and so must it) and ``ussycode doctor`` reports it. A host that runs Debian's ``lxcfs.service`` already has it at
``/var/lib/lxcfs``, which is used as is.

If the daemon dies, reads in VMs that booted with it fail (``ENOTCONN``) until they restart; it is started again
at the next VM start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ussycode.errors import RuntimeFailure

LXCFS_DIR = Path("/var/lib/lxcfs")
LOCK = Path("/run/ussycode-lxcfs.lock")
# What a VM sees through lxcfs: free/top (meminfo), nproc-aware tools (cpuinfo, stat), uptime, swaps, diskstats.
PROC_FILES = ("meminfo", "cpuinfo", "stat", "uptime", "swaps", "diskstats", "loadavg")


@dataclass(frozen=True)
class LxcfsStatus:
    ok: bool
    reason: str


def lxcfs_argv(directory: Path, pidfile: Path) -> list[str]:
    """The daemon's command line (pure): CPU view from the cgroup's quota, load average per container."""
    return ["lxcfs", "--foreground", "--enable-cfs", "--enable-loadavg", "-p", str(pidfile), str(directory)]


def mount_fstype(mountinfo: str, directory: Path) -> str | None:
    """The file-system type mounted at ``directory`` in a /proc/self/mountinfo text, or None (pure)."""
    found = None
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        fields = pre.split()
        if sep and len(fields) > 4 and fields[4].encode().decode("unicode_escape") == str(directory):
            found = post.split()[0]
    return found


def _mounted(directory: Path) -> str | None:
    with open("/proc/self/mountinfo") as f:
        return mount_fstype(f.read(), directory)


def status(directory: Path = LXCFS_DIR) -> LxcfsStatus:
    """Whether the daemon serves ``directory`` now (the doctor's line)."""
    if shutil.which("lxcfs") is None:
        return LxcfsStatus(False, "lxcfs is not installed (apt-get install lxcfs): VMs see the host's CPUs, "
                                  "memory and uptime")
    fstype = _mounted(directory)
    if fstype is None:
        return LxcfsStatus(False, f"lxcfs is installed but not running at {directory} (started with the first VM)")
    try:
        os.stat(directory / "proc" / "meminfo")
    except OSError as exc:
        return LxcfsStatus(False, f"lxcfs at {directory} does not answer ({exc.strerror})")
    return LxcfsStatus(True, f"lxcfs serves {directory} ({fstype})")


def available_files(directory: Path = LXCFS_DIR) -> tuple[str, ...]:
    return tuple(name for name in PROC_FILES if (directory / "proc" / name).exists())


def ensure(directory: Path = LXCFS_DIR, timeout: float = 10.0) -> tuple[str, ...]:
    """Start the daemon unless it already serves ``directory``; the /proc files it offers. Safe to race (lock)."""
    if status(directory).ok:
        return available_files(directory)
    if shutil.which("lxcfs") is None:
        raise RuntimeFailure("lxcfs is not installed (apt-get install lxcfs)")
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if status(directory).ok:
            return available_files(directory)
        if _mounted(directory) is not None:  # a dead daemon's mount: ENOTCONN on every read
            subprocess.run(["umount", "--lazy", str(directory)], capture_output=True, timeout=30)
        directory.mkdir(parents=True, exist_ok=True)
        pidfile = Path("/run") / ("ussycode-lxcfs" + str(directory).replace("/", "-") + ".pid")
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()
        binary = shutil.which("lxcfs") or "lxcfs"
        argv = lxcfs_argv(directory, pidfile)
        log = pidfile.with_suffix(".log")
        # Detached (``setsid --fork``: its own session, re-parented to init) so it outlives this server; its
        # output goes to a file, never to a pipe the daemon would keep open.
        with open(log, "ab") as out:
            subprocess.run(["setsid", "--fork", binary, *argv[1:]], stdin=subprocess.DEVNULL, stdout=out,
                           stderr=out, timeout=timeout, check=False)
        deadline = time.monotonic() + timeout
        while not status(directory).ok:
            if time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeFailure("lxcfs did not come up", evidence=f"$ {' '.join(argv)}\n{tail}")
            time.sleep(0.05)
    return available_files(directory)
