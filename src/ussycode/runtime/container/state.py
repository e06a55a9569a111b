"""What the container runtime remembers about a VM (a JSON blob the core keeps), and process liveness checks."""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import asdict, dataclass, fields
from typing import Any

from ussycode.errors import RuntimeFailure

STATE_VERSION = 1


@dataclass
class VmState:
    """A container VM's host-side facts. ``pid``/``pid_start`` identify its PID 1 (start time guards reuse)."""

    vm_id: str
    image: str
    digest: str
    disk: str
    netns: str
    hostname: str = ""
    cpu: int = 1
    memory_mb: int = 512
    disk_gb: int = 1
    pid: int | None = None
    pid_start: int | None = None
    egress_pid: int | None = None  # slirp4netns, outside the VM's PID namespace
    egress_start: int | None = None
    # The VM's private host id range (guest id k = host id_base + k), from the server; None for a VM made before
    # user namespaces (it gets one from the server at its next start).
    id_base: int | None = None
    id_count: int = 65536
    # A copy's first boot makes new SSH host keys inside the guest (the host never edits a guest's files).
    fresh_host_keys: bool = False
    version: int = STATE_VERSION

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmState:
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise RuntimeFailure(f"container VM state is unreadable: {exc}", evidence=repr(data)) from exc


def parse_stat_start_time(stat: str) -> tuple[str, int]:
    """(state letter, start time in clock ticks) from a ``/proc/<pid>/stat`` line (pure).

    The command name (field 2) may contain spaces and parentheses: split after the last ``)``.
    """
    rest = stat[stat.rindex(")") + 2 :].split()
    return rest[0], int(rest[19])


def start_time(pid: int) -> int | None:
    """The process's start time, or None if it does not exist or is a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state, started = parse_stat_start_time(f.read())
    except (OSError, ValueError):
        return None
    return None if state in ("Z", "X") else started


def alive(pid: int | None, started: int | None) -> bool:
    """True if ``pid`` runs and is the same process that started at ``started`` (not a reused pid)."""
    return pid is not None and started is not None and start_time(pid) == started


def kill(pid: int | None, started: int | None, sig: signal.Signals) -> None:
    if alive(pid, started):
        assert pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
