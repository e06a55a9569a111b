"""Rendering shared by commands: JSON shapes (the contract) and plain-text tables."""

from __future__ import annotations

from typing import Any

from ussycode.services.container import Services
from ussycode.store.schema import iso
from ussycode.store.vms import Vm


def vm_json(services: Services, vm: Vm) -> dict[str, Any]:
    return {
        "name": vm.name,
        "status": str(vm.status),
        "pending": services.vms.pending(vm.id),
        "image": vm.image,
        "cpu": vm.cpu,
        "memory_mb": vm.memory_mb,
        "disk_gb": vm.disk_gb,
        "url": services.vms.url(vm.name),
        "ssh": services.vms.ssh_command(vm.name),
        "tags": list(vm.tags),
        "created_at": iso(vm.created_at),
    }


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)
