"""Lifecycle operations belong to the VM: callers that vanish, rm/stop during a start, copies, the watcher and
reconciliation, over the real VmService and SQLite with the in-memory runtime (its boots are held by events)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ussycode.auth.identity import Actor
from ussycode.config import load_settings
from ussycode.errors import StateError
from ussycode.runtime.fake import FakeRuntime, FakeVm
from ussycode.services.events import EventBus
from ussycode.services.operations import Pending
from ussycode.services.vms import VmService
from ussycode.store import audit
from ussycode.store import users as userq
from ussycode.store import vms as q
from ussycode.store.db import Store
from ussycode.types import VmStatus


class _Images:
    def resolve(self, name: str) -> Any:
        return name


@dataclass
class World:
    store: Store
    runtime: FakeRuntime
    vms: VmService
    actor: Actor
    data_dir: Path

    async def row(self, name: str) -> q.Vm | None:
        return await self.vms.by_name(name)

    def restart(self, **runtime_kw: Any) -> World:
        """A new server on the same DB and host (what survives a kill -9)."""
        runtime = FakeRuntime(self.runtime.host, **runtime_kw)
        vms = VmService(self.store, runtime, self.vms.settings, _Images(), "ssh-ed25519 AAAA gateway",
                        EventBus())
        return World(self.store, runtime, vms, self.actor, self.data_dir)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.migrate()
    user = await store.write(lambda c: userq.create_user(c, "alice", "ssh-ed25519", "AAAA", "SHA256:x"))
    settings = load_settings(data_dir=str(tmp_path / "data"), default_image="img")
    runtime = FakeRuntime()
    vms = VmService(store, runtime, settings, _Images(), "ssh-ed25519 AAAA gateway", EventBus())
    yield World(store, runtime, vms, Actor(user=user, source="ssh"), tmp_path)
    await vms.close(grace=5)
    store.close()


async def _new_stopped(w: World, name: str) -> None:
    await w.vms.create(w.actor, name=name)
    await w.vms.stop(w.actor, name)


async def test_a_start_whose_caller_is_cancelled_runs_to_its_end(world: World) -> None:
    await _new_stopped(world, "web")
    world.runtime.boot_gate = gate = asyncio.Event()
    world.runtime.boot_began.clear()
    caller = asyncio.ensure_future(world.vms.start(world.actor, "web"))
    await world.runtime.boot_began.wait()
    caller.cancel()  # the SSH client hung up / /exec timed out
    with pytest.raises(asyncio.CancelledError):
        await caller
    vm = await world.row("web")
    assert vm is not None and world.vms.pending(vm.id) is Pending.STARTING
    gate.set()
    await _settled(world, vm.id)
    vm = await world.row("web")
    assert vm is not None and vm.status is VmStatus.RUNNING and world.runtime.running() == {vm.id}


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.05, 0.2])
async def test_start_cancelled_then_rm_leaves_no_vm_and_no_row(world: World, delay: float) -> None:
    await _new_stopped(world, "web")
    world.runtime.boot_delay = 0.1
    caller = asyncio.ensure_future(world.vms.start(world.actor, "web"))
    await asyncio.sleep(delay)
    caller.cancel()
    await world.vms.remove(world.actor, "web")
    await asyncio.gather(caller, return_exceptions=True)
    assert world.runtime.running() == set() and world.runtime.host == {}
    assert await world.row("web") is None
    assert world.vms.ops.in_flight() == [] and world.vms.ops._locks == {}


async def test_rm_during_start_cancels_the_start_and_its_caller_hears_why(world: World) -> None:
    await _new_stopped(world, "web")
    world.runtime.boot_gate = asyncio.Event()  # never released: only rm ends this boot
    world.runtime.boot_began.clear()
    starter = asyncio.ensure_future(world.vms.start(world.actor, "web"))
    await world.runtime.boot_began.wait()
    await world.vms.remove(world.actor, "web")
    with pytest.raises(StateError, match="cancelled by 'removing'"):
        await starter
    assert world.runtime.host == {} and await world.row("web") is None


async def test_stop_during_start_cancels_it_and_leaves_the_vm_stopped(world: World) -> None:
    await _new_stopped(world, "web")
    world.runtime.boot_gate = asyncio.Event()
    world.runtime.boot_began.clear()
    starter = asyncio.ensure_future(world.vms.start(world.actor, "web"))
    await world.runtime.boot_began.wait()
    vm = await world.vms.stop(world.actor, "web")
    assert vm.status is VmStatus.STOPPED and vm.desired == "stopped"
    assert world.runtime.running() == set()
    with pytest.raises(StateError):
        await starter


async def test_a_stop_whose_caller_is_cancelled_still_stops(world: World) -> None:
    await world.vms.create(world.actor, name="web")
    world.runtime.stop_gate = gate = asyncio.Event()
    caller = asyncio.ensure_future(world.vms.stop(world.actor, "web"))
    await world.runtime.stop_began.wait()
    caller.cancel()
    gate.set()
    await asyncio.gather(caller, return_exceptions=True)
    vm = await world.row("web")
    assert vm is not None
    await _settled(world, vm.id)
    vm = await world.row("web")
    assert vm is not None and vm.status is VmStatus.STOPPED and world.runtime.running() == set()


async def test_pending_is_visible_and_a_second_start_joins_the_first(world: World) -> None:
    await _new_stopped(world, "web")
    world.runtime.boot_gate = gate = asyncio.Event()
    world.runtime.boot_began.clear()
    first = asyncio.ensure_future(world.vms.start(world.actor, "web"))
    await world.runtime.boot_began.wait()
    second = asyncio.ensure_future(world.vms.start(world.actor, "web"))
    vm = await world.row("web")
    assert vm is not None and world.vms.pending(vm.id) == "starting"
    (op,) = world.vms.ops.in_flight()
    while op.joiners == 0:  # the second caller has joined the boot in flight
        await asyncio.sleep(0.001)
    gate.set()
    a, b = await asyncio.gather(first, second)
    assert a.status is b.status is VmStatus.RUNNING
    assert [c for c in world.runtime.calls if c[0] == "start"].count(("start", vm.id)) == 2  # new + one start
    assert world.vms.pending(vm.id) is None


async def test_copy_whose_caller_is_cancelled_completes_and_holds_the_source(world: World) -> None:
    await world.vms.create(world.actor, name="web")
    world.runtime.copy_gate = gate = asyncio.Event()
    caller = asyncio.ensure_future(world.vms.copy(world.actor, "web", "web-two"))
    await world.runtime.copy_began.wait()
    src = await world.row("web")
    assert src is not None and world.vms.pending(src.id) is Pending.COPYING
    caller.cancel()
    await asyncio.gather(caller, return_exceptions=True)
    # The source's lock is held by the copy, not by the vanished caller: a stop waits for the copy.
    stopper = asyncio.ensure_future(world.vms.stop(world.actor, "web"))
    await asyncio.sleep(0.01)
    assert not stopper.done()
    gate.set()
    await stopper
    dst = await world.row("web-two")
    assert dst is not None and dst.status is VmStatus.RUNNING


async def test_rm_of_the_copy_during_the_copy_restarts_the_source(tmp_path: Path, world: World) -> None:
    world.runtime.copy_needs_stopped_source = True
    await world.vms.create(world.actor, name="web")
    world.runtime.copy_gate = asyncio.Event()
    caller = asyncio.ensure_future(world.vms.copy(world.actor, "web", "web-two"))
    await world.runtime.copy_began.wait()
    await world.vms.remove(world.actor, "web-two")
    with pytest.raises(StateError):
        await caller
    assert await world.row("web-two") is None
    src = await world.row("web")
    assert src is not None and src.status is VmStatus.RUNNING and world.runtime.running() == {src.id}
    assert set(world.runtime.host) == {src.id}


async def test_rm_during_new_removes_what_new_made(world: World) -> None:
    world.runtime.boot_gate = asyncio.Event()
    creator = asyncio.ensure_future(world.vms.create(world.actor, name="web"))
    await world.runtime.boot_began.wait()
    await world.vms.remove(world.actor, "web")
    with pytest.raises(StateError):
        await creator
    assert world.runtime.host == {} and await world.row("web") is None


async def test_the_watcher_never_overrides_an_operation(world: World) -> None:
    await world.vms.create(world.actor, name="web")
    vm = await world.row("web")
    assert vm is not None
    world.runtime.host[vm.id].running = False  # the VM died...
    world.runtime.boot_gate = gate = asyncio.Event()
    world.runtime.boot_began.clear()
    restarter = asyncio.ensure_future(world.vms.restart(world.actor, "web"))  # ...and a restart is under way
    await world.runtime.boot_began.wait()
    await world.vms.watch_once()
    gate.set()
    await restarter
    vm = await world.row("web")
    assert vm is not None and vm.status is VmStatus.RUNNING and vm.error == ""


async def test_the_watcher_marks_a_dead_vm_stopped(world: World) -> None:
    await world.vms.create(world.actor, name="web")
    vm = await world.row("web")
    assert vm is not None
    world.runtime.host[vm.id].running = False
    await world.vms.watch_once()
    vm = await world.row("web")
    assert vm is not None and vm.status is VmStatus.STOPPED and "unexpectedly" in vm.error


async def test_a_running_vm_without_a_row_is_stopped_and_reported(world: World) -> None:
    world.runtime.host["orphan01"] = FakeVm(spec=None, running=True)  # type: ignore[arg-type]
    await world.vms.watch_once()
    assert world.runtime.running() == set()
    entries = await world.store.read(lambda c: audit.recent(c, limit=10))
    assert any(e["action"] == "vm.orphan_stopped" and e["target"] == "orphan01" for e in entries)


async def test_restart_after_a_kill_during_new_undoes_it(world: World) -> None:
    # kill -9 during `new`: the row says "creating", and the host may already run the VM.
    await world.store.write(lambda c: q.insert(c, id="vm0001", name="web", owner_id=world.actor.id, image="img",
                                               cpu=1, memory_mb=512, disk_gb=1, env={}, runtime="fake"))
    world.runtime.host["vm0001"] = FakeVm(spec=None, running=True)  # type: ignore[arg-type]
    again = world.restart()
    await again.vms.reconcile()
    assert await again.row("web") is None and again.runtime.host == {}


async def test_restart_after_a_kill_during_rm_finishes_it(world: World) -> None:
    await world.vms.create(world.actor, name="web")
    vm = await world.row("web")
    assert vm is not None
    await world.store.write(lambda c: q.update(c, vm.id, desired="removed"))  # rm wrote its intent, then died
    again = world.restart()
    await again.vms.reconcile()
    assert await again.row("web") is None and again.runtime.host == {}


async def test_restart_after_a_kill_during_stop_stops_it(world: World) -> None:
    await world.vms.create(world.actor, name="web")
    vm = await world.row("web")
    assert vm is not None
    await world.store.write(lambda c: q.update(c, vm.id, desired="stopped"))  # stop wrote its intent, then died
    again = world.restart()
    await again.vms.reconcile()
    vm = await again.row("web")
    assert vm is not None and vm.status is VmStatus.STOPPED and again.runtime.running() == set()


async def test_restart_after_a_kill_during_start_finishes_the_start(world: World) -> None:
    await _new_stopped(world, "web")
    vm = await world.row("web")
    assert vm is not None
    await world.store.write(lambda c: q.update(c, vm.id, desired="running"))  # start wrote its intent, then died
    again = world.restart()
    ops = await again.vms.begin_reconcile()
    assert again.vms.pending(vm.id) is Pending.STARTING  # re-attaching VMs answer "starting"
    await asyncio.wait([op.task for op in ops])
    vm = await again.row("web")
    assert vm is not None and vm.status is VmStatus.RUNNING and again.runtime.running() == {vm.id}


async def _settled(w: World, vm_id: str) -> None:
    for op in w.vms.ops.in_flight():
        await asyncio.wait([op.task])
    assert w.vms.pending(vm_id) is None
