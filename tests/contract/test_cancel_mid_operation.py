"""A caller cancelled mid-``start``, mid-``copy`` and mid-``stop`` does not cut the operation short, on every
runtime: the VM's operation runs to its end and the DB agrees with the runtime afterwards.

Real VMs: the container runtime for every case; QEMU (TCG here, slow) for ``start`` only, since the control
plane's code path is the same for all three; Firecracker skips with the doctor's reason where it cannot run.
The same cases run against the in-memory runtime in ``tests/unit/test_vm_operations.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from ussycode.auth.identity import Actor
from ussycode.config import load_settings
from ussycode.runtime.base import Runtime
from ussycode.runtime.images import ImageStore
from ussycode.services.events import EventBus
from ussycode.services.operations import Pending
from ussycode.services.vms import VmService
from ussycode.store import users as userq
from ussycode.store.db import Store
from ussycode.types import VmStatus

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


@dataclass
class Control:
    vms: VmService
    actor: Actor
    runtime: Runtime


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def control(runtime: Runtime, runtime_workdir: Path, image_store: ImageStore) -> AsyncIterator[Control]:
    store = Store(f"sqlite:///{runtime_workdir / f'control-{runtime.name}.db'}")
    store.migrate()
    user = await store.write(lambda c: userq.create_user(c, "canceller", "ssh-ed25519", "AAAA", "SHA256:c"))
    settings = load_settings(data_dir=str(runtime_workdir / f"data-{runtime.name}"), default_image="ussyuntu-mini")
    vms = VmService(store, runtime, settings, image_store, "ssh-ed25519 AAAA gateway", EventBus())
    yield Control(vms, Actor(user=user, source="ssh"), runtime)
    for vm in await vms.list(Actor(user=user, source="ssh")):
        await vms.remove(Actor(user=user, source="ssh"), vm.name)
    await vms.close(grace=30)
    store.close()


async def _cancel_once_pending(c: Control, call: asyncio.Future[object], vm_name: str, kind: Pending) -> None:
    """Cancel ``call`` (the caller) as soon as its operation is in flight on ``vm_name``."""
    vm = None
    for _ in range(20000):
        vm = vm or await c.vms.by_name(vm_name)
        if vm is not None and c.vms.pending(vm.id) is kind:
            break
        assert not call.done(), call
        await asyncio.sleep(0.001)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


async def _settle(c: Control) -> None:
    for op in c.vms.ops.in_flight():
        await asyncio.wait([op.task])


async def _agrees(c: Control, name: str, status: VmStatus) -> None:
    vm = await c.vms.by_name(name)
    assert vm is not None and vm.status is status and c.vms.pending(vm.id) is None
    assert await c.runtime.status(vm.id) is status


async def test_caller_cancelled_mid_start(control: Control) -> None:
    c = control
    await c.vms.create(c.actor, name="cancel-start")
    await c.vms.stop(c.actor, "cancel-start")
    call = asyncio.ensure_future(c.vms.start(c.actor, "cancel-start"))
    await _cancel_once_pending(c, call, "cancel-start", Pending.STARTING)
    await _settle(c)
    await _agrees(c, "cancel-start", VmStatus.RUNNING)
    await c.vms.remove(c.actor, "cancel-start")


async def test_caller_cancelled_mid_stop(control: Control) -> None:
    c = control
    if c.runtime.name != "container":
        pytest.skip(f"{c.runtime.name}: one real boot per runtime (mid-start); the fake runtime covers the rest")
    await c.vms.create(c.actor, name="cancel-stop")
    call = asyncio.ensure_future(c.vms.stop(c.actor, "cancel-stop"))
    await _cancel_once_pending(c, call, "cancel-stop", Pending.STOPPING)
    await _settle(c)
    await _agrees(c, "cancel-stop", VmStatus.STOPPED)
    await c.vms.remove(c.actor, "cancel-stop")


async def test_caller_cancelled_mid_copy(control: Control) -> None:
    c = control
    if c.runtime.name != "container":
        pytest.skip(f"{c.runtime.name}: one real boot per runtime (mid-start); the fake runtime covers the rest")
    await c.vms.create(c.actor, name="cancel-src")
    call = asyncio.ensure_future(c.vms.copy(c.actor, "cancel-src", "cancel-dst"))
    await _cancel_once_pending(c, call, "cancel-src", Pending.COPYING)
    await _settle(c)
    await _agrees(c, "cancel-src", VmStatus.RUNNING)
    await _agrees(c, "cancel-dst", VmStatus.RUNNING)
    assert set(await c.runtime.list_vms()) >= {
        vm.id for vm in await c.vms.list(c.actor) if vm.name in ("cancel-src", "cancel-dst")}
    await c.vms.remove(c.actor, "cancel-dst")
    await c.vms.remove(c.actor, "cancel-src")


async def test_a_failed_copy_never_leaves_the_source_frozen(control: Control,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    c = control
    if c.runtime.name != "container":
        pytest.skip("only the container runtime freezes a running source (fsfreeze) for a copy")
    from ussycode.runtime.container import runtime as container_runtime

    await c.vms.create(c.actor, name="frozen-src")

    def copy_fails(src: Path, dst: Path) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(container_runtime.disks, "copy_disk", copy_fails)
    with pytest.raises(Exception, match="disk full"):
        await c.vms.copy(c.actor, "frozen-src", "frozen-dst")
    src = await c.vms.by_name("frozen-src")
    assert src is not None
    done = await c.runtime.exec(src.id, ["sh", "-c", "echo still-writable > ~/probe && cat ~/probe"], timeout=10)
    assert done.exit_status == 0 and done.stdout.strip() == b"still-writable"
    assert await c.vms.by_name("frozen-dst") is not None  # the failed copy stays listed, in error, until rm
    await c.vms.remove(c.actor, "frozen-dst")
    await c.vms.remove(c.actor, "frozen-src")
