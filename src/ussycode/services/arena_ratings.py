"""The arena's ratings in the database: a finished match's scores and rating moves, a player's standing, the
leaderboard (each a function of a connection, run in the store's transaction)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from ussycode.services.arena_rules import START_RATING, elo
from ussycode.store.schema import arena_matches, arena_players, arena_ratings, users, utcnow


def record(c: sa.Connection, match_id: str, players: list[Any], scores: dict[str, float]) -> None:
    """Store the scores, move every player's rating (pairwise ELO) and mark the match done."""
    by_handle = {p.handle: p.user_id for p in players}
    before = {}
    for handle, uid in by_handle.items():
        r = c.execute(sa.select(arena_ratings.c.rating).where(arena_ratings.c.user_id == uid)).scalar()
        before[handle] = float(r) if r is not None else START_RATING
    after = elo(before, scores)
    for handle, uid in by_handle.items():
        c.execute(arena_ratings.delete().where(arena_ratings.c.user_id == uid))
        played = c.execute(sa.select(sa.func.count()).select_from(arena_players).join(
            arena_matches, arena_matches.c.id == arena_players.c.match_id).where(
            arena_players.c.user_id == uid, arena_matches.c.state == "done")).scalar_one()
        c.execute(arena_ratings.insert().values(user_id=uid, rating=after[handle], matches=played + 1))
        c.execute(arena_players.update().where(arena_players.c.match_id == match_id, arena_players.c.user_id == uid)
                  .values(score=scores[handle], rating_before=before[handle], rating_after=after[handle]))
    c.execute(arena_matches.update().where(arena_matches.c.id == match_id).values(state="done", ended_at=utcnow()))


def standing(c: sa.Connection, user_id: str) -> dict[str, Any]:
    mine = c.execute(sa.select(arena_ratings.c.rating, arena_ratings.c.matches).where(
        arena_ratings.c.user_id == user_id)).first()
    rank = None
    if mine is not None:
        rank = 1 + int(c.execute(sa.select(sa.func.count()).select_from(arena_ratings).where(
            arena_ratings.c.rating > mine.rating)).scalar_one())
    played = int(c.execute(sa.select(sa.func.count()).select_from(arena_matches).where(
        arena_matches.c.state == "done")).scalar_one())
    live = int(c.execute(sa.select(sa.func.count()).select_from(arena_matches).where(
        arena_matches.c.state.in_(("open", "running", "scoring")))).scalar_one())
    return {"rating": round(mine.rating, 1) if mine else START_RATING, "rank": rank,
            "matches": mine.matches if mine else 0, "instance_matches": played, "live_matches": live}


def leaderboard(c: sa.Connection, limit: int) -> list[dict[str, Any]]:
    rows = c.execute(sa.select(users.c.handle, arena_ratings.c.rating, arena_ratings.c.matches)
                     .select_from(arena_ratings.join(users, users.c.id == arena_ratings.c.user_id))
                     .order_by(arena_ratings.c.rating.desc(), users.c.handle).limit(limit))
    return [{"rank": i + 1, "handle": r.handle, "rating": round(r.rating, 1), "matches": r.matches}
            for i, r in enumerate(rows)]
