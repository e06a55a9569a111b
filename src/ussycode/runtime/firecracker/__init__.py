"""The Firecracker runtime (see :mod:`ussycode.runtime.firecracker.runtime`)."""

from ussycode.runtime.firecracker.runtime import FirecrackerRuntime

__all__ = ["FirecrackerRuntime"]
