"""``community [--json]``: the instance in numbers, your arena standing, and the operator's links."""

from __future__ import annotations

import argparse

import sqlalchemy as sa

from ussycode.commands.context import CommandContext
from ussycode.commands.registry import command
from ussycode.store.schema import users, vms
from ussycode.types import VmStatus


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


@command("community", "this instance: people, running VMs, arena matches, your rating and rank, links", args=_args)
async def community(ctx: CommandContext, a: argparse.Namespace) -> int:
    def read(c: sa.Connection) -> tuple[int, int]:
        people = int(c.execute(sa.select(sa.func.count()).select_from(users)).scalar_one())
        running = int(c.execute(sa.select(sa.func.count()).select_from(vms).where(
            vms.c.status == VmStatus.RUNNING.value)).scalar_one())
        return people, running

    people, running = await ctx.services.store.read(read)
    standing = await ctx.services.arena.standing(ctx.actor) if ctx.services.arena else {}
    data = {"users": people, "vms_running": running, "arena_matches": standing.get("instance_matches", 0),
            "arena_live": standing.get("live_matches", 0),
            "you": {"handle": ctx.actor.handle, "rating": standing.get("rating"), "rank": standing.get("rank"),
                    "matches": standing.get("matches", 0)},
            "links": dict(ctx.services.settings.community_links)}
    if a.json:
        ctx.out.json(data)
        return 0
    ctx.out.print(f"{people} people, {running} VMs running, {data['arena_matches']} arena matches played "
                  f"({data['arena_live']} open or running)")
    you = data["you"]
    rank = f"rank {you['rank']}" if you["rank"] else "no rated match yet: 'arena scenarios' to start"
    ctx.out.print(f"you: rating {you['rating']}, {rank}, {you['matches']} matches")
    for name, url in data["links"].items():
        ctx.out.print(f"{name}: {url}")
    return 0
