"""Starting and waiting for child processes without blocking the event loop.

``fork``/``exec`` of a ~100 MB server waits until the child has exec'd, which on a busy host takes tens of
milliseconds, and every SSH session and proxied request would wait with it. :func:`spawn` starts a child in a
worker thread; :func:`wait` and :func:`communicate` wait for it there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# Threads that start children and wait for them (each waits for one short command at a time).
_POOL = ThreadPoolExecutor(max_workers=32, thread_name_prefix="proc")
PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT


async def spawn(argv: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(argv, **popen)`` in a worker thread. A caller cancelled while the child starts does
    not leave it behind: it is killed (with its process group when ``start_new_session``) once it exists."""
    loop = asyncio.get_running_loop()
    started: asyncio.Future[subprocess.Popen[bytes]] = loop.run_in_executor(
        _POOL, functools.partial(_popen, argv, popen))
    try:
        return await asyncio.shield(started)
    except asyncio.CancelledError:
        def kill_when_started(fut: asyncio.Future[subprocess.Popen[bytes]]) -> None:
            if not fut.cancelled() and fut.exception() is None:
                child = fut.result()
                if popen.get("start_new_session"):
                    kill_group(child.pid)
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                _POOL.submit(_reap, child)
        started.add_done_callback(kill_when_started)
        raise


def _reap(child: subprocess.Popen[bytes]) -> None:
    with child:  # closes its pipes and waits for it
        pass


def _popen(argv: list[str], popen: dict[str, Any]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, **popen)  # noqa: S603 (argv lists, never a shell line)


async def wait(child: subprocess.Popen[bytes], timeout: float | None = None) -> int:
    """The child's exit status (waited for in a worker thread). :raise TimeoutError: still running after
    ``timeout`` seconds (it is left running; the caller decides)."""
    if child.poll() is not None:
        return child.returncode
    loop = asyncio.get_running_loop()
    waited = loop.run_in_executor(_POOL, child.wait)
    return await asyncio.wait_for(asyncio.shield(waited), timeout)


async def communicate(child: subprocess.Popen[bytes], stdin: bytes | None, timeout: float) -> tuple[bytes, bytes]:
    """Feed ``stdin``, collect stdout/stderr to the child's end, within ``timeout`` seconds.

    On a time-out or a cancellation the child and its process group are killed and reaped before this returns.
    :raise TimeoutError: it ran over ``timeout``.
    """
    loop = asyncio.get_running_loop()
    talked = loop.run_in_executor(_POOL, child.communicate, stdin)
    try:
        out, err = await asyncio.wait_for(asyncio.shield(talked), timeout)
    except BaseException:
        if child.returncode is None:  # once reaped, its pid (and group id) may already be another process's
            kill_group(child.pid)
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        with contextlib.suppress(BaseException):
            # The pipes close with the group, so communicate returns and reaps it (unless a grandchild that left
            # the group holds them: then its thread is left to finish on its own).
            await asyncio.wait_for(asyncio.shield(talked), 5)
        raise
    return out or b"", err or b""


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
