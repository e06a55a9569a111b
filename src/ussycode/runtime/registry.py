"""Choosing and constructing a runtime by name: ``make_runtime("container" | "qemu" | "firecracker" | "auto")``.

``auto`` follows :func:`ussycode.runtime.kvm.choose_auto`: firecracker (binary + KVM that really runs guests),
then qemu with KVM, then the container runtime. QEMU under TCG is never picked automatically: it is slow.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ussycode.errors import RuntimeFailure, UsageError
from ussycode.runtime.base import HostCheck, Runtime
from ussycode.runtime.images import ImageStore

Factory = Callable[[Path, Path, ImageStore], Runtime]


def _container(disks_dir: Path, run_dir: Path, images: ImageStore) -> Runtime:
    from ussycode.runtime.container import ContainerRuntime

    return ContainerRuntime(disks_dir, run_dir, images)


def _container_check() -> HostCheck:
    from ussycode.runtime.container import ContainerRuntime

    return ContainerRuntime.check()


def _qemu(disks_dir: Path, run_dir: Path, images: ImageStore) -> Runtime:
    from ussycode.runtime.qemu import QemuRuntime

    return QemuRuntime(Path(disks_dir).parent, images, run_dir=Path(run_dir) / "qemu")


def _qemu_check() -> HostCheck:
    from ussycode.runtime.qemu import QemuRuntime

    return QemuRuntime.check()


def _firecracker(disks_dir: Path, run_dir: Path, images: ImageStore) -> Runtime:
    from ussycode.runtime.firecracker import FirecrackerRuntime

    return FirecrackerRuntime(Path(disks_dir).parent, images, run_dir=Path(run_dir) / "firecracker")


def _firecracker_check() -> HostCheck:
    from ussycode.runtime.firecracker import FirecrackerRuntime

    return FirecrackerRuntime.check()


# name -> (factory, host check). Order of AUTO_ORDER is preference for ``auto``.
RUNTIMES: dict[str, tuple[Factory, Callable[[], HostCheck]]] = {
    "container": (_container, _container_check),
    "qemu": (_qemu, _qemu_check),
    "firecracker": (_firecracker, _firecracker_check),
}
AUTO_ORDER: list[str] = ["firecracker", "qemu", "container"]


def register(name: str, factory: Factory, check: Callable[[], HostCheck], *, prefer: bool = False) -> None:
    """Add a runtime; ``prefer`` puts it first for ``auto``."""
    RUNTIMES[name] = (factory, check)
    if name not in AUTO_ORDER:
        AUTO_ORDER.insert(0 if prefer else len(AUTO_ORDER), name)


def checks() -> dict[str, HostCheck]:
    """Every known runtime's host check (what ``ussycode doctor`` prints)."""
    return {name: check() for name, (_factory, check) in RUNTIMES.items()}


def choose(name: str) -> str:
    """Resolve ``auto`` to a concrete runtime name; check that a named runtime exists."""
    if name != "auto":
        if name not in RUNTIMES:
            raise UsageError(f"unknown runtime {name!r}; choose one of: auto, {', '.join(sorted(RUNTIMES))}")
        return name
    reasons = []
    for candidate in AUTO_ORDER:
        result = RUNTIMES[candidate][1]()
        if result.ok:
            return candidate
        reasons.append(f"{candidate}: {result.reason}")
    raise RuntimeFailure("no runtime can run on this host", evidence="\n".join(reasons))


def make_runtime(name: str, *, disks_dir: Path, run_dir: Path, images: ImageStore) -> Runtime:
    """Construct the runtime ``name`` (or the best available for ``auto``, see the module docstring)."""
    if name == "auto":
        from ussycode.runtime.kvm import choose_auto

        name = choose_auto(Path(disks_dir).parent / "cache").name
    factory, _check = RUNTIMES[choose(name)]
    return factory(Path(disks_dir), Path(run_dir), images)
