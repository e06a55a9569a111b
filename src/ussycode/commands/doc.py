"""``doc [topic]``: the built-in docs, wrapped to the terminal (80 columns when there is none), never coloured."""

from __future__ import annotations

import argparse

from ussycode import docs
from ussycode.commands.context import CommandContext
from ussycode.commands.registry import command
from ussycode.errors import NotFound


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("topic", nargs="?", help="a topic; without one, the list")


@command("doc", "built-in documentation: doc [topic]", args=_args)
async def doc(ctx: CommandContext, a: argparse.Namespace) -> int:
    width = ctx.width or 80
    if not a.topic:
        ctx.out.print("Topics (doc <topic>; also at https://<domain>/docs/):")
        for topic in docs.topics():
            ctx.out.print(f"  {topic:<16} {docs.title(topic)}")
        return 0
    topic = a.topic.strip().lower()
    if topic not in docs.topics():
        raise NotFound(f"no topic {a.topic[:40]!r}; topics: {', '.join(docs.topics())}")
    ctx.out.print(docs.terminal(topic, width).rstrip("\n"))
    return 0
