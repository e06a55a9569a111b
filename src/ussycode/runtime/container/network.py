"""A container VM's network: its namespace (loopback, the VM firewall, slirp4netns egress) and the host's ways
into it (a connected socket or stream to a port on the VM's loopback, a listener inside it, the namespace a port
forwarder enters). Part of :class:`~ussycode.runtime.container.runtime.ContainerRuntime` (a mixin).

The server never routes to guest addresses (DESIGN §4): every socket is made inside the namespace by one dedicated
thread that switches into it, and connected from the server's loop (Caddy's routed hosts:
:mod:`ussycode.proxy.links`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ussycode.errors import RuntimeFailure
from ussycode.runtime import netns
from ussycode.runtime.container.host import reap, run
from ussycode.runtime.container.state import VmState, start_time


class ContainerNetwork:
    if TYPE_CHECKING:  # what the ContainerRuntime this is part of provides
        egress: bool
        _executor: ThreadPoolExecutor | None

        def _vm_dir(self, vm_id: str) -> Path: ...
        def _console(self, vm_id: str) -> Path: ...
        def _running(self, vm_id: str) -> VmState: ...

    async def _setup_netns(self, st: VmState) -> None:
        for argv in netns.setup_argvs(st.netns):
            await run(argv, f"setting up network namespace {st.netns}")
        host = await asyncio.to_thread(netns.host_addresses)
        ruleset = netns.nft_ruleset(host, dns_v4=netns.SLIRP_DNS_V4 if self.egress else None)
        await run(netns.nft_apply_argv(st.netns), "installing the VM firewall", stdin=ruleset)
        if self.egress:
            try:
                st.egress_pid = await self._start_slirp(st)
                st.egress_start = start_time(st.egress_pid)
            except (RuntimeFailure, OSError, ValueError) as exc:
                # Egress is best-effort: the VM still works (and stays isolated) without it.
                with open(self._console(st.vm_id), "a") as f:  # noqa: ASYNC230
                    f.write(f"ussycode: no egress for this VM: {exc}\n")

    async def _start_slirp(self, st: VmState, timeout: float = 10.0) -> int:
        """Start slirp4netns detached from the server (it must outlive it) and wait until the tap is up."""
        read_fd, write_fd = os.pipe()
        argv = netns.slirp4netns_argv(st.netns, write_fd)
        binary = shutil.which(argv[0])
        if binary is None:
            raise RuntimeFailure("slirp4netns is not installed (apt-get install slirp4netns)")
        os.set_inheritable(write_fd, True)
        log = str(self._vm_dir(st.vm_id) / "egress.log")
        try:
            # posix_spawn, not Popen: the process outlives this server on purpose, and no Popen object should
            # be left to complain about it. A new session keeps it out of the server's signals.
            # In a thread: the spawn waits for the child's exec, which a busy host makes slow.
            pid = await asyncio.shield(asyncio.to_thread(
                os.posix_spawn, binary, argv, dict(os.environ), setsid=True, file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
                    (os.POSIX_SPAWN_DUP2, 1, 2),
                ]))
        finally:
            os.close(write_fd)
        # Wait for the ready byte on the loop itself (no thread left blocked in read() on a descriptor that is
        # closed below when the wait times out).
        loop = asyncio.get_running_loop()
        ready_byte: asyncio.Future[bytes] = loop.create_future()

        def readable() -> None:
            if not ready_byte.done():
                try:
                    ready_byte.set_result(os.read(read_fd, 1))
                except BlockingIOError:
                    return
                except OSError:
                    ready_byte.set_result(b"")

        os.set_blocking(read_fd, False)
        loop.add_reader(read_fd, readable)
        try:
            ready = await asyncio.wait_for(ready_byte, timeout)
        except TimeoutError:
            ready = b""
        finally:
            loop.remove_reader(read_fd)
            os.close(read_fd)
        if ready != b"1":
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            await asyncio.to_thread(reap, pid)
            raise RuntimeFailure("slirp4netns did not come up", evidence=f"$ {shlex.join(argv)}")
        return pid

    async def open_socket(self, vm_id: str, port: int) -> socket.socket:
        """A connected socket to 127.0.0.1:``port`` inside the VM's network namespace."""
        return await self._socket(self._running(vm_id), port)

    async def port_netns(self, vm_id: str, port: int) -> Path | None:
        """The VM's own network namespace: the guest shares it, so its loopback is the VM's."""
        return netns.NETNS_DIR / self._running(vm_id).netns

    async def open_connection(self, vm_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP stream to 127.0.0.1:``port`` inside the VM's network namespace."""
        return await self._connect(self._running(vm_id), port)

    async def open_listener(self, vm_id: str, host: str, port: int) -> socket.socket:
        """A listening socket on ``host:port`` inside the VM's network namespace."""
        st = self._running(vm_id)
        if host == netns.METADATA_V4:  # namespaces made before the address was part of the set-up
            await run(["ip", "-n", st.netns, "addr", "replace", f"{host}/32", "dev", "lo"], "adding " + host)
        return await self._in_netns(netns.listen_in_netns, st.netns, host, port)

    async def _socket(self, st: VmState, port: int, timeout: float = 5.0) -> socket.socket:
        sock = await self._in_netns(netns.socket_in_netns, st.netns)  # the thread only makes the socket
        return await netns.connect_socket(sock, "127.0.0.1", port, timeout)

    async def _in_netns(self, fn: Callable[..., socket.socket], *args: Any) -> socket.socket:
        if self._executor is None:
            # One dedicated thread switches namespaces; nothing else ever runs on it.
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ussycode-netns")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except netns.NetnsBroken:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    async def _connect(
        self, st: VmState, port: int, timeout: float = 5.0
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(sock=await self._socket(st, port, timeout))
