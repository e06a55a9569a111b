"""Command lines for the :mod:`.nsinit` helper (pure; kept apart so importing the runtime never imports it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HELPER = "ussycode.runtime.container.nsinit"


@dataclass(frozen=True)
class BootPaths:
    """Where a VM's layers are: the image, the loop-mounted disk, their id-mapped binds and the overlay root."""

    lower: Path
    disk: Path
    lower_map: Path
    disk_map: Path
    root: Path


def boot_argv(
    python: str, *, paths: BootPaths, hostname: str, netns_path: Path, init: Path, meta: Path,
    cgroup_procs: list[Path], pidfile: Path, id_base: int, id_count: int, memory_mb: int,
    lxcfs: Path | None = None, lxcfs_proc: tuple[str, ...] = (),
) -> list[str]:
    """The command line that boots a VM (pure)."""
    out = [
        python, "-I", "-m", HELPER, "boot",
        "--root", str(paths.root), "--lower", str(paths.lower), "--lower-map", str(paths.lower_map),
        "--disk", str(paths.disk), "--disk-map", str(paths.disk_map),
        "--hostname", hostname, "--netns", str(netns_path), "--init", str(init),
        "--meta", str(meta), "--pidfile", str(pidfile),
        "--id-base", str(id_base), "--id-count", str(id_count), "--memory-mb", str(memory_mb),
        *[arg for p in cgroup_procs for arg in ("--cgroup-procs", str(p))],
    ]
    if lxcfs is not None:
        out += ["--lxcfs", str(lxcfs), *[arg for name in lxcfs_proc for arg in ("--lxcfs-proc", name)]]
    return out


def exec_argv(
    python: str, *, pid: int, uid: int, gid: int, groups: list[int], cwd: str, env: dict[str, str],
    cgroup_procs: list[Path], argv: list[str],
) -> list[str]:
    """The command line that runs ``argv`` inside the VM whose PID 1 has host pid ``pid`` (pure)."""
    out = [
        python, "-I", "-m", HELPER, "exec",
        "--pid", str(pid), "--uid", str(uid), "--gid", str(gid), "--groups", ",".join(map(str, groups)),
        "--cwd", cwd,
    ]
    for key, value in env.items():
        out += ["--env", f"{key}={value}"]
    for p in cgroup_procs:
        out += ["--cgroup-procs", str(p)]
    return out + ["--", *argv]
