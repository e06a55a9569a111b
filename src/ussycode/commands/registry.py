"""Command registration, argument parsing and dispatch.

A command is an async function ``(ctx, args) -> int`` registered with :func:`command`, which also declares its
argparse arguments. Every frontend calls :func:`dispatch` with the raw command line: it is split like a POSIX
shell, parsed, rate limited and run; :class:`~ussycode.errors.UssyError` propagates for the frontend to render.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import logging
import re
import shlex
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import NoReturn

from ussycode import telemetry
from ussycode.auth.policy import Action, can
from ussycode.commands.context import CommandContext
from ussycode.errors import (
    CommandNotPermitted,
    Forbidden,
    NotFound,
    RuntimeFailure,
    Suspended,
    UsageError,
    UssyError,
)

log = logging.getLogger(__name__)
MAX_LINE = 64 * 1024
_PLAIN_LINE = re.compile(r"[\w \t\r\n.,:/=@%+-]*", re.ASCII)
Handler = Callable[[CommandContext, argparse.Namespace], Awaitable[int]]


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, usage=self.format_usage().strip())

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError(message or "invalid arguments", usage=self.format_usage().strip())


@dataclass
class Command:
    name: str
    summary: str
    handler: Handler
    parser: _Parser
    group: str = "basics"
    interactive_only: bool = False
    admin_only: bool = False
    aliases: tuple[str, ...] = ()
    text_flags: tuple[str, ...] = ()
    _bare: argparse.Namespace | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @property
    def usage(self) -> str:
        return self.parser.format_usage().strip().removeprefix("usage: ")

    @functools.cached_property
    def options(self) -> frozenset[str]:
        """Every option of the command, its subcommands' included (the parser never changes)."""
        return frozenset(option_strings(self.parser))

    def parse(self, args: list[str]) -> argparse.Namespace:
        """The command's arguments (the words after its name), free-text flags gathered first.

        A bare command (no words) always parses to the same defaults, so that first result is copied afterwards
        (argparse hands out its default objects themselves on every parse too); not when a default is a string
        argparse converts at each parse."""
        if not args and self._bare is not None:
            return argparse.Namespace(**vars(self._bare))
        if self.text_flags:
            args = gather_text(args, self.text_flags, self.options)
        ns = self.parser.parse_args(args)
        if not args and self._fixed_defaults:
            self._bare = argparse.Namespace(**vars(ns))
        return ns

    @functools.cached_property
    def _fixed_defaults(self) -> bool:
        return not any(isinstance(a.default, str) and a.type is not None for a in self.parser._actions)


REGISTRY: dict[str, Command] = {}
_ALIASES: dict[str, str] = {}


def command(name: str, summary: str, *, group: str = "basics", interactive_only: bool = False,
            admin_only: bool = False, aliases: tuple[str, ...] = (), text_flags: tuple[str, ...] = (),
            args: Callable[[argparse.ArgumentParser], None] | None = None) -> Callable[[Handler], Handler]:
    """Register a command. ``text_flags`` take free text that may arrive unquoted (see :func:`gather_text`)."""
    def register(handler: Handler) -> Handler:
        parser = _Parser(prog=name, description=summary, add_help=False, allow_abbrev=False)
        parser.add_argument("-h", "--help", action="store_true", help="show this help")
        if args:
            args(parser)
        REGISTRY[name] = Command(name, summary, handler, parser, group, interactive_only, admin_only, aliases,
                                 text_flags)
        for alias in aliases:
            _ALIASES[alias] = name
        return handler

    return register


def lookup(name: str) -> Command | None:
    return REGISTRY.get(_ALIASES.get(name, name))


def gather_text(args: list[str], text_flags: tuple[str, ...], options: Iterable[str]) -> list[str]:
    """Join the words after a free-text flag into its value, up to the next option of the command.

    ``ssh host new --prompt="write a page"``: the user's shell removes the quotes and OpenSSH sends the words
    joined by spaces, so the server sees ``--prompt=write a page``. For a command with no positional arguments
    the words that follow can only be the text, so they are gathered (a quoted value arrives whole either way)."""
    known = set(options)
    out: list[str] = []
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name not in text_flags:
            out.append(args[i])
            i += 1
            continue
        if eq:
            words, i = [value], i + 1
        elif i + 1 < len(args):
            words, i = [args[i + 1]], i + 2
        else:
            out.append(args[i])  # no value: argparse says so
            break
        while i < len(args) and args[i].partition("=")[0] not in known:
            words.append(args[i])
            i += 1
        out.append(f"{name}={' '.join(words)}")
    return out


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every option of a command, its subcommands' included."""
    found = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= option_strings(sub)
    return found


