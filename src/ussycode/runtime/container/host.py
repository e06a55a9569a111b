"""The host side of container VMs: whether this host can run them, and the host commands and process waits the
runtime's parts share (``ip``, ``nft``, ``fsfreeze``, reaping slirp4netns, waiting for an init to die)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from pathlib import Path

from ussycode.runtime import lxcfs
from ussycode.runtime.base import HostCheck
from ussycode.runtime.cgroups import detect_version
from ussycode.runtime.container.state import alive
from ussycode.runtime.proc import run as run_command
from ussycode.runtime.proc import run_sync as run_command_sync

log = logging.getLogger(__name__)


def host_check() -> HostCheck:
    """Whether this host can run container VMs, and what it lacks (``ContainerRuntime.check``)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root (mounts, namespaces, cgroups)")
    for tool in ("ip", "nft", "mkfs.ext4", "mount", "umount", "losetup"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is not installed")
    try:
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                problems.append("the kernel has no overlayfs")
    except OSError:
        problems.append("cannot read /proc/filesystems")
    if not os.path.exists("/dev/loop-control"):
        problems.append("no loop devices (/dev/loop-control)")
    if detect_version() is None:
        problems.append("no usable cgroup hierarchy (need v2, or v1 memory+cpu+pids)")
    if not os.path.exists("/proc/self/ns/net"):
        problems.append("no network namespaces")
    if not os.path.exists("/proc/self/ns/user"):
        problems.append("no user namespaces")
    if kernel_version() < (5, 19):
        problems.append("kernel older than 5.19 (needs id-mapped overlayfs layers)")
    try:
        from ussycode.runtime.container.seccomp import Filter

        Filter().release()
    except OSError as exc:
        problems.append(f"no seccomp filter: {exc}")
    if problems:
        return HostCheck(False, "; ".join(problems))
    egress = "slirp4netns egress" if shutil.which("slirp4netns") else "no egress (apt-get install slirp4netns)"
    return HostCheck(True, f"available ({egress}, cgroup {detect_version()}, user namespaces + seccomp; "
                           f"{lxcfs.status().reason})")


async def run(argv: list[str], what: str, stdin: str | None = None, timeout: float = 60.0) -> None:
    await run_command(argv, timeout=timeout, what=what, stdin=stdin.encode() if stdin is not None else None, check=True)


async def unfreeze(mnt: Path) -> None:
    done = await run_command(["fsfreeze", "--unfreeze", str(mnt)], timeout=30, what="unfreezing the source disk")
    if done.returncode != 0 and "Invalid argument" not in done.output:  # EINVAL: it was not frozen
        log.error("could not unfreeze %s: %s", mnt, done.output.strip())


def kernel_version() -> tuple[int, int]:
    try:
        major, minor = os.uname().release.split(".")[:2]
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)
    except ValueError:
        return (0, 0)


def reap(pid: int, timeout: float = 2.0) -> None:
    """Collect an exited child we spawned (slirp4netns), so it does not linger as a zombie; others are ignored."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return  # not our child (e.g. started by an earlier server): its own parent or init reaps it
        if done or time.monotonic() > deadline:
            return
        time.sleep(0.02)


def run_sync(argv: list[str], output: bool = False) -> str:
    done = run_command_sync(argv, timeout=60)
    if output:
        return done.stdout
    return "" if done.returncode == 0 else (done.stderr or done.stdout or f"exit {done.returncode}")


async def wait_dead(pid: int | None, started: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid, started):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True
