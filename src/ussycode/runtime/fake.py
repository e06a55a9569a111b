"""An in-memory runtime for tests and benchmarks: VMs are entries in a dict that outlives the runtime object.

It keeps the :class:`~ussycode.runtime.base.Runtime` contract's observable behaviour (idempotent start/stop, state
blobs, ``list_vms``) and adds knobs a real runtime cannot offer on demand: a boot that takes ``boot_delay``
seconds or waits for ``boot_gate``, an event set when a boot begins, failures, and a ``host`` dict shared between
instances (a restarted server finds the VMs the previous one left running, as with a real host). It never runs a
process, so it proves what the control plane does, never what a real runtime does.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from ussycode.errors import NotFound, RuntimeFailure, StateError
from ussycode.runtime.base import ExecResult, Runtime
from ussycode.types import VmSpec, VmStatus


@dataclass
class FakeVm:
    spec: VmSpec
    running: bool = False
    boots: int = 0
    files: dict[str, bytes] = field(default_factory=dict)


class FakeRuntime(Runtime):
    name = "fake"

    def __init__(self, host: dict[str, FakeVm] | None = None, *, boot_delay: float = 0.0,
                 copy_needs_stopped_source: bool = False) -> None:
        self.host: dict[str, FakeVm] = host if host is not None else {}
        self.boot_delay = boot_delay
        self.boot_gate: asyncio.Event | None = None  # when set: boots wait for it
        self.boot_began = asyncio.Event()
        self.copy_gate: asyncio.Event | None = None
        self.copy_began = asyncio.Event()
        self.stop_gate: asyncio.Event | None = None
        self.stop_began = asyncio.Event()
        self.fail_boot: str | None = None
        self.copy_needs_stopped_source = copy_needs_stopped_source
        self.calls: list[tuple[str, str]] = []

    def _vm(self, vm_id: str) -> FakeVm:
        vm = self.host.get(vm_id)
        if vm is None:
            raise NotFound(f"fake VM {vm_id} does not exist")
        return vm

    def running(self) -> set[str]:
        return {i for i, vm in self.host.items() if vm.running}

    async def create(self, spec: VmSpec) -> None:
        self.calls.append(("create", spec.id))
        self.host.setdefault(spec.id, FakeVm(spec))

    async def start(self, spec: VmSpec) -> None:
        self.calls.append(("start", spec.id))
        vm = self._vm(spec.id)
        if vm.running:
            return
        self.boot_began.set()
        # Like a real runtime, a boot in progress already has a process: cancelled half-way, it must clean up.
        vm.running = True
        try:
            if self.boot_gate is not None:
                await self.boot_gate.wait()
            if self.boot_delay:
                await asyncio.sleep(self.boot_delay)
            if self.fail_boot:
                raise RuntimeFailure(f"VM {spec.name} failed to start", evidence=self.fail_boot)
        except BaseException:
            vm.running = False
            raise
        vm.boots += 1

    async def stop(self, vm_id: str, timeout: float = 10.0) -> None:
        self.calls.append(("stop", vm_id))
        self.stop_began.set()
        if self.stop_gate is not None:
            await self.stop_gate.wait()
        if vm_id in self.host:
            self.host[vm_id].running = False

    async def destroy(self, vm_id: str) -> None:
        self.calls.append(("destroy", vm_id))
        self.host.pop(vm_id, None)

    async def status(self, vm_id: str) -> VmStatus:
        vm = self.host.get(vm_id)
        if vm is None:
            return VmStatus.ERROR
        return VmStatus.RUNNING if vm.running else VmStatus.STOPPED

    async def copy_disk(self, src_id: str, dst: VmSpec) -> None:
        self.calls.append(("copy_disk", src_id))
        src = self._vm(src_id)
        if self.copy_needs_stopped_source and src.running:
            raise StateError("the fake runtime copies stopped disks only")
        self.copy_began.set()
        if self.copy_gate is not None:
            await self.copy_gate.wait()
        self.host[dst.id] = FakeVm(dst, files=dict(src.files))

    async def exec(self, vm_id: str, argv: list[str], *, stdin: bytes = b"", user: str = "ussycode",
                   timeout: float = 60.0) -> ExecResult:
        if not self._vm(vm_id).running:
            raise StateError(f"fake VM {vm_id} is not running")
        return ExecResult(0, b"", b"")

    def get_state(self, vm_id: str) -> dict[str, Any]:
        vm = self.host.get(vm_id)
        return {"fake": True, "boots": vm.boots if vm else 0}

    async def load_state(self, vm_id: str, state: dict[str, Any]) -> None:
        self.calls.append(("load_state", vm_id))

    async def list_vms(self) -> list[str]:
        return sorted(self.host)
