"""help: built from the same registry that dispatches."""

from __future__ import annotations

import argparse

from ussycode.auth.policy import Action, can
from ussycode.commands.context import CommandContext
from ussycode.commands.registry import REGISTRY, command, lookup
from ussycode.errors import NotFound

GROUPS = (("basics", "BASICS"), ("vm", "VMS"), ("access", "ACCESS"), ("account", "ACCOUNT"), ("admin", "ADMIN"))


def _help_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("topic", nargs="?", help="a command")


@command("help", "list commands, or show one command's usage", args=_help_args)
async def help_(ctx: CommandContext, a: argparse.Namespace) -> int:
    if a.topic:
        cmd = lookup(a.topic)
        if cmd is None:
            raise NotFound(f"no command {a.topic[:40]!r}; type 'help' for the list")
        ctx.out.print(cmd.parser.format_help().rstrip())
        return 0
    admin = can(ctx.actor, Action.ADMIN_COMMANDS)
    for group, title in GROUPS:
        cmds = [c for c in REGISTRY.values() if c.group == group and (not c.admin_only or admin)]
        if not cmds:
            continue
        ctx.out.print(title)
        for c in sorted(cmds, key=lambda c: c.name):
            ctx.out.print(f"  {c.name:<10} {c.summary}")
        ctx.out.print()
    ctx.out.print("'help <command>' or '<command> --help' shows a command's options.")
    return 0
