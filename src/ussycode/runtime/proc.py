"""Running host commands: every subprocess the server waits for has a timeout.

Lifecycle operations hold a VM's lock while they run ``ip``, ``nft``, ``fsfreeze``, ``mkfs``…; one hung command
must not hold that VM (or the server) forever. :func:`run` kills the command's whole process group when its time
is up or when the caller is cancelled, and reports the command line as evidence. :func:`run_sync` is the same for
code that already runs in a worker thread. Long-lived children (a VM, Caddy) are started elsewhere and are not
"waited for".

Nothing here forks on the event loop (see :mod:`ussycode.spawn`).
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from ussycode.errors import RuntimeFailure
from ussycode.spawn import DEVNULL, PIPE, STDOUT, communicate, spawn, wait

__all__ = ["DEVNULL", "PIPE", "STDOUT", "Completed", "as_guest_priority", "communicate", "run", "run_sync", "spawn",
           "wait"]

DEFAULT_TIMEOUT = 60.0
# Every process of a VM (its init and all it starts, commands run in it, a VMM) runs at this niceness: on a busy
# host the control plane (the server, Caddy, the forwarders) gets the CPU first, so the lobby and the front door
# stay responsive while VMs boot or compute. VMs are equal among themselves; a guest cannot raise its priority
# (that needs CAP_SYS_NICE in the host's user namespace).
GUEST_NICENESS = 10


def as_guest_priority(argv: list[str]) -> list[str]:
    """``argv`` started at the VMs' niceness (coreutils ``nice``; its children inherit it)."""
    return ["nice", "-n", str(GUEST_NICENESS), *argv]


@dataclass(frozen=True)
class Completed:
    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def output(self) -> str:
        """stdout and stderr as text (stderr is merged into stdout when ``merge_stderr``)."""
        return (self.stdout + self.stderr).decode(errors="replace")


def _evidence(argv: list[str], output: str) -> str:
    return f"$ {shlex.join(argv)}\n{output[-2000:]}".rstrip()


async def run(argv: list[str], *, timeout: float, what: str = "", stdin: bytes | None = None, check: bool = False,
              merge_stderr: bool = True, env: Mapping[str, str] | None = None) -> Completed:
    """Run ``argv`` to its end or for ``timeout`` seconds, whichever is first.

    :raise RuntimeFailure: it timed out (it and its children are killed), or ``check`` and it failed.
    """
    proc = await spawn(
        argv,
        stdin=PIPE if stdin is not None else DEVNULL,
        stdout=PIPE,
        stderr=STDOUT if merge_stderr else PIPE,
        start_new_session=True,  # its own process group: a timeout kills its children too
        env=dict(env) if env is not None else None,
    )
    try:
        out, err = await communicate(proc, stdin, timeout)
    except TimeoutError:
        raise RuntimeFailure(f"{what or argv[0]} timed out after {timeout:.0f} s",
                             evidence=_evidence(argv, ""), reason="timeout") from None
    result = Completed(argv, proc.returncode or 0, out or b"", err or b"")
    if check and result.returncode != 0:
        raise RuntimeFailure(f"{what or argv[0]} failed (exit {result.returncode})",
                             evidence=_evidence(argv, result.output))
    return result


def run_sync(argv: list[str], *, timeout: float, what: str = "", check: bool = False,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
    """:func:`run` for code already in a worker thread (text mode)."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeFailure(f"{what or argv[0]} timed out after {timeout:.0f} s", evidence=_evidence(argv, ""),
                             reason="timeout") from None
    if check and proc.returncode != 0:
        raise RuntimeFailure(f"{what or argv[0]} failed (exit {proc.returncode})",
                             evidence=_evidence(argv, proc.stderr or proc.stdout))
    return proc
