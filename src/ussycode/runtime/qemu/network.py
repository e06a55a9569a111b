"""The VM's network namespace, made with :mod:`ussycode.runtime.netns` (same isolation as the container runtime).

QEMU runs inside the namespace; the guest's user-mode network (slirp) opens its outbound sockets there, so the
namespace's nftables rules decide what the guest can reach (no host services, no other VMs, no private ranges),
and ``hostfwd`` listeners sit on the namespace's own loopback, reachable only through
:func:`~ussycode.runtime.netns.connect_in_netns`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from ussycode.errors import RuntimeFailure
from ussycode.runtime import netns
from ussycode.runtime.proc import run as run_command


async def _run(argv: list[str], stdin: bytes | None = None, timeout: float = 30.0) -> tuple[int, str]:
    done = await run_command(argv, timeout=timeout, stdin=stdin)
    return done.returncode, done.output


async def ensure_netns(name: str, *, egress: bool, pasta_pidfile: Path) -> None:
    """Create namespace ``name`` with its firewall (and pasta egress) unless it exists.

    :raise RuntimeFailure: a step failed (its command and output are the evidence).
    """
    if not netns.exists(name):
        for argv in netns.setup_argvs(name):
            code, out = await _run(argv)
            if code != 0:
                await remove_netns(name, pasta_pidfile)
                raise RuntimeFailure("could not create the VM's network namespace", evidence=f"$ {argv}\n{out}")
        ruleset = netns.nft_ruleset(await asyncio.to_thread(netns.host_addresses))
        code, out = await _run(netns.nft_apply_argv(name), ruleset.encode())
        if code != 0:
            await remove_netns(name, pasta_pidfile)
            raise RuntimeFailure("could not install the VM's firewall", evidence=f"{ruleset}\n{out}")
    if egress and _pid_alive(pasta_pidfile) is None:
        argv = netns.pasta_argv(name, pasta_pidfile)
        code, out = await _run(argv)
        if code != 0:
            raise RuntimeFailure("could not start egress (pasta) for the VM", evidence=f"$ {argv}\n{out}")


def _pid_alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


async def remove_netns(name: str, pasta_pidfile: Path) -> None:
    pid = _pid_alive(pasta_pidfile)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    _unlink(pasta_pidfile)
    if netns.exists(name):
        await _run(["ip", "netns", "delete", name])


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def exec_prefix(name: str) -> list[str]:
    """argv prefix running a command inside the namespace (network only: files and pids stay the host's)."""
    return ["nsenter", f"--net={netns.NETNS_DIR / name}", "--"]
