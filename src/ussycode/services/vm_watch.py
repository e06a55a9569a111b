"""Keeping the VMs honest: re-attachment after a (re)start, VMs that died behind our back, VMs the runtime runs
without a row. Part of :class:`~ussycode.services.vms.VmService` (a mixin: every correction goes through the
same per-VM locks and lifecycle steps as a user's command)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import sqlalchemy as sa

from ussycode.auth.identity import Actor
from ussycode.services.events import VmEvent
from ussycode.services.operations import Operation, Pending
from ussycode.store import audit
from ussycode.store import users as userq
from ussycode.store import vms as q
from ussycode.store.vms import Vm
from ussycode.types import VmStatus

if TYPE_CHECKING:
    from ussycode.runtime.base import Runtime
    from ussycode.services.events import EventBus
    from ussycode.services.operations import Operations
    from ussycode.store.db import Store

log = logging.getLogger(__name__)

REMOVED = "removed"  # ``desired`` of a VM whose removal has begun


class VmWatch:
    if TYPE_CHECKING:  # what the VmService this is part of provides
        store: Store
        runtime: Runtime
        events: EventBus
        ops: Operations

        async def by_id(self, vm_id: str) -> Vm | None: ...
        async def _discard(self, vm: Vm, action: str) -> None: ...
        async def _boot(self, actor: Actor, vm: Vm) -> Vm: ...
        async def _mark_error(self, vm: Vm, exc: BaseException | str) -> None: ...
        async def _halt(self, vm: Vm, why: str) -> None: ...

    async def reconcile(self) -> None:
        """Make reality match the DB after a (re)start, and wait for it: see :meth:`begin_reconcile`."""
        ops = await self.begin_reconcile()
        if ops:
            await asyncio.wait([op.task for op in ops])
        await self.sweep_orphans()

    async def begin_reconcile(self, go: asyncio.Event | None = None) -> list[Operation]:
        """Register the re-attachment of every VM, each as its own operation (``pending: starting`` until
        done), and return them at once. The work waits for ``go``: the server registers first (so nothing
        ever reads a VM as idle before it is re-attached), starts listening, then lets them run concurrently.

        Per row: an interrupted ``rm`` (``desired = removed``) is finished; an interrupted ``new``/``cp``
        (status ``creating``) is undone, row included; a VM that should run is re-attached or booted; a VM that
        should be stopped but runs is stopped. VMs the runtime runs without a row are the watcher's (its first
        round runs at once)."""
        rows = await self.store.read(q.all_vms)
        ops: list[Operation] = []
        for vm in rows:
            if self.ops.pending(vm.id) is None:
                ops.append(self.ops.submit({vm.id: Pending.STARTING}, _bind(self._reconcile_one, vm, go),
                                           label=f"reattach {vm.name}"))
        return ops

    async def _reconcile_one(self, vm: Vm, go: asyncio.Event | None = None) -> None:
        if go is not None:
            await go.wait()
        try:
            now = await self.by_id(vm.id)
            if now is None:
                return
            if now.desired == REMOVED:
                log.warning("finishing the removal of %s (interrupted)", now.name)
                await self._discard(now, "vm.remove")
                return
            if now.status is VmStatus.CREATING:
                log.warning("removing %s: its creation was interrupted", now.name)
                await self._discard(now, "vm.create_interrupted")
                return
            if now.runtime_state:
                await self.runtime.load_state(now.id, now.runtime_state)
            actual = await self.runtime.status(now.id)
            if now.desired == "running" and actual is not VmStatus.RUNNING:
                log.info("starting %s: it was running before the server stopped", now.name)
                system = await self._system_actor(now)
                try:
                    await self._boot(system, now)
                except Exception as exc:
                    await self._mark_error(now, exc)
            elif now.desired == "stopped" and actual is VmStatus.RUNNING:
                await self._halt(now, "it should be stopped")
            elif actual is VmStatus.RUNNING:
                state = self.runtime.get_state(now.id)
                await self.store.write(lambda c: q.update(c, now.id, status=actual, runtime_state=state))
                await self.events.publish(VmEvent("started", now.id, now.name))
            elif now.status is not actual and now.status is not VmStatus.ERROR:
                await self.store.write(lambda c: q.update(c, now.id, status=actual))
        except Exception as exc:
            log.exception("reconciling %s failed", vm.name)
            await self._mark_error(vm, exc)

    async def sweep_orphans(self, known: set[str] | None = None) -> list[str]:
        """Stop VMs the runtime runs that have no row (nobody could ever reach or remove them), and say so.
        Returns the ids stopped. Their disks stay: deleting data is a person's decision."""
        try:
            present = await self.runtime.list_vms()
        except NotImplementedError:
            return []
        if known is None:
            known = {vm_id for vm_id, _, _ in await self.store.read(q.index)}
        stopped: list[str] = []
        for vm_id in sorted(set(present) - known):
            async with self.ops.lock(vm_id):
                if self.ops.pending(vm_id) is not None or await self.by_id(vm_id) is not None:
                    continue
                if await self.runtime.status(vm_id) is not VmStatus.RUNNING:
                    continue
                log.warning("VM %s runs but has no row in the database; stopping it (its disk is kept)", vm_id)
                try:
                    await self.runtime.stop(vm_id)
                except Exception:
                    log.exception("stopping orphan VM %s failed", vm_id)
                    continue
                await self.store.write(lambda c, vm_id=vm_id: audit.record(  # type: ignore[misc]
                    c, actor_id=None, source="system", action="vm.orphan_stopped", target=vm_id))
                stopped.append(vm_id)
        return stopped

    async def _system_actor(self, vm: Vm) -> Actor:
        owner = await self.store.read(lambda c: userq.by_id(c, vm.owner_id))
        assert owner is not None
        return Actor(user=owner, source="system")

    async def watch_once(self, *, sweep: bool = True) -> None:
        """Notice VMs that died behind our back (the DB never claims a dead VM is running), and VMs that run
        without a row. Each correction is made under the VM's lock, after checking again."""
        rows = await self.store.read(q.index)
        running = [(vm_id, name) for vm_id, name, status in rows if status is VmStatus.RUNNING]
        for n, (vm_id, name) in enumerate(running):
            if n % 64 == 63:
                await asyncio.sleep(0)  # thousands of rows: let the loop breathe
            if self.ops.busy(vm_id) or await self.runtime.status(vm_id) is VmStatus.RUNNING:
                continue
            async with self.ops.lock(vm_id):
                now = await self.by_id(vm_id)
                if now is None or now.status is not VmStatus.RUNNING or self.ops.pending(vm_id) is not None:
                    continue
                if await self.runtime.status(vm_id) is VmStatus.RUNNING:
                    continue
                log.warning("VM %s stopped unexpectedly", name)

                def tx(c: sa.Connection, vm_id: str = vm_id, name: str = name) -> None:
                    q.update(c, vm_id, status=VmStatus.STOPPED, desired="stopped",
                             error="the VM stopped unexpectedly")
                    audit.record(c, actor_id=None, source="system", action="vm.crashed", target=name)

                await self.store.write(tx)
            await self.events.publish(VmEvent("stopped", vm_id, name))
        if sweep:
            await self.sweep_orphans({vm_id for vm_id, _, _ in rows})

    async def watch(self, interval: float = 3.0, sweep_every: int = 10) -> None:
        n = 0
        while True:
            try:
                await self.watch_once(sweep=n % sweep_every == 0)
            except Exception:
                log.exception("VM watch failed")
            n += 1
            await asyncio.sleep(interval)


def _bind(fn: Callable[[Vm, asyncio.Event | None], Awaitable[None]], vm: Vm,
          go: asyncio.Event | None) -> Callable[[], Awaitable[None]]:
    return lambda: fn(vm, go)
