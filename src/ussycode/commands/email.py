"""``email set <address>`` / ``email verify <code>``: the account's verified e-mail address."""

from __future__ import annotations

import argparse

from ussycode.commands.context import CommandContext
from ussycode.commands.registry import _Parser, command
from ussycode.errors import RuntimeFailure
from ussycode.services.outbox import Outbox


def _email_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="sub", required=True, parser_class=_Parser, metavar="{set,verify}")
    put = sub.add_parser("set", add_help=False, help="send a verification code to this address")
    put.add_argument("address")
    ver = sub.add_parser("verify", add_help=False, help="enter the code from that message")
    ver.add_argument("code")


def _outbox(ctx: CommandContext) -> Outbox:
    if ctx.services.outbox is None:
        raise RuntimeFailure("mail is not available on this server")
    return ctx.services.outbox


@command("email", "set and verify your e-mail address (shares by e-mail, mail from your VMs)", group="account",
         args=_email_args)
async def email(ctx: CommandContext, a: argparse.Namespace) -> int:
    outbox = _outbox(ctx)
    if a.sub == "set":
        address = await outbox.request_code(ctx.actor, a.address)
        ctx.out.print(f"a verification code is on its way to {address}; then run: email verify <code>")
        return 0
    address = await outbox.verify(ctx.actor, a.code)
    ctx.out.print(f"{address} is verified: it is your address now")
    return 0
