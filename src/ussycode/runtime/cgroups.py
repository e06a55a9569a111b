"""Per-VM control groups (v1 and v2): memory, CPU and pids limits.

Each VM gets the group ``ussycode/<vm_id>`` in every controller it uses. Values are computed by the pure
:func:`cgroup_values`; :class:`Cgroups` writes them and moves processes in. The host's version is detected
(:func:`detect_version`): a unified v2 tree has ``cgroup.controllers`` at its root; a v1 (or hybrid) host mounts
one directory per controller.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ussycode.errors import RuntimeFailure

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "cpu", "pids")
V1_OPTIONAL = ("cpuset",)
CPU_PERIOD_US = 100_000
DEFAULT_PIDS_MAX = 4096
PARENT = "ussycode"

Version = Literal["v1", "v2"]


@dataclass(frozen=True)
class CgroupLimits:
    cpu: int
    memory_mb: int
    pids_max: int = DEFAULT_PIDS_MAX
    # CPUs the VM may run on (a cpuset list such as "1" or "0-3"), so ``nproc`` and the scheduler affinity show
    # its CPU count; None: all of the host's.
    cpus: str | None = None


def pick_cpus(count: int, host_cpus: int, slot: int) -> str | None:
    """The cpuset of a VM with ``count`` CPUs (pure): ``count`` consecutive host CPUs starting at ``slot``
    modulo the host's count (VMs spread over the host); None when it may use them all."""
    if count >= host_cpus:
        return None
    chosen = sorted((slot + i) % host_cpus for i in range(count))
    return ",".join(str(c) for c in chosen)


def detect_version(root: Path = CGROUP_ROOT) -> Version | None:
    """``"v2"`` for a unified hierarchy, ``"v1"`` when v1 controllers are mounted, else None."""
    if (root / "cgroup.controllers").exists():
        return "v2"
    if all((root / c / "cgroup.procs").exists() for c in V1_CONTROLLERS):
        return "v1"
    return None


def cgroup_values(version: Version, limits: CgroupLimits) -> dict[str, dict[str, str]]:
    """Controller → {file: value} to write for these limits (pure). v2 uses the controller key ``""``.

    Files that may be missing on a host (v1 ``memory.memsw.*`` without swap accounting, v2 ``memory.swap.max``
    without swap) are written only when present.
    """
    mem = str(limits.memory_mb * 2**20)
    quota = limits.cpu * CPU_PERIOD_US
    if version == "v1":
        out = {
            "memory": {"memory.limit_in_bytes": mem, "memory.memsw.limit_in_bytes": mem},
            "cpu": {"cpu.cfs_period_us": str(CPU_PERIOD_US), "cpu.cfs_quota_us": str(quota)},
            "pids": {"pids.max": str(limits.pids_max)},
        }
        if limits.cpus is not None:
            out["cpuset"] = {"cpuset.cpus": limits.cpus}
        return out
    values = {
        "memory.max": mem,
        "memory.swap.max": "0",
        "cpu.max": f"{quota} {CPU_PERIOD_US}",
        "pids.max": str(limits.pids_max),
    }
    if limits.cpus is not None:
        values["cpuset.cpus"] = limits.cpus
    return {"": values}


OPTIONAL_FILES = frozenset({"memory.memsw.limit_in_bytes", "memory.swap.max", "cpuset.cpus"})


class Cgroups:
    """Creates, fills and removes the per-VM groups on this host."""

    def __init__(self, root: Path = CGROUP_ROOT, version: Version | None = None) -> None:
        self.root = root
        detected = version or detect_version(root)
        if detected is None:
            raise RuntimeFailure(f"no usable cgroup hierarchy under {root} (need v2, or v1 memory+cpu+pids)")
        self.version: Version = detected

    def dirs(self, vm_id: str) -> dict[str, Path]:
        """Controller → the VM's group directory."""
        if self.version == "v1":
            controllers = V1_CONTROLLERS + tuple(c for c in V1_OPTIONAL if (self.root / c / "cgroup.procs").exists())
            return {c: self.root / c / PARENT / vm_id for c in controllers}
        return {"": self.root / PARENT / vm_id}

    def procs_files(self, vm_id: str) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs(vm_id).values()]

    def exists(self, vm_id: str) -> bool:
        return any(d.exists() for d in self.dirs(vm_id).values())

    def create(self, vm_id: str, limits: CgroupLimits) -> None:
        """Create (or update) the VM's groups with ``limits``. Idempotent."""
        values = cgroup_values(self.version, limits)
        if self.version == "v2":
            self._enable_v2_controllers()
        dirs = self.dirs(vm_id)
        if "cpuset" in dirs:
            self._prepare_v1_cpuset(dirs["cpuset"])
            values.setdefault("cpuset", {})
        for controller, files in values.items():
            if controller not in dirs:
                continue
            group = dirs[controller]
            try:
                group.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RuntimeFailure(f"cannot create cgroup {group}: {exc}") from exc
            # memory.limit must stay <= memsw.limit: write the pair twice so raising and lowering both work.
            order = list(files.items())
            if controller == "memory":
                order = order + order[:1]
            for name, value in order:
                path = group / name
                if name in OPTIONAL_FILES and not path.exists():
                    continue
                try:
                    path.write_text(value)
                except OSError as exc:
                    if name in OPTIONAL_FILES or exc.errno == errno.EINVAL and controller == "memory":
                        continue
                    raise RuntimeFailure(f"cannot write {value} to {path}: {exc}") from exc

    @staticmethod
    def _prepare_v1_cpuset(group: Path) -> None:
        """A v1 cpuset group starts with no CPUs and no memory nodes (no task may join): inherit the parent's,
        from the root down, before the VM's own CPUs are written."""
        for directory in (group.parent, group):
            directory.mkdir(exist_ok=True)
            for name in ("cpuset.cpus", "cpuset.mems"):
                target = directory / name
                with contextlib.suppress(OSError):
                    if not target.read_text().strip():
                        target.write_text((directory.parent / name).read_text().strip())

    def _enable_v2_controllers(self) -> None:
        parent = self.root / PARENT
        parent.mkdir(exist_ok=True)
        for group in (self.root, parent):
            control = group / "cgroup.subtree_control"
            for controller in ("cpu", "memory", "pids", "cpuset"):
                with contextlib.suppress(OSError):
                    control.write_text(f"+{controller}")

    def pids(self, vm_id: str) -> set[int]:
        found: set[int] = set()
        for procs in self.procs_files(vm_id):
            with contextlib.suppress(OSError):
                found.update(int(line) for line in procs.read_text().split())
        return found

    def remove(self, vm_id: str, timeout: float = 5.0) -> None:
        """Kill whatever is left in the VM's groups and remove them. Idempotent."""
        deadline = time.monotonic() + timeout
        for group in self.dirs(vm_id).values():
            while group.exists():
                for pid in self.pids(vm_id):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                try:
                    group.rmdir()
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if time.monotonic() > deadline:
                        raise RuntimeFailure(f"cannot remove cgroup {group}: {exc}") from exc
                    time.sleep(0.05)

    def memory_events_oom_kills(self, vm_id: str) -> int:
        """How many processes the OOM killer has killed in the VM's memory group (0 if unknown)."""
        if self.version == "v1":
            path = self.dirs(vm_id)["memory"] / "memory.oom_control"
        else:
            path = self.dirs(vm_id)[""] / "memory.events"
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0
