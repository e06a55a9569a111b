"""token: API tokens for ``POST /exec`` (and, VM-scoped, for a VM's URL)."""

from __future__ import annotations

import argparse
import datetime as dt

from ussycode.auth.tokens import parse_duration
from ussycode.commands.context import CommandContext
from ussycode.commands.output import table
from ussycode.commands.registry import _Parser, command, load_all, lookup
from ussycode.errors import RuntimeFailure, UsageError
from ussycode.services.tokens import TokenService
from ussycode.store.schema import iso, utcnow


def canonical_command(name: str) -> str | None:
    """The registry's name for a command or alias (None when unknown): what token ``cmds`` are checked against."""
    load_all()
    cmd = lookup(name)
    return cmd.name if cmd else None


def _service(ctx: CommandContext) -> TokenService:
    tokens = ctx.services.tokens
    if tokens is None:
        raise RuntimeFailure("API tokens are not available on this server")
    return tokens


def _token_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="sub", required=True, parser_class=_Parser, metavar="{create,list,revoke}")
    new = sub.add_parser("create", add_help=False, help="create a token (shown once)")
    new.add_argument("--expires", metavar="DURATION", help="lifetime, like 30m, 12h, 7d, 1y (default: no expiry)")
    new.add_argument("--cmds", metavar="a,b", help="allow only these commands (first word), comma-separated")
    new.add_argument("--vm", metavar="VM", help="scope the token to one of your VMs")
    new.add_argument("--json", action="store_true", help="print JSON")
    lst = sub.add_parser("list", add_help=False, help="list your tokens (never their secrets)")
    lst.add_argument("--json", action="store_true", help="print JSON")
    rev = sub.add_parser("revoke", add_help=False, help="revoke a token by id")
    rev.add_argument("id", help="the token id from 'token list'")


def _parse_cmds(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--cmds needs at least one command, like --cmds=ls,whoami")
    return names


def _when(value: dt.datetime | None, never: str = "never") -> str:
    return iso(value) or never


@command("token", "API tokens for scripts: create, list, revoke", group="account", args=_token_args)
async def token(ctx: CommandContext, a: argparse.Namespace) -> int:
    tokens = _service(ctx)
    if a.sub == "create":
        try:
            expires = parse_duration(a.expires) if a.expires is not None else None
        except ValueError as exc:
            raise UsageError(f"--expires: {exc}") from None
        cmds = _parse_cmds(a.cmds) if a.cmds is not None else None
        created = await tokens.create(ctx.actor, expires_in=expires, cmds=cmds, vm=a.vm)
        if a.json:
            ctx.out.json(created.as_json())
            return 0
        s = ctx.services.settings
        url = s.public_url(s.domain) + "/exec"
        ctx.out.print(f"token {created.id} (expires: {_when(created.expires_at)}):")
        ctx.out.print(created.token)
        ctx.out.print("this is the only time it is shown; keep it somewhere safe. use it like this:")
        ctx.out.print(f"  curl -H 'Authorization: Bearer {created.token}' --data-binary 'whoami' \\")
        ctx.out.print(f"       -H 'Content-Type: text/plain' {url}")
        return 0
    if a.sub == "list":
        infos = await tokens.list(ctx.actor)
        now = utcnow()
        if a.json:
            ctx.out.json([i.as_json(now) for i in infos])
            return 0
        if not infos:
            ctx.out.print("no tokens yet. create one with: token create")
            return 0
        rows = [[i.id, i.status(now), ",".join(i.cmds) if i.cmds is not None else "all", i.vm or "-",
                 _when(i.created_at), _when(i.expires_at), _when(i.last_used_at, "-")] for i in infos]
        ctx.out.print(table(rows, ["id", "status", "cmds", "vm", "created", "expires", "last used"]))
        return 0
    info, changed = await tokens.revoke(ctx.actor, a.id)
    ctx.out.print(f"token {info.id} revoked" if changed else f"token {info.id} was already revoked")
    return 0
