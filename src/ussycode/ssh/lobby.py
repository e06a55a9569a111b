"""The lobby: registration, the ``ussy>`` prompt and one-shot commands, all through the command registry."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import asyncssh
from asyncssh.process import SSHServerProcess

from ussycode import telemetry
from ussycode.auth.identity import Actor
from ussycode.commands.context import CommandContext, Output
from ussycode.commands.registry import dispatch, render_error, split_async
from ussycode.errors import Forbidden, RateLimited, Suspended, UsageError, UssyError
from ussycode.ssh.passthrough import connect_to_vm, forward

if TYPE_CHECKING:
    from ussycode.ssh.server import ConnState, Gateway

log = logging.getLogger(__name__)
PROMPT = "ussy> "
HANDLE_ATTEMPTS = 5


class Lobby:
    def __init__(self, gateway: Gateway, state: ConnState) -> None:
        self.gateway = gateway
        self.state = state
        self.services = gateway.services

    # I/O helpers -----------------------------------------------------------------------------------------
    def _out(self, process: SSHServerProcess[Any], text: str) -> None:
        process.stdout.write(text)

    def _err(self, process: SSHServerProcess[Any], text: str) -> None:
        # On a terminal, errors share stdout so they stay in order with the prompt.
        (process.stdout if process.term_type else process.stderr).write(text)

    async def _readline(self, process: SSHServerProcess[Any]) -> str | None:
        """One line from the person; None at EOF (Ctrl-D) or hang-up. Ctrl-C gives an empty line."""
        while True:
            try:
                line: str = await process.stdin.readline()
            except (asyncssh.TerminalSizeChanged, asyncssh.SignalReceived):
                continue
            except asyncssh.BreakReceived:
                return ""
            except (asyncssh.Error, ConnectionError, asyncio.IncompleteReadError):
                return None
            if line == "":
                return None
            return line.rstrip("\r\n")

    # Entry ------------------------------------------------------------------------------------------------
    async def run(self, process: SSHServerProcess[Any]) -> None:
        key = self.state.key
        assert key is not None
        if not self.gateway.sessions.acquire(key.fingerprint):
            self._err(process, "error: too many concurrent sessions for this key; close some and retry\n")
            process.exit(1)
            return
        self.gateway.live.add(process)
        telemetry.SSH_SESSIONS.labels("lobby").inc()
        try:
            status = await self._run(process)
        except (asyncssh.Error, ConnectionError, BrokenPipeError):
            status = 255
        finally:
            self.gateway.live.discard(process)
            telemetry.SSH_SESSIONS.labels("lobby").dec()
            self.gateway.sessions.release(key.fingerprint)
        try:
            process.exit(status)
        except (asyncssh.Error, OSError):
            pass

    async def _run(self, process: SSHServerProcess[Any]) -> int:
        if process.subsystem:
            self._err(process, f"error: the lobby has no {process.subsystem[:20]} subsystem; "
                               "use <vm>@host for sftp\n")
            return 1
        if self.state.user is None:
            if process.command is not None:
                return await self._register_oneshot(process, process.command)
            if not await self._register_interactive(process):
                return 1
        user = self.state.user
        if user is not None and user.suspended:
            # Says so and offers nothing else (no prompt, no command, no VM).
            self._err(process, f"error: {Suspended(user.suspend_reason).user_message}\n")
            return 1
        if process.command is not None:
            return await self.run_line(process, process.command, interactive=False)
        return await self._repl(process)

    def _already_registered(self, process: SSHServerProcess[Any]) -> int:
        user = self.state.user
        assert user is not None
        self._err(process, f"error: this key is already registered as {user.handle}\n")
        return 1

    # Registration ------------------------------------------------------------------------------------------
    async def _register(self, process: SSHServerProcess[Any], handle: str) -> bool | None:
        """True: registered. False: refused, another handle may do (taken, invalid). None: refused for good in
        this session (registration closed, rate limited)."""
        key = self.state.key
        assert key is not None
        try:
            self.state.user = await self.services.users.register(handle, key, address=self.state.address)
        except (Forbidden, RateLimited) as exc:
            log.info("registration from %s refused: %s", self.state.peer, exc.reason)
            self._err(process, f"error: {exc.user_message}\n")
            return None
        except UssyError as exc:
            self._err(process, f"error: {exc.user_message}\n")
            return False
        user = self.state.user
        self._out(process, f"welcome, {user.handle}. you're in (trust level: {user.trust_level}).\n")
        return True

    async def _refused_up_front(self, process: SSHServerProcess[Any]) -> bool:
        """Refuse before asking anything when registration is closed or over its limits right now."""
        try:
            if not await self.services.users.registration_open():
                assert self.services.users.gate is not None
                raise self.services.users.gate.refuse_closed()
            self.services.users.check_registration_limits(self.state.address)
        except (Forbidden, RateLimited) as exc:
            log.info("registration from %s refused: %s", self.state.peer, exc.reason)
            self._err(process, f"error: {exc.user_message}\n")
            return True
        return False

    async def _register_oneshot(self, process: SSHServerProcess[Any], command: str) -> int:
        try:
            argv = await split_async(command)
        except UsageError as exc:
            self._err(process, f"error: {exc.user_message}\n")
            return 2
        if not argv or argv[0] != "register":
            if not await self.services.users.registration_open():
                self._err(process, "error: unregistered key; registration is closed on this server: ask an admin "
                                   "to add your key\n")
            else:
                self._err(process, "error: unregistered key; run 'register <handle>'\n")
            return 1
        if len(argv) != 2:
            self._err(process, "error: usage: register <handle>\n")
            return 2
        return 0 if await self._register(process, argv[1]) else 1

    async def _register_interactive(self, process: SSHServerProcess[Any]) -> bool:
        if await self._refused_up_front(process):
            return False
        self._out(process, "welcome to ussycode. this key is new here: pick a handle to register it.\n"
                           "handles are 2-20 characters: a-z, 0-9 and '-', starting with a letter.\n")
        for _ in range(HANDLE_ATTEMPTS):
            self._out(process, "handle: ")
            line = await self._readline(process)
            if line is None:
                self._out(process, "\ncancelled.\n")
                return False
            done = await self._register(process, line)
            if done is not None:
                if done:
                    return True
                continue
            return False
        self._err(process, "error: too many attempts\n")
        return False

    # Commands ------------------------------------------------------------------------------------------------
    def _actor(self) -> Actor:
        user = self.state.user
        assert user is not None
        return Actor(user=user, source="ssh", fingerprint=self.state.key.fingerprint if self.state.key else None)

    async def run_line(self, process: SSHServerProcess[Any], line: str, *, interactive: bool) -> int:
        out = Output(write=lambda s: self._out(process, s), write_err=lambda s: self._err(process, s))

        async def prompt(question: str) -> str | None:
            self._out(process, question)
            return await self._readline(process)

        async def attach(vm_name: str, command: str | None) -> int:
            vm = await self.services.vms.by_name(vm_name)
            assert vm is not None
            conn = await connect_to_vm(self.gateway, vm.id, vm.name)
            chan: Any = process.channel  # the line-editor channel: raw mode while the VM owns the terminal
            if process.term_type:
                chan.set_line_mode(False)
                chan.set_echo(False)
            try:
                return await forward(conn, process, command=command, keep_open=process.command is None)
            finally:
                conn.close()
                if process.term_type:
                    chan.set_line_mode(True)
                    chan.set_echo(True)

        async def read_secret(question: str) -> str | None:
            """Interactive: prompt with echo off. Otherwise the first line of stdin (at most 8 KiB, 30 s)."""
            if interactive:
                chan: Any = process.channel
                self._out(process, question)
                chan.set_echo(False)
                try:
                    return await self._readline(process)
                finally:
                    chan.set_echo(True)
                    self._out(process, "\n")
            try:
                line = await asyncio.wait_for(process.stdin.readline(), 30)
            except (TimeoutError, asyncssh.Error, ConnectionError, asyncio.IncompleteReadError):
                return None
            return str(line)[:8192].rstrip("\r\n") if line else None

        width = process.get_terminal_size()[0] if process.term_type else None
        ctx = CommandContext(actor=self._actor(), services=self.services, out=out, interactive=interactive,
                             prompt=prompt, attach=attach, read_secret=read_secret, width=width or None)
        telemetry.request_id.set(telemetry.new_request_id())  # this command's log lines share it
        try:
            argv = await split_async(line)
            if argv and argv[0] == "register":
                return self._already_registered(process)
            return await dispatch(ctx, argv)
        except Exception as exc:  # every failure is rendered; the session goes on
            text, status = render_error(exc)
            self._err(process, text + "\n")
            return status

    async def _repl(self, process: SSHServerProcess[Any]) -> int:
        user = self.state.user
        assert user is not None
        count = await self.services.users.vm_count(user.id)
        self._out(process, f"~ ussycode ~\nwelcome back, {user.handle}. you have {count} VM"
                           f"{'' if count == 1 else 's'}. type 'help' for commands, 'exit' to leave.\n")
        while True:
            self._out(process, PROMPT)
            line = await self._readline(process)
            if line is None:
                self._out(process, "\ngoodbye.\n")
                return 0
            line = line.strip()
            if not line:
                continue
            if line in ("exit", "quit", "logout"):
                self._out(process, "goodbye.\n")
                return 0
            await self.run_line(process, line, interactive=True)
