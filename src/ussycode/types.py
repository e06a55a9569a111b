"""Value types shared by every layer: VM lifecycle states, trust tiers, VM specs."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from ussycode.errors import StateError

VM_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{1,28}[a-z0-9]$")
HANDLE_RE = re.compile(r"^[a-z][a-z0-9-]{0,18}[a-z0-9]$")

# SSH user names that always mean "the lobby", never a VM: a VM may not take them.
RESERVED_NAMES = frozenset(
    {"root", "admin", "ussycode", "lobby", "ubuntu", "debian", "user", "guest", "git", "www", "api", "mail",
     "smtp", "ssh", "help", "new", "localhost", "login", "logout", "health"}
)


class VmStatus(enum.StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    STOPPED = "stopped"
    ERROR = "error"


# Allowed lifecycle transitions, in one place. Deleting is allowed from every state.
_TRANSITIONS: dict[VmStatus, frozenset[VmStatus]] = {
    VmStatus.CREATING: frozenset({VmStatus.RUNNING, VmStatus.STOPPED, VmStatus.ERROR}),
    VmStatus.RUNNING: frozenset({VmStatus.STOPPED, VmStatus.ERROR, VmStatus.RUNNING}),
    VmStatus.STOPPED: frozenset({VmStatus.CREATING, VmStatus.RUNNING, VmStatus.ERROR}),
    VmStatus.ERROR: frozenset({VmStatus.CREATING, VmStatus.RUNNING, VmStatus.STOPPED}),
}


def check_transition(name: str, current: VmStatus, target: VmStatus) -> None:
    if target not in _TRANSITIONS[current]:
        raise StateError(f"VM {name} is {current}; it cannot become {target}")


class TrustLevel(enum.StrEnum):
    NEWBIE = "newbie"
    CITIZEN = "citizen"
    OPERATOR = "operator"
    ADMIN = "admin"


@dataclass(frozen=True)
class Limits:
    """Per-user VM count and per-VM sizes. ``None`` means unlimited."""

    vms: int | None
    cpu: int | None
    memory_mb: int | None
    disk_gb: int | None

    def as_json(self) -> dict[str, int | None]:
        return {"vms": self.vms, "cpu": self.cpu, "memory_mb": self.memory_mb, "disk_gb": self.disk_gb}


TIER_LIMITS: dict[TrustLevel, Limits] = {
    TrustLevel.NEWBIE: Limits(3, 1, 2048, 5),
    TrustLevel.CITIZEN: Limits(10, 4, 8192, 25),
    TrustLevel.OPERATOR: Limits(25, 8, 16384, 100),
    TrustLevel.ADMIN: Limits(None, None, None, None),
}


@dataclass(frozen=True)
class VmSpec:
    """What a runtime needs to create a VM. ``id`` is stable for the VM's life (names can change)."""

    id: str
    name: str
    image: str
    cpu: int
    memory_mb: int
    disk_gb: int
    env: dict[str, str] = field(default_factory=dict)
    authorized_keys: tuple[str, ...] = ()
    hostname: str = ""
    # First host uid/gid of the VM's private id range (container runtime: its user namespace), from the server.
    id_base: int | None = None
