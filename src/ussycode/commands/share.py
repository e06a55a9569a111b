"""Sharing commands (``share …``) and ``browser`` (a one-time sign-in link)."""

from __future__ import annotations

import argparse
from typing import Any

from ussycode.commands.context import CommandContext
from ussycode.commands.output import table
from ussycode.commands.registry import command
from ussycode.errors import Conflict, RuntimeFailure, UsageError
from ussycode.services.sessions import LOGIN_TOKEN_TTL, SessionService
from ussycode.services.shares import MAIN_PORT, VERIFY_PREFIX, LinkInfo, ShareService, parse_duration
from ussycode.store.schema import iso
from ussycode.validate import MAX_EMAIL, email_address, printable_text

SUBCOMMANDS = {
    "show": "who may open the VM's URLs",
    "set-public": "anyone may open the URL (--port for another port)",
    "set-private": "only you and people you share with (--port for another port)",
    "add": "let a user (handle or e-mail) open the VM's URLs",
    "remove": "take that access away (at once)",
    "add-link": "a share link that opens the VM in any browser (--expires=7d)",
    "remove-link": "revoke a share link",
    "cname": "attach a custom domain (prints the DNS records to create)",
    "cname-verify": "check the DNS proof and route the custom domain",
    "cname-rm": "detach a custom domain",
    "receive-email": "on|off: mail to <anything>@<vm>.<domain> lands in the VM's ~/Maildir/new",
}
_WITH_TARGET = {"add", "remove", "remove-link", "cname", "cname-verify", "cname-rm", "receive-email"}


def _shares(ctx: CommandContext) -> ShareService:
    if ctx.services.shares is None:
        raise RuntimeFailure("sharing is not available on this server")
    return ctx.services.shares


def _sessions(ctx: CommandContext) -> SessionService:
    if ctx.services.sessions is None:
        raise RuntimeFailure("browser sign-in is not available on this server")
    return ctx.services.sessions


def _link_json(link: LinkInfo, *, new: bool = False) -> dict[str, Any]:
    """``share show``: {id, port, expires_at, uses}; ``add-link``: {id, url, port, expires_at} (the URL with the
    token is shown only then)."""
    if new:
        return {"id": link.id, "url": link.url, "port": link.port, "expires_at": iso(link.expires_at)}
    return {"id": link.id, "port": link.port, "expires_at": iso(link.expires_at), "uses": link.uses}


def _share_target(target: str, *, strict: bool) -> str:
    """A handle or an e-mail address as typed for ``share add``/``remove``: printable text only; an address must pass
    the strict check to be added (it is normalised: IDNA domain), while removal also takes an older stored form."""
    target = printable_text(target, "handle or e-mail address", max_len=MAX_EMAIL).strip(" ")
    if "@" not in target:
        return target
    if strict:
        return email_address(target)
    try:
        return email_address(target)
    except UsageError:
        return target


def _share_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=sorted(SUBCOMMANDS), metavar="{" + ",".join(SUBCOMMANDS) + "}",
                   help="; ".join(f"{k}: {v}" for k, v in SUBCOMMANDS.items()))
    p.add_argument("vm", help="VM name")
    p.add_argument("target", nargs="?", help="handle, e-mail, link id/token/URL or domain (depending on the action)")
    p.add_argument("--port", type=int, default=MAIN_PORT,
                   help="port for set-public, set-private and add-link (default 8080, the main URL)")
    p.add_argument("--expires", help="link lifetime for add-link, like 30m, 24h, 7d (default: never)")
    p.add_argument("--json", action="store_true", help="print JSON (show, add-link)")


@command("share", "share a VM's HTTPS URL: public, per user, links, custom domains", group="access",
         args=_share_args)
async def share(ctx: CommandContext, a: argparse.Namespace) -> int:
    svc = _shares(ctx)
    action: str = a.action
    if action in _WITH_TARGET and not a.target:
        raise UsageError(f"share {action} needs a {'domain' if action.startswith('cname') else 'target'}",
                         usage=f"share {action} <vm> <{'domain' if action.startswith('cname') else 'target'}>")
    if action not in _WITH_TARGET and a.target:
        raise UsageError(f"share {action} takes no extra argument (got {a.target[:40]!r})")
    if a.port != MAIN_PORT and action not in ("set-public", "set-private", "add-link"):
        raise UsageError("--port goes with set-public, set-private and add-link only")
    if a.expires is not None and action != "add-link":
        raise UsageError("--expires goes with add-link only")

    if action == "receive-email":
        return await _receive_email(ctx, a.vm, a.target)
    if action == "show":
        info = await svc.show(ctx.actor, a.vm)
        receiving, notice = (False, None)
        if ctx.services.mail is not None:
            vm = await ctx.services.vms.get(ctx.actor, a.vm)
            receiving, notice = await ctx.services.mail.receive_state(vm.id)
        if a.json:
            ctx.out.json({"vm": info.vm, "public": info.public, "ports": info.ports, "users": info.users,
                          "links": [_link_json(link) for link in info.links], "receive_email": receiving})
            return 0
        url = ctx.services.vms.url(info.vm)
        ctx.out.print(f"{info.vm}: {url} is {'PUBLIC' if info.public else 'private'}")
        for port in info.ports:
            ctx.out.print(f"  port {port} is public: {ctx.services.vms.url(f'{port}-{info.vm}')}")
        ctx.out.print("  shared with: " + (", ".join(info.users) if info.users else "nobody"))
        if info.links:
            rows = [[link.id, iso(link.expires_at) or "never", str(link.uses), link.url] for link in info.links]
            ctx.out.print(table(rows, ["link", "expires", "uses", "opens"]))
        for domain, verified in info.cnames:
            ctx.out.print(f"  custom domain {domain}: {'verified' if verified else 'waiting for verification'}")
        domain = ctx.services.settings.domain
        ctx.out.print(f"  mail to *@{info.vm}.{domain}: " + ("received" if receiving else "refused")
                      + (f" ({notice})" if notice else ""))
        return 0
    if action in ("set-public", "set-private"):
        public = action == "set-public"
        changed = await svc.set_public(ctx.actor, a.vm, public, a.port)
        host = a.vm if a.port == MAIN_PORT else f"{a.port}-{a.vm}"
        url = ctx.services.vms.url(host)
        state = "public: anyone can open it" if public else "private: only you and people you share with"
        ctx.out.print(f"{url} is {'now ' if changed else 'already '}{state}")
        return 0
    if action == "add":
        who = _share_target(a.target, strict=True)
        changed = await svc.add_user(ctx.actor, a.vm, who)
        ctx.out.print(f"{a.vm} {'is now' if changed else 'was already'} shared with {who}")
        return 0
    if action == "remove":
        who = _share_target(a.target, strict=False)
        await svc.remove_user(ctx.actor, a.vm, who)
        ctx.out.print(f"{a.vm} is no longer shared with {who}")
        return 0
    if action == "add-link":
        expires = parse_duration(a.expires) if a.expires else None
        link = await svc.add_link(ctx.actor, a.vm, expires, a.port)
        if a.json:
            ctx.out.json(_link_json(link, new=True))
        else:
            ctx.out.print(link.url)
            ctx.out.print(f"  anyone with this link can open {svc.port_url(a.vm, link.port)} in their browser"
                          f"{' until ' + (iso(link.expires_at) or '') if link.expires_at else ''}; it is shown only "
                          f"now. Revoke it with: share remove-link {a.vm} {link.id}")
        return 0
    if action == "remove-link":
        # The link's id, its token, or the whole link as printed by add-link.
        await svc.remove_link(ctx.actor, a.vm, a.target)
        ctx.out.print(f"share link {a.target[:80]} of {a.vm} revoked")
        return 0
    if action == "cname":
        cn = await svc.cname_add(ctx.actor, a.vm, a.target)
        if cn.verified:
            ctx.out.print(f"{cn.domain} is already verified and routed to {cn.vm}")
            return 0
        target = f"{cn.vm}.{ctx.services.settings.domain}"
        ctx.out.print(f"create these DNS records for {cn.domain}:")
        ctx.out.print(table([[VERIFY_PREFIX + cn.domain, "TXT", cn.token], [cn.domain, "CNAME", target]],
                            ["name", "type", "value"]))
        ctx.out.print(f"then run: share cname-verify {cn.vm} {cn.domain}")
        return 0
    if action == "cname-verify":
        ok, token, found = await svc.cname_verify(ctx.actor, a.vm, a.target)
        if not ok:
            ctx.out.error(f"TXT {VERIFY_PREFIX}{a.target} does not contain {token}")
            ctx.out.error(f"  found: {', '.join(found) if found else 'no TXT records'}")
            raise Conflict("not verified yet; DNS changes can take a while to spread, retry later",
                           reason="cname_unverified")
        ctx.out.print(f"{a.target} verified; it now serves {a.vm} with the same access rules as its URL")
        return 0
    if action == "cname-rm":
        await svc.cname_remove(ctx.actor, a.vm, a.target)
        ctx.out.print(f"{a.target} detached from {a.vm}")
        return 0
    raise UsageError(f"unknown share action {action!r}")  # pragma: no cover - argparse choices


async def _receive_email(ctx: CommandContext, vm: str, switch: str) -> int:
    if switch not in ("on", "off"):
        raise UsageError("share receive-email takes on or off", usage="share receive-email <vm> on|off")
    if ctx.services.mail is None:
        raise RuntimeFailure("mail is not available on this server")
    on = switch == "on"
    changed = await ctx.services.mail.set_receive(ctx.actor, vm, on)
    address = f"<anything>@{vm}.{ctx.services.settings.domain}"
    state = "now " if changed else "already "
    ctx.out.print(f"mail to {address} is {state}" + ("delivered to ~/Maildir/new in the VM" if on else "refused"))
    return 0


@command("browser", "print a one-time link that signs this browser in (5 minutes)", group="access")
async def browser(ctx: CommandContext, a: argparse.Namespace) -> int:
    if ctx.actor.source == "api" or ctx.actor.token_id is not None:
        raise UsageError("browser sign-in links are made over SSH only")
    token = await _sessions(ctx).create_login_token(ctx.actor)
    settings = ctx.services.settings
    url = f"{settings.public_url(settings.domain)}/__ussycode/login?token={token}"
    minutes = int(LOGIN_TOKEN_TTL.total_seconds() // 60)
    ctx.out.print(url)
    ctx.out.print(f"  open it in your browser within {minutes} minutes; it works once")
    return 0
