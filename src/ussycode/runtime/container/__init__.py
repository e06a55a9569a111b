"""The container runtime: namespaces + overlayfs on a per-VM ext4 disk + cgroups + a per-VM network namespace."""

from ussycode.runtime.container.runtime import ContainerRuntime

__all__ = ["ContainerRuntime"]
