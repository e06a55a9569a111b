"""Admin commands (``admin …``): shown to and run by operators and admins only.

The role rules are ``auth.policy`` (through ``services.admin``): the lobby, ``/exec`` and the admin panel obey
the same ones.
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from ussycode import durations
from ussycode.commands.context import CommandContext
from ussycode.commands.output import table
from ussycode.commands.registry import _Parser, command
from ussycode.errors import Unavailable, UsageError
from ussycode.services.admin import AdminService, UserDetail
from ussycode.services.quotas import effective_limits
from ussycode.store.schema import iso, utcnow

SUBCOMMANDS = ("users", "user", "set-trust", "quota", "suspend", "unsuspend", "vms", "audit", "add-user")
MAX_AUDIT_SINCE = dt.timedelta(days=3650)


def _admin_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="sub", required=True, parser_class=_Parser, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    users = sub.add_parser("users", add_help=False, help="list users: admin users [--search=S] [--tier=T] [--json]")
    users.add_argument("--search", default="", help="part of a handle or e-mail")
    users.add_argument("--tier", default="", help="newbie, citizen, operator or admin")
    users.add_argument("--suspended", action="store_true", help="suspended users only")
    users.add_argument("--page", type=int, default=1)
    users.add_argument("--json", action="store_true")
    user = sub.add_parser("user", add_help=False, help="one user: keys, VMs, tokens, shares, recent actions")
    user.add_argument("handle")
    user.add_argument("--json", action="store_true")
    trust = sub.add_parser("set-trust", add_help=False, help="change a user's tier: admin set-trust <handle> <tier>")
    trust.add_argument("handle")
    trust.add_argument("tier")
    trust.add_argument("--json", action="store_true")
    quota = sub.add_parser("quota", add_help=False,
                           help="override a user's limits: admin quota <handle> [--vms=N] [--cpu=N] [--memory=MB] "
                                "[--disk=GB] [--reset]")
    quota.add_argument("handle")
    quota.add_argument("--vms", type=int, default=None)
    quota.add_argument("--cpu", type=int, default=None)
    quota.add_argument("--memory", type=int, default=None, help="MB per VM")
    quota.add_argument("--disk", type=int, default=None, help="GB per VM")
    quota.add_argument("--reset", action="store_true", help="back to the tier's limits")
    quota.add_argument("--json", action="store_true")
    susp = sub.add_parser("suspend", add_help=False, help="suspend a user: admin suspend <handle> [--reason=…]")
    susp.add_argument("handle")
    susp.add_argument("--reason", default="")
    susp.add_argument("--json", action="store_true")
    unsusp = sub.add_parser("unsuspend", add_help=False, help="restore a suspended user")
    unsusp.add_argument("handle")
    unsusp.add_argument("--json", action="store_true")
    vms = sub.add_parser("vms", add_help=False, help="every user's VMs: admin vms [--owner=H] [--status=S] [--json]")
    vms.add_argument("--owner", default="")
    vms.add_argument("--status", default="")
    vms.add_argument("--page", type=int, default=1)
    vms.add_argument("--json", action="store_true")
    audit = sub.add_parser("audit", add_help=False,
                           help="the audit log: admin audit [--actor=H] [--action=A] [--since=DURATION] [--json]")
    audit.add_argument("--actor", default="")
    audit.add_argument("--action", default="", help="an action (vm.create) or a prefix ending in '.' (vm.)")
    audit.add_argument("--target", default="")
    audit.add_argument("--since", default="", help="e.g. 30m, 24h, 7d")
    audit.add_argument("--limit", type=int, default=50)
    audit.add_argument("--json", action="store_true")
    add = sub.add_parser("add-user", add_help=False,
                         help="create an account: admin add-user <handle> '<authorized_keys line>'")
    add.add_argument("handle", help="the new user's handle")
    add.add_argument("key", nargs="+", help="the user's public key line")
    add.add_argument("--json", action="store_true", help="print JSON")


PAGE = 50


def _page(n: int) -> int:
    if n < 1 or n > 100_000:
        raise UsageError("--page must be between 1 and 100000")
    return (n - 1) * PAGE


def user_json(row: dict[str, Any]) -> dict[str, Any]:
    return {"handle": row["handle"], "email": row["email"], "trust_level": row["trust_level"],
            "suspended": row["suspended_at"] is not None, "suspend_reason": row["suspend_reason"] or None,
            "vm_count": row.get("vm_count"), "quota_override": row["quota"], "created_at": iso(row["created_at"])}


def detail_json(d: UserDetail) -> dict[str, Any]:
    u = d.user
    return {
        "handle": u.handle, "email": u.email, "trust_level": str(u.trust_level), "suspended": u.suspended,
        "suspended_at": iso(u.suspended_at), "suspend_reason": u.suspend_reason or None,
        "quota": d.limits.as_json(), "quota_override": u.quota.as_json() if u.quota else None,
        "created_at": iso(u.created_at),
        "keys": [{"id": k.id, "fingerprint": k.fingerprint, "type": k.key_type, "comment": k.comment} for k in d.keys],
        "vms": [{"name": v.name, "status": str(v.status), "image": v.image, "cpu": v.cpu, "memory_mb": v.memory_mb,
                 "disk_gb": v.disk_gb} for v in d.vms],
        "tokens": [{"id": t.id, "vm": t.vm_name, "created_at": iso(t.created_at), "expires_at": iso(t.expires_at),
                    "revoked": t.revoked_at is not None} for t in d.tokens],
        "shares": {k: [{kk: (iso(vv) if isinstance(vv, dt.datetime) else vv) for kk, vv in row.items()}
                       for row in rows] for k, rows in d.shares.items()},
    }


def audit_json(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "at": iso(row["at"]), "actor": row["actor"], "source": row["source"],
            "action": row["action"], "target": row["target"], "detail": row["detail"]}


def _service(ctx: CommandContext) -> AdminService:
    if ctx.services.admin is None:
        raise Unavailable("the admin service is not running on this server")
    return ctx.services.admin


@command("admin", "run the instance: users, tiers, quotas, suspension, every VM, the audit log", group="admin",
         admin_only=True, args=_admin_args, text_flags=("--reason",))
async def admin(ctx: CommandContext, a: argparse.Namespace) -> int:
    if a.sub == "add-user":
        user = await ctx.services.users.add_user(ctx.actor, a.handle, " ".join(a.key))
        if a.json:
            ctx.out.json({"handle": user.handle, "trust_level": str(user.trust_level)})
        else:
            ctx.out.print(f"added {user.handle} ({user.trust_level}); that key now logs in to the lobby")
        return 0
    svc = _service(ctx)
    handler = _HANDLERS[a.sub]
    return await handler(ctx, svc, a)


async def _users(ctx: CommandContext, svc: AdminService, a: argparse.Namespace) -> int:
    page = await svc.list_users(ctx.actor, search=a.search, tier=a.tier.strip().lower(),
                                suspended=True if a.suspended else None, offset=_page(a.page), limit=PAGE)
    rows = [user_json(r) for r in page.rows]
    if a.json:
        ctx.out.json({"users": rows, "total": page.total, "page": a.page})
        return 0
    ctx.out.print(table([[r["handle"], r["trust_level"], "suspended" if r["suspended"] else "", str(r["vm_count"]),
                          r["email"] or ""] for r in rows], ["handle", "tier", "state", "vms", "email"]))
    ctx.out.print(f"{page.total} users" + (f"; page {a.page} (--page=N for more)" if (page.total or 0) > PAGE else ""))
    return 0


async def _user(ctx: CommandContext, svc: AdminService, a: argparse.Namespace) -> int:
    d = await svc.user(ctx.actor, a.handle)
    data = detail_json(d)
    if a.json:
        ctx.out.json(data)
        return 0
    q = data["quota"]
    ctx.out.print(f"handle:     {data['handle']}")
    ctx.out.print(f"tier:       {data['trust_level']}" + ("  (quota overridden)" if data["quota_override"] else ""))
    if data["suspended"]:
        ctx.out.print(f"suspended:  since {data['suspended_at']}" + (f" ({data['suspend_reason']})"
                                                                     if data["suspend_reason"] else ""))
    ctx.out.print(f"quota:      {q['vms'] or 'unlimited'} VMs, per VM {q['cpu'] or 'unlimited'} vCPU, "
                  f"{q['memory_mb'] or 'unlimited'} MB, {q['disk_gb'] or 'unlimited'} GB")
    ctx.out.print(f"keys:       {len(data['keys'])}; tokens: {sum(not t['revoked'] for t in data['tokens'])} active")
    for v in data["vms"]:
        ctx.out.print(f"vm:         {v['name']} ({v['status']})")
    return 0


async def _set_trust(ctx: CommandContext, svc: AdminService, a: argparse.Namespace) -> int:
    user = await svc.set_trust(ctx.actor, a.handle, a.tier)
    if a.json:
        ctx.out.json({"handle": user.handle, "trust_level": str(user.trust_level)})
    else:
        ctx.out.print(f"{user.handle} is now {user.trust_level}")
    return 0


async def _quota(ctx: CommandContext, svc: AdminService, a: argparse.Namespace) -> int:
    user = await svc.set_quota(ctx.actor, a.handle, reset=a.reset, vms=a.vms, cpu=a.cpu, memory_mb=a.memory,
                               disk_gb=a.disk)
    limits = effective_limits(user).as_json()
    if a.json:
        ctx.out.json({"handle": user.handle, "quota": limits,
                      "quota_override": user.quota.as_json() if user.quota else None})
    else:
        ctx.out.print(f"{user.handle}: {limits['vms']} VMs, per VM {limits['cpu']} vCPU, {limits['memory_mb']} MB, "
                      f"{limits['disk_gb']} GB")
    return 0


async def _suspend(ctx: CommandContext, svc: AdminService, a: argparse.Namespace) -> int:
    user = await svc.suspend(ctx.actor, a.handle, a.reason)
    if a.json:
        ctx.out.json({"handle": user.handle, "suspended": True, "reason": user.suspend_reason or None})
    else:
        ctx.out.print(f"{user.handle} is suspended; their VMs are stopped and their sessions ended")
    return 0


async def _unsuspend(ctx: CommandContext, svc: AdminService, a: argparse.Namespace) -> int:
    user = await svc.unsuspend(ctx.actor, a.handle)
    if a.json:
        ctx.out.json({"handle": user.handle, "suspended": False})
    else:
        ctx.out.print(f"{user.handle} can log in again (their VMs stay stopped until started)")
    return 0


async def _vms(ctx: CommandContext, svc: AdminService, a: argparse.Namespace) -> int:
    page = await svc.list_vms(ctx.actor, owner=a.owner, status=a.status.strip().lower(), offset=_page(a.page),
                              limit=PAGE)
    rows = [{"name": r["name"], "owner": r["owner"], "status": r["status"], "image": r["image"], "cpu": r["cpu"],
             "memory_mb": r["memory_mb"], "disk_gb": r["disk_gb"], "runtime": r["runtime"],
             "created_at": iso(r["created_at"])} for r in page.rows]
    if a.json:
        ctx.out.json({"vms": rows, "total": page.total, "page": a.page})
        return 0
    ctx.out.print(table([[r["name"], r["owner"], r["status"], r["runtime"]] for r in rows],
                        ["name", "owner", "status", "runtime"]))
    ctx.out.print(f"{page.total} VMs")
    return 0


async def _audit(ctx: CommandContext, svc: AdminService, a: argparse.Namespace) -> int:
    since = None
    if a.since:
        since = utcnow() - durations.parse_duration(a.since, longest=MAX_AUDIT_SINCE)
    if not 1 <= a.limit <= 500:
        raise UsageError("--limit must be between 1 and 500")
    page = await svc.audit(ctx.actor, actor_handle=a.actor, action=a.action, target=a.target, since=since,
                           limit=a.limit)
    rows = [audit_json(r) for r in page.rows]
    if a.json:
        ctx.out.json(rows)
        return 0
    ctx.out.print(table([[r["at"] or "", r["actor"] or r["source"], r["action"], r["target"]] for r in rows],
                        ["at", "actor", "action", "target"]))
    return 0


_HANDLERS = {"users": _users, "user": _user, "set-trust": _set_trust, "quota": _quota, "suspend": _suspend,
             "unsuspend": _unsuspend, "vms": _vms, "audit": _audit}
