"""A container VM's disk beyond boot: copying it (``cp``), its size, and waiting until the kernel lets go of it.
Part of :class:`~ussycode.runtime.container.runtime.ContainerRuntime` (a mixin)."""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ussycode.errors import RuntimeFailure, StateError
from ussycode.runtime import disks
from ussycode.runtime.container import host
from ussycode.runtime.container.state import VmState, alive
from ussycode.types import VmSpec


class ContainerDisks:
    if TYPE_CHECKING:  # what the ContainerRuntime this is part of provides
        def _disk(self, vm_id: str) -> Path: ...
        def _vm_dir(self, vm_id: str) -> Path: ...
        def _state(self, vm_id: str) -> VmState: ...
        def _lock(self, vm_id: str) -> asyncio.Lock: ...
        def _save(self, st: VmState) -> None: ...
        def _new_state(self, spec: VmSpec, digest: str) -> VmState: ...

    async def copy_disk(self, src_id: str, dst: VmSpec) -> None:
        """A new, independent disk for ``dst`` with the source's contents and its own host keys.

        A running source's file system is frozen (``fsfreeze``) for the copy, so the copy is consistent (as after
        a clean unmount) while the source only pauses its writes.
        """
        src = self._state(src_id)
        async with self._lock(src_id), self._lock(dst.id):
            if self._disk(dst.id).exists():
                raise StateError(f"VM {dst.name} already has a disk")
            mnt = self._vm_dir(src_id) / "disk"
            frozen = alive(src.pid, src.pid_start) and os.path.ismount(mnt)  # noqa: ASYNC240 (instant)
            try:
                if frozen:  # inside the try: a freeze that timed out may still have frozen it
                    await host.run(["fsfreeze", "--freeze", str(mnt)], "freezing the source disk", timeout=30)
                await asyncio.to_thread(disks.copy_disk, Path(src.disk), self._disk(dst.id))
            finally:
                if frozen:  # whatever happened (a timeout, a cancelled copy), the source is never left frozen
                    await asyncio.shield(host.unfreeze(mnt))
            try:
                st = self._new_state(dst, src.digest)
                st.image = src.image
                st.disk_gb = max(dst.disk_gb, src.disk_gb)
                await asyncio.to_thread(self._prepare_copy, st)
                self._save(st)
            except BaseException:
                self._disk(dst.id).unlink(missing_ok=True)
                raise

    def _prepare_copy(self, st: VmState) -> None:
        """Grow the copy to its size and mark it for new SSH host keys (a copy is a different machine).

        The host does not delete the source's keys from the copied disk: every path in it is the guest's to
        redirect. The copy's init replaces them at its first boot, inside the guest (``fresh-host-keys``).
        """
        disk = Path(st.disk)
        if disk.stat().st_size < st.disk_gb * disks.GIB:
            os.truncate(disk, st.disk_gb * disks.GIB)
            for argv in (["e2fsck", "-f", "-p", st.disk], ["resize2fs", st.disk]):
                if out := host.run_sync(argv):
                    raise RuntimeFailure("growing the copied disk failed", evidence=f"$ {shlex.join(argv)}\n{out}")
        st.fresh_host_keys = True

    async def disk_usage(self, vm_id: str) -> int:
        return disks.allocated_bytes(Path(self._state(vm_id).disk))

    @staticmethod
    def _wait_loop_released(disk: Path, timeout: float = 10.0) -> None:
        """Wait until no loop device holds ``disk`` (a stopped VM's filesystem is released asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            out = host.run_sync(["losetup", "-j", str(disk)], output=True)
            if not out.strip():
                return
            if time.monotonic() > deadline:
                raise RuntimeFailure(f"disk {disk} is still attached to a loop device", evidence=out)
            time.sleep(0.1)
