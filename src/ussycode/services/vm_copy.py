"""``cp``: a new VM with a copy of another's disk. Part of :class:`~ussycode.services.vms.VmService` (a mixin:
the copy is one operation holding both VMs' locks, and its new VM is built like any other)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ussycode.auth.identity import Actor
from ussycode.errors import Forbidden, StateError
from ussycode.services.operations import Pending, finish, say
from ussycode.services.vm_rules import validate_vm_name
from ussycode.services.vm_watch import REMOVED
from ussycode.store import vms as q
from ussycode.store.users import new_id
from ussycode.store.vms import Vm
from ussycode.types import VmSpec, VmStatus

if TYPE_CHECKING:
    import asyncio

    import sqlalchemy as sa

    from ussycode.runtime.base import Runtime
    from ussycode.services.operations import Operations
    from ussycode.store.db import Store


class VmCopy:
    if TYPE_CHECKING:  # what the VmService this is part of provides
        store: Store
        runtime: Runtime
        ops: Operations
        _start_slots: asyncio.Semaphore

        def spec(self, vm: Vm) -> VmSpec: ...
        async def get(self, actor: Actor, name: str) -> Vm: ...
        async def by_name(self, name: str) -> Vm | None: ...
        async def _random_name(self) -> str: ...
        async def _current(self, vm: Vm) -> Vm: ...
        def _insert_tx(self, actor: Actor, vm_id: str, name: str, image: str, cpu: int, memory_mb: int,
                       disk_gb: int, env: dict[str, str], source: Vm | None,
                       arena: bool = False) -> Callable[[sa.Connection], Vm]: ...
        async def _build(self, actor: Actor, vm: Vm, progress: Callable[[str], Awaitable[None]] | None,
                         source: Vm | None) -> Vm: ...
        async def _mark_error(self, vm: Vm, exc: BaseException | str) -> None: ...

    async def copy(self, actor: Actor, name: str, new_name: str | None = None) -> Vm:
        """A new VM with a copy of ``name``'s disk. One operation holds both VMs' locks for the whole copy."""
        if actor.vm_scope:
            raise Forbidden("this token is scoped to one VM and cannot create VMs")
        src = await self.get(actor, name)
        if src.status is VmStatus.CREATING:
            raise StateError(f"{name} is still being created")
        dst_name = validate_vm_name(new_name) if new_name else await self._copy_name(name)
        dst_id = new_id()

        async def work() -> Vm:
            source = await self._current(src)
            if source.status is VmStatus.CREATING or source.desired == REMOVED:
                raise StateError(f"{name} is {source.status}; it cannot be copied now")
            dst = await self.store.write(self._insert_tx(
                actor, dst_id, dst_name, source.image, source.cpu, source.memory_mb, source.disk_gb,
                source.env, source))
            return await self._build(actor, dst, None, source)

        return await self.ops.run({src.id: Pending.COPYING, dst_id: Pending.CREATING}, work,
                                  label=f"cp {name} {dst_name}")

    async def _copy_name(self, name: str) -> str:
        for i in range(2, 100):
            candidate = f"{name[:24]}-copy{'' if i == 2 else i}"
            if await self.by_name(candidate) is None:
                return candidate
        return await self._random_name()

    async def _copy_disk(self, src: Vm, dst: Vm, progress: Callable[[str], Awaitable[None]] | None) -> None:
        """Copy ``src``'s disk for ``dst`` (both locks are held by the copy operation). A runtime that can only
        copy a stopped disk gets the source stopped for the copy and started again afterwards, even when the
        copy is cancelled (its ``desired`` stays ``running``, so a server killed meanwhile restarts it)."""
        try:
            await self.runtime.copy_disk(src.id, self.spec(dst))
            return
        except StateError:
            if await self.runtime.status(src.id) is not VmStatus.RUNNING:
                raise
        await say(progress, f"stopping {src.name} for the copy (this runtime copies stopped disks only)")
        await self.runtime.stop(src.id)
        try:
            await self.runtime.copy_disk(src.id, self.spec(dst))
        finally:
            await say(progress, f"starting {src.name} again")
            await finish(self._restart_source(src))

    async def _restart_source(self, src: Vm) -> None:
        try:
            async with self._start_slots:
                await self.runtime.start(self.spec(src))
            state = self.runtime.get_state(src.id)
            await self.store.write(lambda c: q.update(c, src.id, runtime_state=state))
        except Exception as exc:
            await self._mark_error(src, exc)
