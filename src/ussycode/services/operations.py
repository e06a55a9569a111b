"""At most one lifecycle operation per VM, owned by the VM and not by whoever asked for it.

A start, stop, copy or removal runs as a task that belongs to the VM (JupyterHub's "pending" state): the task
takes the VM's lock itself and runs to its end even when the caller goes away (an SSH client hangs up, ``/exec``
times out). The caller only waits for the task. So a lock is never released under a running boot, and the next
operation on that VM starts only after the previous one has really ended.

While an operation is in flight, :meth:`Operations.pending` names it (``"starting"``, ``"stopping"``…); ``ls
--json`` shows it. A new operation waits for the one in flight, except that a *preempting* one (``rm``, ``stop``)
first cancels one that is only bringing that VM up (creating, starting, restarting; a copy through its new VM):
that operation's own clean-up undoes what it began, then the preempting operation runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ussycode import telemetry
from ussycode.errors import StateError
from ussycode.tasks import TaskGroup

log = logging.getLogger(__name__)

T = TypeVar("T")


class Pending(enum.StrEnum):
    """What a VM is busy with (``ls --json`` field ``pending``)."""

    CREATING = "creating"
    COPYING = "copying"
    STARTING = "starting"
    STOPPING = "stopping"
    RESTARTING = "restarting"
    REMOVING = "removing"


# What ``rm`` and ``stop`` may cancel on the VM they target: work towards a running VM, which cleans up after
# itself. A copy is cancelled only through its new VM (``rm`` of the copy), never by acting on its source.
PREEMPTIBLE = frozenset({Pending.CREATING, Pending.STARTING, Pending.RESTARTING})


@dataclass
class Operation:
    kinds: dict[str, Pending]
    label: str
    task: asyncio.Task[Any]
    cancelled_by: Pending | None = None
    joiners: int = 0

    def cancel(self, by: Pending) -> None:
        """Ask the operation to stop (once: a second cancel would interrupt its clean-up)."""
        if self.cancelled_by is None and not self.task.done():
            self.cancelled_by = by
            self.task.cancel()


class _CountedLock:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class Operations:
    """The per-VM operation table and locks of one server."""

    def __init__(self, owner: str = "vm-ops") -> None:
        self._tasks = TaskGroup(owner)
        self._ops: dict[str, Operation] = {}
        self._locks: dict[str, _CountedLock] = {}

    # --- locks -----------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lock(self, vm_id: str) -> AsyncIterator[None]:
        """The VM's lock. Entries are reference-counted, so one is dropped only when nobody holds or awaits it
        (dropping a lock someone waits on would let two holders in)."""
        entry = self._locks.get(vm_id)
        if entry is None:
            entry = self._locks[vm_id] = _CountedLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0 and self._locks.get(vm_id) is entry:
                del self._locks[vm_id]

    def busy(self, vm_id: str) -> bool:
        """True while an operation is in flight or someone holds the VM's lock."""
        entry = self._locks.get(vm_id)
        return vm_id in self._ops or (entry is not None and entry.lock.locked())

    # --- operations ------------------------------------------------------------------------------------
    def pending(self, vm_id: str) -> Pending | None:
        op = self._ops.get(vm_id)
        return op.kinds.get(vm_id) if op is not None and not op.task.done() else None

    def in_flight(self) -> list[Operation]:
        return list({id(op): op for op in self._ops.values() if not op.task.done()}.values())

    async def _wait_turn(self, kinds: Mapping[str, Pending], *, preempt: bool, join: bool) -> Operation | None:
        """Wait until no operation is in flight on any of these VMs (cancelling what ``preempt`` allows).
        With ``join``, an operation of the same kind already in flight on the same VM is returned instead."""
        me = next(iter(kinds.values()))
        while True:
            busy = {id(op): op for i in kinds if (op := self._ops.get(i)) is not None and not op.task.done()}
            if not busy:
                return None
            for op in busy.values():
                if join and all(op.kinds.get(i) is k for i, k in kinds.items()):
                    op.joiners += 1
                    return op
                if preempt and any(op.kinds.get(i) in PREEMPTIBLE for i in kinds):
                    op.cancel(by=me)
            await asyncio.wait([op.task for op in busy.values()])

    def submit(self, kinds: Mapping[str, Pending], work: Callable[[], Awaitable[T]], *, label: str) -> Operation:
        """Start ``work`` now as the operation of these VMs (the caller checked that none is in flight)."""
        ids = sorted(kinds)

        verb = label.split(" ", 1)[0]

        async def body() -> T:
            started, outcome = time.monotonic(), "error"
            try:
                with telemetry.span(f"vm {verb}", op=verb, vms=len(ids)):
                    async with contextlib.AsyncExitStack() as stack:
                        for vm_id in ids:  # in a fixed order: two multi-VM operations never deadlock
                            await stack.enter_async_context(self.lock(vm_id))
                        result = await work()
                outcome = "ok"
                return result
            except asyncio.CancelledError:
                outcome = "cancelled"
                raise
            finally:
                telemetry.VM_OPERATIONS.labels(verb, outcome).observe(time.monotonic() - started)

        task = self._tasks.spawn(body(), f"{next(iter(kinds.values()))} {label}")
        op = Operation(dict(kinds), label, task)
        for vm_id in ids:
            self._ops[vm_id] = op

        def forget(_: asyncio.Task[Any]) -> None:
            for vm_id in ids:
                if self._ops.get(vm_id) is op:
                    del self._ops[vm_id]

        task.add_done_callback(forget)
        return op

    async def run(self, kinds: Mapping[str, Pending], work: Callable[[], Awaitable[T]], *, label: str,
                  preempt: bool = False, join: bool = False) -> T:
        """Run ``work`` as the VMs' operation and wait for its result.

        Cancelling the caller does not cancel the operation (it belongs to the VM). If another operation cancels
        this one (``rm`` during a start), the caller gets a :class:`StateError` saying so.
        """
        joined = await self._wait_turn(kinds, preempt=preempt, join=join)
        op = joined or self.submit(kinds, work, label=label)
        result: T = await self.wait(op)
        return result

    @staticmethod
    async def wait(op: Operation) -> Any:
        try:
            return await asyncio.shield(op.task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if op.task.cancelled() and op.cancelled_by is not None and (me is None or me.cancelling() == 0):
                raise StateError(f"{op.label}: cancelled by '{op.cancelled_by}' before it finished") from None
            raise

    async def close(self, grace: float = 20.0) -> None:
        """Let operations in flight finish for ``grace`` seconds, then cancel them (their clean-up runs)."""
        tasks = [op.task for op in self.in_flight()]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        await self._tasks.close(timeout=grace)


async def say(progress: Callable[[str], Awaitable[None]] | None, message: str) -> None:
    """Progress for whoever asked; they may have hung up, which must not stop the operation."""
    if progress is not None:
        try:
            await progress(message)
        except Exception as exc:  # noqa: BLE001 - a gone caller's channel
            log.debug("progress not delivered: %s", exc)


async def finish(coro: Coroutine[Any, Any, None]) -> None:
    """Run a clean-up to its end even if the task running it is cancelled again meanwhile."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise
