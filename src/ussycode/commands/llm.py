"""LLM commands: ``llm-key set|list|rm`` (your own provider keys) and ``llm usage`` (tokens against the budget)."""

from __future__ import annotations

import argparse

from ussycode.commands.context import CommandContext
from ussycode.commands.output import table
from ussycode.commands.registry import _Parser, command
from ussycode.errors import Unavailable, UsageError
from ussycode.services.llm import LlmService


def _service(ctx: CommandContext) -> LlmService:
    if ctx.services.llm is None:
        raise Unavailable("the LLM gateway is not available on this server")
    return ctx.services.llm


def _key_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="sub", required=True, parser_class=_Parser, metavar="{set,list,rm}")
    s = sub.add_parser("set", add_help=False, help="store your key for a provider, read from stdin: "
                                                  "ssh host llm-key set openai < key.txt")
    s.add_argument("provider")
    lst = sub.add_parser("list", add_help=False, help="your keys (last four characters only)")
    lst.add_argument("--json", action="store_true")
    rm = sub.add_parser("rm", add_help=False, aliases=["remove"], help="forget your key for a provider")
    rm.add_argument("provider")


@command("llm-key", "your own LLM provider keys for the gateway your VMs use (never stored in a VM)",
         group="account", args=_key_args)
async def llm_key(ctx: CommandContext, a: argparse.Namespace) -> int:
    svc = _service(ctx)
    if a.sub == "set":
        svc.provider(a.provider)  # an unknown provider fails before asking for the key
        text = await ctx.secret(f"{a.provider} API key (not shown): ")
        if text is None:
            raise UsageError("no key given: pipe it on stdin, e.g. 'ssh host llm-key set openai < key.txt' "
                             "(never put it on the command line)")
        replaced = await svc.set_key(ctx.actor, a.provider, text)
        ctx.out.print(f"{'replaced' if replaced else 'stored'} your {a.provider} key; VMs use it through "
                      "http://169.254.169.254/gateway/llm/" + a.provider)
        return 0
    if a.sub == "list":
        keys = await svc.list_keys(ctx.actor)
        if a.json:
            ctx.out.json(keys)
        else:
            ctx.out.print(table([[k["provider"], k["hint"], k["created_at"] or "", k["last_used_at"] or "never"]
                                 for k in keys], ["provider", "key", "added", "last used"]))
        return 0
    await svc.remove_key(ctx.actor, a.provider)
    ctx.out.print(f"removed your {a.provider} key")
    return 0


def _usage_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="sub", required=True, parser_class=_Parser, metavar="{usage}")
    u = sub.add_parser("usage", add_help=False, help="tokens and requests today and this month, per provider")
    u.add_argument("--json", action="store_true")


@command("llm", "LLM gateway usage: llm usage [--json]", group="account", args=_usage_args)
async def llm(ctx: CommandContext, a: argparse.Namespace) -> int:
    data = await _service(ctx).usage(ctx.actor)
    if a.json:
        ctx.out.json(data)
        return 0
    day, month = data["day"], data["month"]
    budget = "unlimited" if day["budget"] is None else f"{day['budget']}"
    ctx.out.print(f"today:      {day['tokens']} tokens of {budget} ({day['requests']} requests); resets "
                  f"{day['resets_at']}")
    ctx.out.print(f"this month: {month['tokens']} tokens ({month['requests']} requests)")
    for name, p in sorted(data["providers"].items()):
        ctx.out.print(f"  {name:<12} {p['tokens']} tokens, {p['requests']} requests")
    return 0
