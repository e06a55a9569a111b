"""Account commands: whoami, ssh-key."""

from __future__ import annotations

import argparse
from typing import Any

from ussycode.commands.context import CommandContext
from ussycode.commands.output import table
from ussycode.commands.registry import _Parser, command
from ussycode.errors import NotFound, UssyError
from ussycode.services.quotas import effective_limits
from ussycode.services.tutorial import Tutorial
from ussycode.store.schema import iso


def _json_only(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


@command("whoami", "show your account, keys and quota", group="account", args=_json_only)
async def whoami(ctx: CommandContext, a: argparse.Namespace) -> int:
    profile = await ctx.services.users.profile(ctx.actor.id)
    if profile is None:
        raise NotFound("your account no longer exists")
    user, keys, count = profile
    limits = effective_limits(user)
    address, verified = (user.email, bool(user.email))
    if ctx.services.outbox is not None:
        address, verified = await ctx.services.outbox.address(user.id)
    data: dict[str, Any] = {
        "handle": user.handle,
        "email": address,
        "email_verified": verified,
        "trust_level": str(user.trust_level),
        "fingerprints": [k.fingerprint for k in keys],
        "vm_count": count,
        "quota": limits.as_json(),
        "created_at": iso(user.created_at),
    }
    try:
        guide = Tutorial(ctx.services)
        done = sum(1 for o in (await guide.outcomes(ctx.actor)).values() if o == "done")
        data["tutorial"] = {"done": done, "lessons": len(guide.lessons)}
    except UssyError:  # an operator's broken lesson file must not break whoami
        pass
    if a.json:
        ctx.out.json(data)
        return 0
    q = limits

    def lim(v: int | None, unit: str = "") -> str:
        return "unlimited" if v is None else f"{v}{unit}"

    ctx.out.print(f"handle:       {user.handle}")
    ctx.out.print(f"trust level:  {user.trust_level}")
    if address:
        ctx.out.print(f"email:        {address} ({'verified' if verified else 'waiting for: email verify <code>'})")
    ctx.out.print(f"VMs:          {count} of {lim(q.vms)}")
    ctx.out.print(f"per VM:       {lim(q.cpu)} vCPU, {lim(q.memory_mb, ' MB')} memory, {lim(q.disk_gb, ' GB')} disk")
    ctx.out.print(f"member since: {iso(user.created_at)}")
    if "tutorial" in data:
        ctx.out.print(f"tutorial:     {data['tutorial']['done']} of {data['tutorial']['lessons']} lessons done")
    for k in keys:
        ctx.out.print(f"key:          {k.fingerprint} {k.comment}".rstrip())
    return 0


def _key_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="sub", required=True, parser_class=_Parser, metavar="{list,add,rm,rename}")
    lst = sub.add_parser("list", add_help=False, help="list your keys")
    lst.add_argument("--json", action="store_true")
    add = sub.add_parser("add", add_help=False, help="add a key: ssh-key add '<authorized_keys line>'")
    add.add_argument("key", nargs="+", help="the public key line")
    rm = sub.add_parser("rm", add_help=False, aliases=["remove"], help="remove a key by fingerprint or id")
    rm.add_argument("ref")
    ren = sub.add_parser("rename", add_help=False, help="set a key's comment")
    ren.add_argument("ref")
    ren.add_argument("comment", nargs="+")


@command("ssh-key", "manage the SSH keys that log you in", group="account", args=_key_args)
async def ssh_key(ctx: CommandContext, a: argparse.Namespace) -> int:
    users = ctx.services.users
    if a.sub == "list":
        keys = await users.keys(ctx.actor.id)
        if a.json:
            ctx.out.json([{"id": k.id, "fingerprint": k.fingerprint, "type": k.key_type, "comment": k.comment,
                           "created_at": iso(k.created_at)} for k in keys])
        else:
            ctx.out.print(table([[str(k.id), k.fingerprint, k.key_type, k.comment] for k in keys],
                                ["id", "fingerprint", "type", "comment"]))
    elif a.sub == "add":
        key = await users.add_key(ctx.actor, " ".join(a.key))
        ctx.out.print(f"added key {key.id}: {key.fingerprint}")
    elif a.sub in ("rm", "remove"):
        key = await users.remove_key(ctx.actor, a.ref)
        ctx.out.print(f"removed key {key.id}: {key.fingerprint}")
    else:
        key = await users.rename_key(ctx.actor, a.ref, " ".join(a.comment))
        ctx.out.print(f"key {key.id} renamed")
    return 0
