"""Admin commands (``admin …``): shown to and run by admins only; the role rule is ``auth.policy.can``."""

from __future__ import annotations

import argparse

from ussycode.commands.context import CommandContext
from ussycode.commands.registry import _Parser, command


def _admin_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="sub", required=True, parser_class=_Parser, metavar="{add-user}")
    add = sub.add_parser("add-user", add_help=False,
                         help="create an account: admin add-user <handle> '<authorized_keys line>'")
    add.add_argument("handle", help="the new user's handle")
    add.add_argument("key", nargs="+", help="the user's public key line")
    add.add_argument("--json", action="store_true", help="print JSON")


@command("admin", "run the instance: add users (the way in when registration is closed)", group="admin",
         admin_only=True, args=_admin_args)
async def admin(ctx: CommandContext, a: argparse.Namespace) -> int:
    # One subcommand for now; the others of CONTRACT §10 join this parser.
    user = await ctx.services.users.add_user(ctx.actor, a.handle, " ".join(a.key))
    if a.json:
        ctx.out.json({"handle": user.handle, "trust_level": str(user.trust_level)})
    else:
        ctx.out.print(f"added {user.handle} ({user.trust_level}); that key now logs in to the lobby")
    return 0
