"""The QEMU runtime: microVM-style guests under KVM or TCG (see :mod:`ussycode.runtime.qemu.runtime`)."""

from ussycode.runtime.qemu.runtime import QemuRuntime

__all__ = ["QemuRuntime"]
