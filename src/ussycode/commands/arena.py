"""``arena``: matches with a real VM per player, scored by the scenario, ELO-rated (``services/arena.py``)."""

from __future__ import annotations

import argparse
from typing import Any

from ussycode.commands.context import CommandContext
from ussycode.commands.output import table
from ussycode.commands.registry import _Parser, command
from ussycode.errors import Forbidden, Unavailable
from ussycode.services.arena import Arena, MatchView
from ussycode.store.schema import iso

SUBS = ("scenarios", "create", "join", "leave", "submit", "start", "list", "spectate", "leaderboard", "history")


def _args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="sub", required=True, parser_class=_Parser, metavar="{" + ",".join(SUBS) + "}")
    for name in ("scenarios", "list", "leaderboard", "history"):
        sp = sub.add_parser(name, add_help=False)
        sp.add_argument("--json", action="store_true")
    create = sub.add_parser("create", add_help=False, help="arena create --scenario=S [--players=N]")
    create.add_argument("--scenario", required=True)
    create.add_argument("--players", type=int, default=None)
    create.add_argument("--json", action="store_true")
    for name in ("join", "leave", "submit", "start", "spectate"):
        sp = sub.add_parser(name, add_help=False)
        sp.add_argument("match")
        sp.add_argument("--json", action="store_true")


def match_json(v: MatchView) -> dict[str, Any]:
    return {"id": v.id, "scenario": v.scenario, "state": v.state, "seats": v.seats, "creator": v.creator,
            "players": v.players, "deadline": iso(v.deadline), "note": v.note or None}


def _arena(ctx: CommandContext) -> Arena:
    if ctx.services.arena is None:
        raise Unavailable("the arena is not available on this server")
    arena: Arena = ctx.services.arena
    return arena


@command("arena", "matches against other players, each with a VM: arena scenarios|create|join|submit|…",
         group="vm", args=_args)
async def arena(ctx: CommandContext, a: argparse.Namespace) -> int:
    ar = _arena(ctx)
    if a.sub == "scenarios":
        found = ar.scenarios()
        rows: list[dict[str, Any]] = [{"name": n, "description": s.description, "players": list(s.players),
                                       "duration": s.duration} for n, s in found.items()]
        if a.json:
            ctx.out.json(rows)
        else:
            ctx.out.print(table([[str(r["name"]), f"{r['players'][0]}-{r['players'][1]}", str(r["duration"]),
                                  str(r["description"])[:70]] for r in rows], ["scenario", "players", "time", "what"]))
        return 0
    if a.sub == "create":
        match_id = await ar.create(ctx.actor, a.scenario.strip().lower(), a.players)
        view = await ar.view(match_id)
        if a.json:
            ctx.out.json(match_json(view))
        else:
            ctx.out.print(f"match {match_id} ({view.scenario}) is open for {view.seats} players; others join with: "
                          f"arena join {match_id}")
        return 0
    if a.sub in ("list", "history"):
        views = await (ar.matches(("open", "running", "scoring")) if a.sub == "list" else ar.history(ctx.actor))
        if a.json:
            ctx.out.json([match_json(v) for v in views])
        else:
            ctx.out.print(table([[v.id, v.scenario, v.state, f"{len(v.players)}/{v.seats}",
                                  ", ".join(p["handle"] for p in v.players)] for v in views],
                                ["match", "scenario", "state", "seats", "players"]))
        return 0
    if a.sub == "leaderboard":
        board = await ar.leaderboard()
        if a.json:
            ctx.out.json(board)
        else:
            ctx.out.print(table([[str(r["rank"]), str(r["handle"]), f"{r['rating']:.1f}", str(r["matches"])]
                                 for r in board], ["rank", "player", "rating", "matches"]))
        return 0
    match_id = a.match.strip().lower()[:20]
    said = ""
    if a.sub == "join":
        started = await ar.join(ctx.actor, match_id)
        said = f"joined {match_id}" + (f"; the match has started: your VM is {match_id}-{ctx.actor.handle}"
                                       if started else "")
    elif a.sub == "leave":
        await ar.leave(ctx.actor, match_id)
        said = f"left {match_id}"
    elif a.sub == "submit":
        await ar.submit(ctx.actor, match_id)
        said = f"submitted to {match_id}"
    elif a.sub == "start":
        view = await ar.view(match_id)
        if view.creator != ctx.actor.handle:
            raise Forbidden("only the match's creator can start it early")
        await ar.start(match_id)
        said = f"match {match_id} started"
    if said and not a.json:
        ctx.out.print(said)
    view = await ar.view(match_id)
    if a.json:
        ctx.out.json(match_json(view))
    elif a.sub == "spectate":
        ctx.out.print(f"match {view.id}: {view.scenario}, {view.state}"
                      + (f", ends {iso(view.deadline)}" if view.deadline and view.state == "running" else "")
                      + (f" ({view.note})" if view.note else ""))
        for p in view.players:
            ctx.out.print(f"  {p['handle']:<20} {'submitted' if p['submitted'] else 'working'}"
                          + (f"  score {p['score']:g}" if p["score"] is not None else ""))
    return 0
