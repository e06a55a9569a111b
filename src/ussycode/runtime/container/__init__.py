"""The container runtime: namespaces + overlayfs on a per-VM ext4 disk + cgroups + a per-VM network namespace.

Imports are lazy so the :mod:`.nsinit` helper (run with ``python -m`` for every boot and exec) starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ussycode.runtime.container.runtime import ContainerRuntime

__all__ = ["ContainerRuntime"]


def __getattr__(name: str) -> Any:
    if name == "ContainerRuntime":
        from ussycode.runtime.container.runtime import ContainerRuntime

        return ContainerRuntime
    raise AttributeError(name)
