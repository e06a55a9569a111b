"""Every waited-for subprocess has a timeout, and a timeout or a cancelled caller leaves no process behind."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from ussycode.errors import RuntimeFailure
from ussycode.runtime.proc import run, run_sync


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


async def test_output_and_status() -> None:
    done = await run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10)
    assert done.returncode == 3 and "out" in done.output and "err" in done.output
    with pytest.raises(RuntimeFailure, match=r"exit 3") as info:
        await run(["sh", "-c", "exit 3"], timeout=10, what="the step", check=True)
    assert "$ sh -c 'exit 3'" in info.value.evidence


async def test_a_timeout_kills_the_command_and_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(RuntimeFailure, match="timed out") as info:
        await run(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], timeout=0.5, what="a hung step")
    assert time.monotonic() - started < 10 and info.value.reason == "timeout"
    child = int(pidfile.read_text())
    for _ in range(100):
        if _gone(child):
            break
        await asyncio.sleep(0.02)
    assert _gone(child)


async def test_a_cancelled_caller_leaves_no_process(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    task = asyncio.ensure_future(run(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"], timeout=60))
    while not pidfile.exists() or not pidfile.read_text().strip():
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _gone(int(pidfile.read_text()))


def test_run_sync_times_out() -> None:
    with pytest.raises(RuntimeFailure, match="timed out"):
        run_sync(["sleep", "5"], timeout=0.2)
    assert run_sync(["true"], timeout=5).returncode == 0


async def test_cancelled_while_starting_leaves_no_process(tmp_path: Path) -> None:
    """The child is started in a thread; a caller cancelled before it exists still gets it killed."""
    pidfile = tmp_path / "pid"
    task = asyncio.ensure_future(run(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"], timeout=60))
    await asyncio.sleep(0)  # the thread is starting the child now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(250):
        if pidfile.exists() and pidfile.read_text().strip() and _gone(int(pidfile.read_text())):
            break
        await asyncio.sleep(0.02)
    assert not pidfile.exists() or not pidfile.read_text().strip() or _gone(int(pidfile.read_text()))