def split(line: str) -> list[str]:
    if len(line) > MAX_LINE:
        raise UsageError(f"command line too long ({len(line)} bytes; the limit is {MAX_LINE})")
    if "\x00" in line:
        raise UsageError("command line contains a NUL byte")
    if _PLAIN_LINE.fullmatch(line):  # no quotes, escapes or unusual spaces: shlex would split it just so
        return line.split()
    try:
        return shlex.split(line, comments=False, posix=True)
    except ValueError as exc:
        raise UsageError(f"cannot parse the command line: {exc} (check your quotes)") from None


INLINE_SPLIT = 4096  # longer lines are split in a worker thread: shlex takes ~3 µs a character


async def split_async(line: str) -> list[str]:
    """:func:`split` without holding the event loop: a 64 KiB line takes shlex ~200 ms."""
    if len(line) <= INLINE_SPLIT:
        return split(line)
    return await asyncio.to_thread(split, line)


def render_error(exc: BaseException) -> tuple[str, int]:
    """The text (stderr) and exit status of a failed command: one rendering for SSH and ``/exec``.

    A usage error carries the usage line; a runtime failure carries its evidence (the command line and the
    console tail, last 15 lines), as the README promises; anything that is not a :class:`UssyError` is a bug,
    logged in full and reported without detail."""
    if isinstance(exc, UsageError):
        text = f"error: {exc.user_message}"
        if exc.usage:
            text += f"\n{exc.usage}"
        return text, exc.exit_code
    if isinstance(exc, RuntimeFailure) and exc.evidence:
        tail = "\n".join("  " + line for line in exc.evidence.strip().splitlines()[-15:])
        return f"error: {exc.user_message}\n{tail}", exc.exit_code
    if isinstance(exc, UssyError):
        return f"error: {exc.user_message}", exc.exit_code
    log.error("command failed", exc_info=exc)
    return "error: internal error; it has been logged", 1


_loaded = False


def load_all() -> None:
    """Import every command module so that they register (idempotent; every command passes here)."""
    global _loaded
    if _loaded:
        return
    from ussycode.commands import (  # noqa: F401
        account,
        admin,
        arena,
        community,
        doc,
        email,
        help,
        llm,
        share,
        token,
        tutorial,
        vm,
    )

    _loaded = True


async def dispatch(ctx: CommandContext, argv: list[str]) -> int:
    """Run one command. Returns the exit status; raises UssyError for the frontend to render."""
    load_all()
    if not argv:
        return 0
    cmd = lookup(argv[0])
    if cmd is None:
        raise UsageError(f"unknown command: {argv[0][:40]!r}; type 'help' for commands")
    if ctx.actor.token_id is None:
        # A lobby session lives long: the account as it is now, so a tier change or a suspension applies to its
        # next command. (A token's actor was read at most seconds ago; suspension drops it from that cache.)
        fresh = await ctx.services.users.by_id(ctx.actor.id)
        if fresh is None:
            raise NotFound("your account no longer exists")
        ctx.actor = dataclasses.replace(ctx.actor, user=fresh)
    if ctx.actor.user.suspended:
        raise Suspended(ctx.actor.user.suspend_reason)
    actor = ctx.actor
    if actor.allowed_commands is not None and cmd.name not in actor.allowed_commands:
        allowed = ", ".join(sorted(actor.allowed_commands)) or "none"
        raise CommandNotPermitted(f"command {cmd.name!r} is not permitted by this token (it allows: {allowed})",
                                  command=cmd.name)
    if cmd.admin_only and not can(actor, Action.ADMIN_COMMANDS):
        raise Forbidden(f"{cmd.name} is for the operators and admins of this server")
    if cmd.interactive_only and not ctx.interactive:
        raise UsageError(f"{cmd.name} needs an interactive terminal; run it in the lobby over ssh")
    if not ctx.interactive:
        ctx.services.limiter.take(actor.id)
    ns = cmd.parse(argv[1:])
    if ns.help:
        ctx.out.print(cmd.parser.format_help().rstrip())
        return 0
    started, outcome = time.monotonic(), "error"
    try:
        with telemetry.span(f"command {cmd.name}", command=cmd.name, source=actor.source):
            status = await cmd.handler(ctx, ns)
        outcome = "ok" if status == 0 else "failed"
        return status
    finally:
        telemetry.command_seconds(cmd.name, actor.source, outcome).observe(time.monotonic() - started)


