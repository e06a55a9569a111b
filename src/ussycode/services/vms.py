"""VM lifecycle: names, quotas, the state machine, and the runtime calls behind them.

The DB row is the truth about what the owner asked for (``desired``) and what we last saw (``status``); the
runtime only does what it is told. Lifecycle calls on one VM are serialised by a per-VM lock; quota checks and
inserts share one write transaction, so parallel ``new`` calls cannot overshoot a quota.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import sqlalchemy as sa

from ussycode.auth.identity import Actor
from ussycode.config import Settings, parse_addr
from ussycode.errors import Conflict, Forbidden, NotFound, RuntimeFailure, StateError, UsageError, UssyError
from ussycode.runtime.base import Runtime
from ussycode.services import quotas
from ussycode.services.events import EventBus, VmEvent
from ussycode.store import audit
from ussycode.store import users as userq
from ussycode.store import vms as q
from ussycode.store.db import Store
from ussycode.store.users import new_id
from ussycode.store.vms import Vm
from ussycode.tasks import TaskGroup
from ussycode.types import RESERVED_NAMES, VM_NAME_RE, VmSpec, VmStatus, check_transition
from ussycode.validate import printable_text

log = logging.getLogger(__name__)

ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
TAG_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,39}$")
MAX_ENV = 64
MAX_ENV_VALUE = 4096
DEFAULT_CPU, DEFAULT_MEMORY_MB, DEFAULT_DISK_GB = 1, 1024, 5

_ADJECTIVES = ("mild", "brave", "calm", "eager", "fuzzy", "gentle", "happy", "jolly", "kind", "lucky", "merry",
               "nimble", "proud", "quiet", "rapid", "shy", "swift", "tidy", "witty", "zesty", "bold", "crisp",
               "dusty", "fancy", "grand", "hazy", "icy", "lively", "misty", "noble", "plucky", "rusty")
_NOUNS = ("owl", "fox", "otter", "panda", "tiger", "koala", "lynx", "heron", "badger", "bison", "crane", "dingo",
          "eagle", "ferret", "gecko", "ibis", "jackal", "lemur", "moose", "newt", "orca", "puffin", "quail",
          "raven", "seal", "tapir", "urchin", "vole", "walrus", "yak", "zebra", "wombat")


class ImageResolver(Protocol):
    def resolve(self, name: str) -> Any: ...


def validate_vm_name(name: str) -> str:
    printable_text(name, "VM name", max_len=30, allow_empty=False)
    if not VM_NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid VM name {name[:40]!r}: use 3-30 characters: lower-case letters, digits and '-', "
            "starting with a letter and not ending with '-'"
        )
    if name in RESERVED_NAMES:
        raise UsageError(f"the name {name!r} is reserved; pick another")
    return name


def parse_env(pairs: list[str]) -> dict[str, str]:
    if len(pairs) > MAX_ENV:
        raise UsageError(f"at most {MAX_ENV} --env values")
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        printable_text(key, "--env name", max_len=64)
        if not sep or not ENV_KEY_RE.fullmatch(key):
            raise UsageError(f"invalid --env {pair[:60]!r}: expected KEY=VALUE with KEY like MY_VAR")
        if key.upper().startswith("USSYCODE_"):
            raise UsageError(f"{key} is set by ussycode and cannot be overridden")
        printable_text(value, f"value of --env {key}", max_len=MAX_ENV_VALUE)
        env[key] = value
    return env


def check_sizes(cpu: int, memory_mb: int, disk_gb: int) -> None:
    if not 1 <= cpu <= 64:
        raise UsageError("--cpu must be between 1 and 64")
    if not 256 <= memory_mb <= 262144:
        raise UsageError("--memory must be between 256 and 262144 (MB)")
    if not 1 <= disk_gb <= 2048:
        raise UsageError("--disk must be between 1 and 2048 (GB)")


class VmService:
    def __init__(self, store: Store, runtime: Runtime, settings: Settings, images: ImageResolver,
                 gateway_public_key: str, events: EventBus, max_parallel_starts: int = 8) -> None:
        self.store = store
        self.runtime = runtime
        self.settings = settings
        self.images = images
        self.gateway_public_key = gateway_public_key
        self.events = events
        self._locks: dict[str, asyncio.Lock] = {}
        self._start_slots = asyncio.Semaphore(max_parallel_starts)
        self._background = TaskGroup("vms")

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
                      disk_gb=vm.disk_gb, env=env, authorized_keys=(self.gateway_public_key,), hostname=vm.name)

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

    def _lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    async def _random_name(self) -> str:
        for _ in range(50):
            name = f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_NOUNS)}"
            if await self.by_name(name) is None:
                return name
        return f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_NOUNS)}-{secrets.token_hex(2)}"

    # Lifecycle ----------------------------------------------------------------------------------------------
    async def create(self, actor: Actor, *, name: str | None = None, image: str | None = None,
                     cpu: int = DEFAULT_CPU, memory_mb: int = DEFAULT_MEMORY_MB, disk_gb: int = DEFAULT_DISK_GB,
                     env: dict[str, str] | None = None, progress: Callable[[str], Awaitable[None]] | None = None,
                     source_vm: Vm | None = None) -> Vm:
        if actor.vm_scope:
            raise Forbidden("this token is scoped to one VM and cannot create VMs")
        name = validate_vm_name(name) if name else await self._random_name()
        image = printable_text(image, "image name", max_len=64) if image else self.settings.default_image
        check_sizes(cpu, memory_mb, disk_gb)
        if source_vm is None:
            try:
                self.images.resolve(image)
            except UssyError:
                raise
            except Exception as exc:  # an image store's own failure is the user's missing image
                raise NotFound(f"no image named {image!r}: {exc}") from None
        vm_id = new_id()

        def tx(c: sa.Connection) -> Vm:
            user = userq.by_id(c, actor.id)
            if user is None:
                raise NotFound("your account no longer exists")
            quotas.check_size(user.trust_level, cpu, memory_mb, disk_gb)
            quotas.check_count(user.trust_level, q.count_of_owner(c, actor.id))
            if q.by_name(c, name) is not None:
                raise Conflict(f"the name {name!r} is taken; pick another")
            q.insert(c, id=vm_id, name=name, owner_id=actor.id, image=image, cpu=cpu, memory_mb=memory_mb,
                     disk_gb=disk_gb, env=env or {}, runtime=self.runtime.name,
                     tags=source_vm.tags if source_vm else ())
            audit.record(c, actor_id=actor.id, source=actor.source, action="vm.cp" if source_vm else "vm.create",
                         target=name, image=image, cpu=cpu, memory_mb=memory_mb, disk_gb=disk_gb,
                         **({"from": source_vm.name} if source_vm else {}))
            vm = q.by_name(c, name)
            assert vm is not None
            return vm

        vm = await self.store.write(tx)

        async def build() -> Vm:
            async with self._lock(vm.id):
                try:
                    if progress:
                        await progress(f"creating disk for {name} ({disk_gb} GB)")
                    if source_vm is not None:
                        await self._copy_disk(actor, source_vm, vm, progress)
                    else:
                        await self.runtime.create(self.spec(vm))
                    await self.events.publish(VmEvent("created", vm.id, vm.name))
                    if progress:
                        await progress(f"starting {name}")
                    return await self._boot(actor, vm)
                except Exception as exc:
                    await self._mark_error(vm, exc)
                    raise self._as_failure(exc, f"could not create {name}") from exc

        return await self._run_to_the_end(build(), f"create {name}")

    async def _run_to_the_end(self, coro: Coroutine[Any, Any, Vm], what: str) -> Vm:
        """Run a lifecycle change to its end even if the caller goes away (a dropped SSH session, an API
        timeout): a half-made VM would otherwise stay ``creating`` with nobody to finish or clean it up."""
        task = self._background.spawn(coro, what)
        return await asyncio.shield(task)

    async def _copy_disk(self, actor: Actor, src: Vm, dst: Vm,
                         progress: Callable[[str], Awaitable[None]] | None) -> None:
        """Copy ``src``'s disk for ``dst``. A runtime that can only copy a stopped disk gets the source stopped
        for the copy and started again afterwards (the caller already holds the source's lock)."""
        try:
            await self.runtime.copy_disk(src.id, self.spec(dst))
            return
        except StateError:
            if await self.runtime.status(src.id) is not VmStatus.RUNNING:
                raise
        if progress:
            await progress(f"stopping {src.name} for the copy (this runtime copies stopped disks only)")
        await self.runtime.stop(src.id)
        try:
            await self.runtime.copy_disk(src.id, self.spec(dst))
        finally:
            if progress:
                await progress(f"starting {src.name} again")
            async with self._start_slots:
                await self.runtime.start(self.spec(src))
            state = self.runtime.get_state(src.id)
            await self.store.write(lambda c: q.update(c, src.id, runtime_state=state))

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

    async def _mark_error(self, vm: Vm, exc: BaseException) -> None:
        message = exc.user_message if isinstance(exc, UssyError) else str(exc)
        log.error("VM %s (%s) failed: %s", vm.name, vm.id, getattr(exc, "log_message", exc))
        await self.store.write(lambda c: q.update(c, vm.id, status=VmStatus.ERROR, error=message[:2000]))

    @staticmethod
    def _as_failure(exc: BaseException, what: str) -> UssyError:
        if isinstance(exc, UssyError):
            return exc
        return RuntimeFailure(f"{what}: {exc}", log_message=repr(exc))

    async def start(self, actor: Actor, name: str) -> Vm:
        vm = await self.get(actor, name)
        async with self._lock(vm.id):
            vm = await self.get(actor, name)
            if vm.status is VmStatus.RUNNING:
                raise StateError(f"{name} is already running")
            check_transition(name, vm.status, VmStatus.RUNNING)
            level = actor.user.trust_level
            owner = await self.store.read(lambda c: userq.by_id(c, actor.id))
            if owner is not None:
                level = owner.trust_level
            quotas.check_size(level, vm.cpu, vm.memory_mb, vm.disk_gb)

            async def boot() -> Vm:
                try:
                    return await self._boot(actor, vm)
                except Exception as exc:
                    await self._mark_error(vm, exc)
                    raise self._as_failure(exc, f"could not start {name}") from exc

            return await self._run_to_the_end(boot(), f"start {name}")

    async def stop(self, actor: Actor, name: str) -> Vm:
        vm = await self.get(actor, name)
        async with self._lock(vm.id):
            vm = await self.get(actor, name)
            if vm.status is VmStatus.STOPPED:
                raise StateError(f"{name} is already stopped")
            await self.runtime.stop(vm.id)

            def tx(c: sa.Connection) -> Vm:
                q.update(c, vm.id, status=VmStatus.STOPPED, desired="stopped")
                audit.record(c, actor_id=actor.id, source=actor.source, action="vm.stop", target=name)
                new = q.by_id(c, vm.id)
                assert new is not None
                return new

            vm = await self.store.write(tx)
        await self.events.publish(VmEvent("stopped", vm.id, vm.name))
        return vm

    async def restart(self, actor: Actor, name: str) -> Vm:
        vm = await self.get(actor, name)
        if vm.status is VmStatus.RUNNING:
            await self.stop(actor, name)
        return await self.start(actor, name)

    async def remove(self, actor: Actor, name: str) -> None:
        vm = await self.get(actor, name)
        async with self._lock(vm.id):
            await self.runtime.destroy(vm.id)

            def tx(c: sa.Connection) -> None:
                q.delete(c, vm.id)
                audit.record(c, actor_id=actor.id, source=actor.source, action="vm.remove", target=name)

            await self.store.write(tx)
        self._locks.pop(vm.id, None)
        await self.events.publish(VmEvent("removed", vm.id, vm.name))

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

        async with self._lock(vm.id):
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

    async def copy(self, actor: Actor, name: str, new_name: str | None = None) -> Vm:
        src = await self.get(actor, name)
        if src.status is VmStatus.CREATING:
            raise StateError(f"{name} is still being created")
        async with self._lock(src.id):
            return await self.create(actor, name=new_name or await self._copy_name(name), image=src.image,
                                     cpu=src.cpu, memory_mb=src.memory_mb, disk_gb=src.disk_gb, env=src.env,
                                     source_vm=src)

    async def _copy_name(self, name: str) -> str:
        for i in range(2, 100):
            candidate = f"{name[:24]}-copy{'' if i == 2 else i}"
            if await self.by_name(candidate) is None:
                return candidate
        return await self._random_name()

    # Reconciliation -------------------------------------------------------------------------------------------
    async def reconcile(self) -> None:
        """Make reality match the DB after a (re)start: re-attach running VMs, boot those that should run."""
        for vm in await self.store.read(q.all_vms):
            try:
                await self._reconcile_one(vm)
            except Exception as exc:
                log.exception("reconciling %s failed", vm.name)
                await self._mark_error(vm, exc)

    async def _reconcile_one(self, vm: Vm) -> None:
        async with self._lock(vm.id):
            if vm.runtime_state:
                await self.runtime.load_state(vm.id, vm.runtime_state)
            actual = await self.runtime.status(vm.id)
            if vm.desired == "running" and actual is not VmStatus.RUNNING:
                log.info("starting %s: it was running before the server stopped", vm.name)
                system = await self._system_actor(vm)
                try:
                    await self._boot(system, vm)
                except Exception as exc:
                    await self._mark_error(vm, exc)
                return
            if actual is VmStatus.RUNNING:
                state = self.runtime.get_state(vm.id)
                await self.store.write(lambda c: q.update(c, vm.id, status=actual, runtime_state=state))
                await self.events.publish(VmEvent("started", vm.id, vm.name))
            elif vm.status is not actual and vm.status is not VmStatus.ERROR:
                await self.store.write(lambda c: q.update(c, vm.id, status=actual))

    async def _system_actor(self, vm: Vm) -> Actor:
        owner = await self.store.read(lambda c: userq.by_id(c, vm.owner_id))
        assert owner is not None
        return Actor(user=owner, source="system")

    async def watch_once(self) -> None:
        """Notice VMs that died behind our back: the DB never claims a dead VM is running."""
        for vm in await self.store.read(q.all_vms):
            if vm.status is not VmStatus.RUNNING or self._lock(vm.id).locked():
                continue
            actual = await self.runtime.status(vm.id)
            if actual is not VmStatus.RUNNING:
                log.warning("VM %s stopped unexpectedly", vm.name)

                def tx(c: sa.Connection, vm: Vm = vm) -> None:
                    q.update(c, vm.id, status=VmStatus.STOPPED, desired="stopped",
                             error="the VM stopped unexpectedly")
                    audit.record(c, actor_id=None, source="system", action="vm.crashed", target=vm.name)

                await self.store.write(tx)
                await self.events.publish(VmEvent("stopped", vm.id, vm.name))

    async def watch(self, interval: float = 3.0) -> None:
        while True:
            try:
                await self.watch_once()
            except Exception:
                log.exception("VM watch failed")
            await asyncio.sleep(interval)
