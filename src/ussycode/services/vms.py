"""VM lifecycle: names, quotas, the state machine, and the runtime calls behind them.

The DB row is the truth about what the owner asked for (``desired``) and what we last saw (``status``); the
runtime only does what it is told. Lifecycle calls on one VM are serialised by a per-VM lock; quota checks and
inserts share one write transaction, so parallel ``new`` calls cannot overshoot a quota. Re-attachment after a
restart and noticing VMs that died are :mod:`ussycode.services.vm_watch`, ``cp`` is
:mod:`ussycode.services.vm_copy`, and the rules a VM's settings follow are :mod:`ussycode.services.vm_rules`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import sqlalchemy as sa

from ussycode import telemetry
from ussycode.auth.identity import Actor
from ussycode.config import Settings, parse_addr
from ussycode.errors import (
    Conflict,
    Forbidden,
    NotFound,
    RuntimeFailure,
    StateError,
    Suspended,
    UsageError,
    UssyError,
)
from ussycode.runtime import idmap
from ussycode.runtime.base import Runtime
from ussycode.services import quotas
from ussycode.services.events import EventBus, VmEvent
from ussycode.services.operations import Operations, Pending, finish, say
from ussycode.services.vm_copy import VmCopy
from ussycode.services.vm_rules import (
    DEFAULT_CPU,
    DEFAULT_DISK_GB,
    DEFAULT_MEMORY_MB,
    TAG_RE,
    check_sizes,
    random_vm_name,
    validate_vm_name,
)
from ussycode.services.vm_watch import REMOVED, VmWatch
from ussycode.store import audit
from ussycode.store import users as userq
from ussycode.store import vms as q
from ussycode.store.db import Store
from ussycode.store.users import User, new_id
from ussycode.store.vms import Vm
from ussycode.types import VmSpec, VmStatus, check_transition
from ussycode.validate import printable_text

log = logging.getLogger(__name__)

class ImageResolver(Protocol):
    def resolve(self, name: str) -> Any: ...


class VmService(VmCopy, VmWatch):
    def __init__(self, store: Store, runtime: Runtime, settings: Settings, images: ImageResolver,
                 gateway_public_key: str, events: EventBus, max_parallel_starts: int = 8) -> None:
        self.store = store
        self.runtime = runtime
        self.settings = settings
        self.images = images
        self.gateway_public_key = gateway_public_key
        self.events = events
        self.ops = Operations("vm-ops")
        self._start_slots = asyncio.Semaphore(max_parallel_starts)

    # Presentation helpers shared by every frontend ---------------------------------------------------------
    def url(self, name: str) -> str:
        return self.settings.public_url(f"{name}.{self.settings.domain}")

    def ssh_command(self, name: str) -> str:
        _, port = parse_addr(self.settings.ssh_addr)
        flag = "" if port == 22 else f"-p {port} "
        return f"ssh {flag}{name}@{self.settings.domain}"

    def spec(self, vm: Vm) -> VmSpec:
        env = dict(vm.env)
        env.update(USSYCODE_VM_NAME=vm.name, USSYCODE_PUBLIC_DOMAIN=self.settings.domain,
                   USSYCODE_PUBLIC_URL=self.url(vm.name))
        return VmSpec(id=vm.id, name=vm.name, image=vm.image, cpu=vm.cpu, memory_mb=vm.memory_mb,
                      disk_gb=vm.disk_gb, env=env, authorized_keys=(self.gateway_public_key,), hostname=vm.name,
                      id_base=vm.id_base)

    # Queries ------------------------------------------------------------------------------------------------
    async def list(self, actor: Actor) -> list[Vm]:
        vms = await self.store.read(lambda c: q.of_owner(c, actor.id))
        if actor.vm_scope:
            vms = [v for v in vms if v.name == actor.vm_scope]
        return vms

    async def get(self, actor: Actor, name: str) -> Vm:
        vm = await self.store.read(lambda c: q.by_name(c, name))
        if vm is None or vm.owner_id != actor.id or (actor.vm_scope and actor.vm_scope != name):
            raise NotFound(f"no VM named {name[:40]!r}; see 'ls'")
        return vm

    async def by_name(self, name: str) -> Vm | None:
        return await self.store.read(lambda c: q.by_name(c, name))

    async def by_id(self, vm_id: str) -> Vm | None:
        return await self.store.read(lambda c: q.by_id(c, vm_id))

    async def _random_name(self) -> str:
        for _ in range(50):
            name = random_vm_name()
            if await self.by_name(name) is None:
                return name
        return random_vm_name(suffix=True)

    # Lifecycle ----------------------------------------------------------------------------------------------
    # Every change below runs as the VM's operation (services/operations.py): the task that does the work holds
    # the VM's lock, and it runs to its end whoever waits for it. Intent is written to the DB before the runtime
    # acts (``desired``), so a server killed at any moment is reconciled to a consistent state on restart.
    def pending(self, vm_id: str) -> Pending | None:
        """The operation in flight on this VM (``ls --json`` ``pending``), or None."""
        return self.ops.pending(vm_id)

    async def create(self, actor: Actor, *, name: str | None = None, image: str | None = None,
                     cpu: int = DEFAULT_CPU, memory_mb: int = DEFAULT_MEMORY_MB, disk_gb: int = DEFAULT_DISK_GB,
                     env: dict[str, str] | None = None, progress: Callable[[str], Awaitable[None]] | None = None,
                     source_vm: Vm | None = None, arena: bool = False) -> Vm:
        """``arena``: a match's VM, tagged ``arena`` and counted outside the owner's VM quota."""
        if actor.vm_scope:
            raise Forbidden("this token is scoped to one VM and cannot create VMs")
        if source_vm is not None:
            return await self.copy(actor, source_vm.name, name)
        name = validate_vm_name(name) if name else await self._random_name()
        image = printable_text(image, "image name", max_len=64) if image else self.settings.default_image
        check_sizes(cpu, memory_mb, disk_gb)
        try:
            await asyncio.to_thread(self.images.resolve, image)  # hashes the image recipe: off the loop
        except UssyError:
            raise
        except Exception as exc:  # an image store's own failure is the user's missing image
            raise NotFound(f"no image named {image!r}: {exc}") from None
        vm_id = new_id()

        async def work() -> Vm:
            vm = await self.store.write(self._insert_tx(actor, vm_id, name, image, cpu, memory_mb, disk_gb,
                                                        env or {}, None, arena=arena))
            return await self._build(actor, vm, progress, None)

        return await self.ops.run({vm_id: Pending.CREATING}, work, label=f"create {name}")

    def _insert_tx(self, actor: Actor, vm_id: str, name: str, image: str, cpu: int, memory_mb: int,
                   disk_gb: int, env: dict[str, str], source: Vm | None,
                   arena: bool = False) -> Callable[[sa.Connection], Vm]:
        def tx(c: sa.Connection) -> Vm:
            user = userq.by_id(c, actor.id)
            if user is None:
                raise NotFound("your account no longer exists")
            if user.suspended:
                raise Suspended(user.suspend_reason)
            quotas.check_size(user, cpu, memory_mb, disk_gb)
            if not arena:
                quotas.check_count(user, q.count_of_owner(c, actor.id))
            if q.by_name(c, name) is not None:
                raise Conflict(f"the name {name!r} is taken; pick another")
            q.insert(c, id=vm_id, name=name, owner_id=actor.id, image=image, cpu=cpu, memory_mb=memory_mb,
                     disk_gb=disk_gb, env=env, runtime=self.runtime.name,
                     tags=(source.tags if source else ()) + ((q.ARENA_TAG,) if arena else ()),
                     id_base=idmap.first_free_base(q.id_bases(c)))
            audit.record(c, actor_id=actor.id, source=actor.source, action="vm.cp" if source else "vm.create",
                         target=name, image=image, cpu=cpu, memory_mb=memory_mb, disk_gb=disk_gb,
                         **({"from": source.name} if source else {}))
            vm = q.by_id(c, vm_id)
            assert vm is not None
            return vm

        return tx

    async def _build(self, actor: Actor, vm: Vm, progress: Callable[[str], Awaitable[None]] | None,
                     source: Vm | None) -> Vm:
        """Make the disk (fresh or copied from ``source``) and boot ``vm``; the row exists, status ``creating``.
        Cancelled (``rm`` during ``new``), it removes what it made, row included: the VM never existed."""
        try:
            await say(progress, f"creating disk for {vm.name} ({vm.disk_gb} GB)")
            if source is not None:
                await self._copy_disk(source, vm, progress)
            else:
                await self.runtime.create(self.spec(vm))
            await self.events.publish(VmEvent("created", vm.id, vm.name))
            await say(progress, f"starting {vm.name}")
            return await self._boot(actor, vm)
        except asyncio.CancelledError:
            await finish(self._discard(vm, "vm.create_cancelled"))
            raise
        except Exception as exc:
            await self._mark_error(vm, exc)
            raise self._as_failure(exc, f"could not create {vm.name}") from exc

    async def _discard(self, vm: Vm, action: str) -> None:
        """Remove a VM that never finished being made: runtime side first, then the row."""
        try:
            await self.runtime.destroy(vm.id)
        except Exception as exc:
            log.error("cleaning up %s (%s) failed: %s", vm.name, vm.id, exc)
            await self._mark_error(vm, exc)
            return

        def tx(c: sa.Connection) -> None:
            q.delete(c, vm.id)
            audit.record(c, actor_id=None, source="system", action=action, target=vm.name)

        await self.store.write(tx)
        await self.events.publish(VmEvent("removed", vm.id, vm.name))

    async def _boot(self, actor: Actor, vm: Vm) -> Vm:
        async with self._start_slots:
            await self.runtime.start(self.spec(vm))
        state = self.runtime.get_state(vm.id)

        def tx(c: sa.Connection) -> Vm:
            q.update(c, vm.id, status=VmStatus.RUNNING, desired="running", runtime_state=state, error="")
            audit.record(c, actor_id=actor.id, source=actor.source, action="vm.start", target=vm.name)
            new = q.by_id(c, vm.id)
            assert new is not None
            return new

        vm = await self.store.write(tx)
        await self.events.publish(VmEvent("started", vm.id, vm.name))
        return vm

    async def _mark_error(self, vm: Vm, exc: BaseException | str) -> None:
        message = exc if isinstance(exc, str) else exc.user_message if isinstance(exc, UssyError) else str(exc)
        log.error("VM %s (%s) failed: %s", vm.name, vm.id, getattr(exc, "log_message", exc))
        telemetry.RUNTIME_ERRORS.labels(self.runtime.name).inc()
        await self.store.write(lambda c: q.update(c, vm.id, status=VmStatus.ERROR, error=message[:2000]))

    @staticmethod
    def _as_failure(exc: BaseException, what: str) -> UssyError:
        if isinstance(exc, UssyError):
            return exc
        return RuntimeFailure(f"{what}: {exc}", log_message=repr(exc))

    async def _current(self, vm: Vm) -> Vm:
        """The row as it is now (inside an operation); NotFound if it was removed meanwhile."""
        now = await self.by_id(vm.id)
        if now is None:
            raise NotFound(f"{vm.name} was removed")
        return now

    async def _owner(self, actor: Actor) -> User:
        """The acting owner as the database has it now (tier, quota, suspension may have changed)."""
        owner = await self.store.read(lambda c: userq.by_id(c, actor.id))
        if owner is None:
            raise NotFound("your account no longer exists")
        if owner.suspended:
            raise Suspended(owner.suspend_reason)
        return owner

    async def start(self, actor: Actor, name: str) -> Vm:
        vm = await self.get(actor, name)
        if vm.status is VmStatus.RUNNING and self.pending(vm.id) is None:
            raise StateError(f"{name} is already running")
        quotas.check_size(await self._owner(actor), vm.cpu, vm.memory_mb, vm.disk_gb)

        async def work() -> Vm:
            now = await self._current(vm)
            if now.status is VmStatus.RUNNING:
                raise StateError(f"{name} is already running")
            check_transition(name, now.status, VmStatus.RUNNING)
            await self.store.write(lambda c: q.update(c, vm.id, desired="running"))
            return await self._start_owned(actor, now, f"could not start {name}")

        return await self.ops.run({vm.id: Pending.STARTING}, work, label=f"start {name}",
                                  join=True)

    async def _start_owned(self, actor: Actor, vm: Vm, what: str) -> Vm:
        """Boot inside an operation. Cancelled (``rm``/``stop`` during it), it stops what it started."""
        try:
            return await self._boot(actor, vm)
        except asyncio.CancelledError:
            await finish(self._halt(vm, "the start was cancelled"))
            raise
        except Exception as exc:
            await self._mark_error(vm, exc)
            raise self._as_failure(exc, what) from exc

    async def _halt(self, vm: Vm, why: str) -> None:
        """Stop the VM in the runtime and record it stopped (a cancelled start's clean-up)."""
        log.info("stopping %s: %s", vm.name, why)
        try:
            await self.runtime.stop(vm.id)
        except Exception as exc:
            await self._mark_error(vm, exc)
            return
        await self.store.write(lambda c: q.update(c, vm.id, status=VmStatus.STOPPED, desired="stopped"))
        await self.events.publish(VmEvent("stopped", vm.id, vm.name))

    async def stop(self, actor: Actor, name: str) -> Vm:
        vm = await self.get(actor, name)
        preempting = self.pending(vm.id) in (Pending.STARTING, Pending.CREATING, Pending.RESTARTING)
        if vm.status is VmStatus.STOPPED and self.pending(vm.id) is None:
            raise StateError(f"{name} is already stopped")

        async def work() -> Vm:
            now = await self._current(vm)
            if now.status is VmStatus.STOPPED and not preempting:
                raise StateError(f"{name} is already stopped")
            await self.store.write(lambda c: q.update(c, vm.id, desired="stopped"))
            await self.runtime.stop(vm.id)

            def tx(c: sa.Connection) -> Vm:
                q.update(c, vm.id, status=VmStatus.STOPPED, desired="stopped")
                audit.record(c, actor_id=actor.id, source=actor.source, action="vm.stop", target=name)
                new = q.by_id(c, vm.id)
                assert new is not None
                return new

            stopped = await self.store.write(tx)
            await self.events.publish(VmEvent("stopped", vm.id, vm.name))
            return stopped

        return await self.ops.run({vm.id: Pending.STOPPING}, work, label=f"stop {name}", preempt=True)

    async def restart(self, actor: Actor, name: str) -> Vm:
        vm = await self.get(actor, name)
        quotas.check_size(await self._owner(actor), vm.cpu, vm.memory_mb, vm.disk_gb)

        async def work() -> Vm:
            now = await self._current(vm)
            await self.store.write(lambda c: q.update(c, vm.id, desired="running"))
            if now.status is VmStatus.RUNNING:
                await self.runtime.stop(vm.id)
                await self.store.write(lambda c: q.update(c, vm.id, status=VmStatus.STOPPED))
                await self.events.publish(VmEvent("stopped", vm.id, vm.name))
                now = await self._current(vm)
            return await self._start_owned(actor, now, f"could not restart {name}")

        return await self.ops.run({vm.id: Pending.RESTARTING}, work, label=f"restart {name}")

    async def remove(self, actor: Actor, name: str) -> None:
        """Delete the VM. A start, create or copy in flight is cancelled first (it cleans up after itself);
        anything else in flight is waited for. The intent is recorded first (``desired = removed``): a server
        killed half-way finishes the removal when it starts again."""
        vm = await self.get(actor, name)

        async def work() -> None:
            now = await self.by_id(vm.id)
            if now is None:
                return  # a cancelled create removed it already
            await self.store.write(lambda c: q.update(c, vm.id, desired=REMOVED))
            try:
                await self.runtime.destroy(vm.id)
            except Exception as exc:
                await self._mark_error(now, exc)
                raise self._as_failure(exc, f"could not remove {name} (run 'rm {name}' again)") from exc

            def tx(c: sa.Connection) -> None:
                q.delete(c, vm.id)
                audit.record(c, actor_id=actor.id, source=actor.source, action="vm.remove", target=name)

            await self.store.write(tx)
            await self.events.publish(VmEvent("removed", vm.id, vm.name))

        await self.ops.run({vm.id: Pending.REMOVING}, work, label=f"rm {name}", preempt=True)

    async def rename(self, actor: Actor, old: str, new: str) -> Vm:
        new = validate_vm_name(new)
        vm = await self.get(actor, old)

        def tx(c: sa.Connection) -> Vm:
            if q.by_name(c, new) is not None:
                raise Conflict(f"the name {new!r} is taken; pick another")
            q.update(c, vm.id, name=new)
            audit.record(c, actor_id=actor.id, source=actor.source, action="vm.rename", target=new, old=old)
            renamed = q.by_id(c, vm.id)
            assert renamed is not None
            return renamed

        async with self.ops.lock(vm.id):
            renamed = await self.store.write(tx)
        await self.events.publish(VmEvent("renamed", vm.id, new, old_name=old))
        return renamed

    async def tag(self, actor: Actor, name: str, tag: str, remove: bool = False) -> bool:
        printable_text(tag, "tag", max_len=40, allow_empty=False)
        if not TAG_RE.fullmatch(tag):
            raise UsageError("a tag is 1-40 characters: lower-case letters, digits, '.', '_' or '-'")
        vm = await self.get(actor, name)

        def tx(c: sa.Connection) -> bool:
            changed = q.remove_tag(c, vm.id, tag) if remove else q.add_tag(c, vm.id, tag)
            if not remove and len(q.by_id(c, vm.id).tags) > 32:  # type: ignore[union-attr]
                raise Conflict("a VM has at most 32 tags")
            if changed:
                audit.record(c, actor_id=actor.id, source=actor.source,
                             action="vm.untag" if remove else "vm.tag", target=name, tag=tag)
            return changed

        return await self.store.write(tx)

    async def close(self, grace: float = 20.0) -> None:
        """Let operations in flight finish (then cancel them: each cleans up after itself)."""
        await self.ops.close(grace)
