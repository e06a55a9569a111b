"""The arena: matches between players, each with a real VM of their own, scored by the scenario, rated by ELO.

A scenario is a directory (``ussycode/arena/<name>/scenario.toml``; an operator's ``<data-dir>/arena/<name>``
wins): ``description``, ``players`` ``[min, max]``, ``duration`` (``15m``), ``player_setup`` (run in each
player's VM), ``target_setup`` (run in the match's target VM), ``probes`` (paths the server requests from port
8080 of each player's VM when the match ends) and ``scorer`` (Python run in the target VM: it reads ``{"players":
{handle: {"probes": [{"path","status","body"}], "seconds": n|null}}}`` on stdin and prints ``{handle: score}``).

Lifecycle: ``open`` (players join; the match starts when its seats are filled, or when its creator says
``arena start``) → ``running`` (VMs ``<match>-<handle>`` and ``<match>-target`` made outside quotas, setups run;
players work and ``arena submit``) → at the deadline, or once every player submitted, ``scoring`` → ``done`` (scores
stored, ratings moved: 1200 to start, K=32, pairwise) or ``no_contest`` (the scorer crashed or printed nonsense:
ratings unchanged). A player who leaves a running match scores 0. The match's VMs are removed at the end.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ussycode import durations
from ussycode.auth.identity import Actor
from ussycode.errors import Conflict, NotFound, StateError, UsageError
from ussycode.services import arena_ratings as ratings
from ussycode.services.arena_rules import Scenario, load_scenario, parse_scores
from ussycode.services.catalog import NAME_RE, item_dir, item_dirs
from ussycode.services.container import Services
from ussycode.store import users as userq
from ussycode.store.schema import arena_matches, arena_players, users, utcnow
from ussycode.tasks import TaskGroup

log = logging.getLogger(__name__)
PACKAGED = Path(__file__).resolve().parent.parent / "arena"
MARKER = "scenario.toml"
PROBE_BYTES = 64 * 1024


def _match_row(c: sa.Connection, match_id: str, hint: str = "") -> Any:
    """The match's row, or NotFound (``hint`` ends the message)."""
    m = c.execute(sa.select(arena_matches).where(arena_matches.c.id == match_id)).first()
    if m is None:
        raise NotFound(f"no match {match_id[:20]!r}{hint}")
    return m


@dataclass
class MatchView:
    id: str
    scenario: str
    state: str
    seats: int
    creator: str
    players: list[dict[str, Any]]
    deadline: dt.datetime | None
    note: str


class Arena:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.tasks = TaskGroup("arena")
        self._finishing: set[str] = set()

    # --- scenarios ----------------------------------------------------------------------------------------------
    def _dirs(self) -> list[Path]:
        return [PACKAGED, Path(self.services.settings.data_dir) / "arena"]

    def scenarios(self) -> dict[str, Scenario]:
        found: dict[str, Scenario] = {}
        for name, directory in item_dirs(self._dirs(), MARKER).items():
            try:
                found[name] = load_scenario(directory)
            except UsageError:
                continue
        return found

    def scenario(self, name: str) -> Scenario:
        if not NAME_RE.fullmatch(name):
            raise UsageError(f"invalid scenario name {name[:40]!r}")
        directory = item_dir(self._dirs(), name, MARKER)
        if directory is None:
            raise NotFound(f"no scenario {name!r}; see 'arena scenarios'")
        return load_scenario(directory)

    # --- matches ------------------------------------------------------------------------------------------------
    async def create(self, actor: Actor, scenario: str, seats: int | None = None) -> str:
        spec = self.scenario(scenario)
        low, high = spec.players
        seats = low if seats is None else seats
        if not low <= seats <= high:
            raise UsageError(f"{scenario} is for {low} to {high} players")
        match_id = "m" + secrets.token_hex(3)
        now = utcnow()

        def tx(c: sa.Connection) -> None:
            c.execute(arena_matches.insert().values(id=match_id, scenario=scenario, creator_id=actor.id, seats=seats,
                                                    state="open", created_at=now))
            c.execute(arena_players.insert().values(match_id=match_id, user_id=actor.id, joined_at=now))

        await self.services.store.write(tx)
        return match_id

    async def join(self, actor: Actor, match_id: str) -> bool:
        """Take a seat; True when it was the last one (the match starts). One transaction: seats never overfill."""

        def tx(c: sa.Connection) -> bool:
            m = _match_row(c, match_id, "; see 'arena list'")
            if m.state != "open":
                raise StateError(f"match {match_id} is {m.state}, not open")
            taken = [r.user_id for r in c.execute(sa.select(arena_players.c.user_id).where(
                arena_players.c.match_id == match_id))]
            if actor.id in taken:
                raise Conflict(f"you are already in match {match_id}")
            if len(taken) >= m.seats:
                raise Conflict(f"match {match_id} is full")
            c.execute(arena_players.insert().values(match_id=match_id, user_id=actor.id, joined_at=utcnow()))
            return bool(len(taken) + 1 == m.seats)

        full = await self.services.store.write(tx)
        if full:
            await self.start(match_id)
        return full

    async def leave(self, actor: Actor, match_id: str) -> None:
        def tx(c: sa.Connection) -> str:
            m = _match_row(c, match_id)
            mine = arena_players.c.match_id == match_id, arena_players.c.user_id == actor.id
            if c.execute(sa.select(arena_players.c.user_id).where(*mine)).first() is None:
                raise NotFound(f"you are not in match {match_id}")
            if m.state == "open":
                c.execute(arena_players.delete().where(*mine))
                left = c.execute(sa.select(sa.func.count()).select_from(arena_players).where(
                    arena_players.c.match_id == match_id)).scalar_one()
                if not left:
                    c.execute(arena_matches.update().where(arena_matches.c.id == match_id).values(
                        state="cancelled", ended_at=utcnow(), note="everyone left"))
                return "open"
            if m.state == "running":
                # gone from a running match: it forfeits (scores 0 and counts as submitted)
                c.execute(arena_players.update().where(*mine).values(submitted_at=utcnow(), score=-1.0))
                return "running"
            raise StateError(f"match {match_id} is {m.state}")

        if await self.services.store.write(tx) == "running":
            await self._maybe_finish(match_id)

    async def start(self, match_id: str) -> None:
        spec, _ = await self._match_spec(match_id)
        now = utcnow()
        deadline = now + durations.parse_duration(spec.duration)

        def tx(c: sa.Connection) -> bool:
            return bool(c.execute(arena_matches.update().where(arena_matches.c.id == match_id,
                                                               arena_matches.c.state == "open")
                                  .values(state="running", started_at=now, deadline=deadline)).rowcount)

        if await self.services.store.write(tx):
            await self._provision(match_id, spec)
            self.tasks.spawn(self._deadline(match_id, deadline), f"deadline {match_id}")

    async def _match_spec(self, match_id: str) -> tuple[Scenario, Any]:
        m = await self.services.store.read(lambda c: _match_row(c, match_id))
        return self.scenario(m.scenario), m

    async def _players(self, match_id: str) -> list[Any]:
        return await self.services.store.read(lambda c: list(c.execute(
            sa.select(arena_players, users.c.handle).select_from(arena_players.join(users, users.c.id ==
                                                                                    arena_players.c.user_id))
            .where(arena_players.c.match_id == match_id).order_by(arena_players.c.joined_at))))

    async def _actor(self, user_id: str) -> Actor:
        user = await self.services.store.read(lambda c: userq.by_id(c, user_id))
        assert user is not None
        return Actor(user=user, source="arena")

    async def _run(self, vm_name: str, script: str, stdin: bytes = b"", timeout: float = 300) -> tuple[int, str]:
        vm = await self.services.vms.by_name(vm_name)
        if vm is None or not script:
            return 0, ""
        r = await self.services.vms.runtime.exec(vm.id, ["sh", "-c", script], stdin=stdin, timeout=timeout)
        return r.exit_status, r.stdout.decode(errors="replace")

    async def _provision(self, match_id: str, spec: Scenario) -> None:
        """A VM per player and the target VM, all outside quotas; the setups run in them."""
        _, m = await self._match_spec(match_id)
        players = await self._players(match_id)
        made = [(p.user_id, f"{match_id}-{p.handle}", spec.player_setup) for p in players]
        made.append((m.creator_id, f"{match_id}-target", spec.target_setup))

        async def one(user_id: str, name: str, setup: str) -> None:
            actor = await self._actor(user_id)
            await self.services.vms.create(actor, name=name, image=spec.image, env={"USSYCODE_ARENA": match_id},
                                           arena=True)
            code, _ = await self._run(name, setup)
            if code != 0:
                log.warning("arena %s: setup of %s exited %d", match_id, name, code)

        results = await asyncio.gather(*(one(*x) for x in made), return_exceptions=True)
        failed = [str(r) for r in results if isinstance(r, BaseException)]
        if failed:
            await self._end(match_id, "no_contest", f"could not make the match's VMs: {failed[0][:200]}")

    async def _deadline(self, match_id: str, deadline: dt.datetime) -> None:
        await asyncio.sleep(max(0.0, (deadline - utcnow()).total_seconds()))
        await self.finish(match_id)

    async def submit(self, actor: Actor, match_id: str) -> None:
        def tx(c: sa.Connection) -> None:
            m = _match_row(c, match_id)
            if m.state != "running":
                raise StateError(f"match {match_id} is {m.state}, not running")
            n = c.execute(arena_players.update().where(arena_players.c.match_id == match_id,
                                                       arena_players.c.user_id == actor.id,
                                                       arena_players.c.submitted_at.is_(None))
                          .values(submitted_at=utcnow())).rowcount
            if not n:
                raise Conflict(f"you are not playing in match {match_id}, or you submitted already")

        await self.services.store.write(tx)
        await self._maybe_finish(match_id)

    async def _maybe_finish(self, match_id: str) -> None:
        players = await self._players(match_id)
        if players and all(p.submitted_at is not None for p in players):
            await self.finish(match_id)

    async def _probe(self, vm_name: str, path: str) -> dict[str, Any]:
        vm = await self.services.vms.by_name(vm_name)
        if vm is None:
            return {"path": path, "status": 0, "body": ""}
        try:
            reader, writer = await asyncio.wait_for(self.services.vms.runtime.open_connection(vm.id, 8080), 5)
        except Exception:  # noqa: BLE001 - nothing listens: the probe says so
            return {"path": path, "status": 0, "body": ""}
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            await writer.drain()
            raw = await asyncio.wait_for(self._read_all(reader), 10)
        except (OSError, TimeoutError):
            raw = b""
        finally:
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        parts = head.split(b" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        return {"path": path, "status": status, "body": body.decode(errors="replace")}

    @staticmethod
    async def _read_all(reader: asyncio.StreamReader) -> bytes:
        """The whole answer (an HTTP/1.0 request: the app closes when done), at most PROBE_BYTES."""
        data = b""
        while len(data) < PROBE_BYTES:
            chunk = await reader.read(PROBE_BYTES - len(data))
            if not chunk:
                break
            data += chunk
        return data

    async def finish(self, match_id: str) -> None:
        """Score the match (once), update ratings, remove its VMs."""
        if match_id in self._finishing:
            return
        self._finishing.add(match_id)
        try:
            moved = await self.services.store.write(lambda c: c.execute(
                arena_matches.update().where(arena_matches.c.id == match_id, arena_matches.c.state == "running")
                .values(state="scoring")).rowcount)
            if not moved:
                return
            spec, m = await self._match_spec(match_id)
            players = await self._players(match_id)
            doc: dict[str, Any] = {"players": {}}
            for p in players:
                seconds = (p.submitted_at - m.started_at).total_seconds() if p.submitted_at and m.started_at else None
                probes = [await self._probe(f"{match_id}-{p.handle}", path) for path in spec.probes]
                doc["players"][p.handle] = {"probes": probes, "seconds": seconds, "forfeit": p.score == -1.0}
            code, out = await self._score(match_id, spec, doc)
            scores = parse_scores(out, [p.handle for p in players]) if code == 0 else None
            if scores is None:
                await self._end(match_id, "no_contest", f"the scorer failed (exit {code}): {out[-200:]}")
                return
            for p in players:
                if p.score == -1.0:
                    scores[p.handle] = 0.0
            await self._rate(match_id, players, scores)
        except Exception as exc:
            log.exception("arena %s: scoring failed", match_id)
            await self._end(match_id, "no_contest", f"scoring failed: {exc}"[:300])
        finally:
            self._finishing.discard(match_id)
            await self._remove_vms(match_id)

    async def _score(self, match_id: str, spec: Scenario, doc: dict[str, Any]) -> tuple[int, str]:
        """The scorer runs in the target VM, the probes' results on its stdin (its source as a file first)."""
        name = f"{match_id}-target"
        code, _ = await self._run(name, "cat > /tmp/ussycode-scorer.py", stdin=spec.scorer.encode(), timeout=30)
        if code != 0:
            return code, "could not install the scorer"
        return await self._run(name, "python3 /tmp/ussycode-scorer.py", stdin=json.dumps(doc).encode(), timeout=120)

    async def _rate(self, match_id: str, players: list[Any], scores: dict[str, float]) -> None:
        await self.services.store.write(lambda c: ratings.record(c, match_id, players, scores))

    async def _end(self, match_id: str, state: str, note: str) -> None:
        await self.services.store.write(lambda c: c.execute(arena_matches.update().where(
            arena_matches.c.id == match_id).values(state=state, ended_at=utcnow(), note=note[:300])))

    async def _remove_vms(self, match_id: str) -> None:
        for vm in await self.services.store.read(lambda c: list(c.execute(
                sa.text("SELECT name, owner_id FROM vms WHERE name LIKE :p"), {"p": f"{match_id}-%"}))):
            try:
                await self.services.vms.remove(await self._actor(vm.owner_id), vm.name)
            except Exception:  # noqa: BLE001 - keep removing the others
                log.exception("arena %s: could not remove %s", match_id, vm.name)

    async def resume(self) -> None:
        """After a (re)start: running matches get their deadline back (an overdue one is scored now), and a match
        that was being scored when the server stopped is scored again."""
        rows = await self.services.store.read(lambda c: list(c.execute(sa.select(
            arena_matches.c.id, arena_matches.c.deadline).where(arena_matches.c.state.in_(("running", "scoring"))))))
        for match_id, deadline in rows:
            await self.services.store.write(self._reopen(match_id))
            self.tasks.spawn(self._deadline(match_id, deadline or utcnow()), f"deadline {match_id}")

    @staticmethod
    def _reopen(match_id: str) -> Any:
        def tx(c: sa.Connection) -> None:
            c.execute(arena_matches.update().where(arena_matches.c.id == match_id).values(state="running"))

        return tx

    # --- views --------------------------------------------------------------------------------------------------
    async def view(self, match_id: str) -> MatchView:
        _, m = await self._match_spec(match_id)
        creator = await self.services.store.read(lambda c: userq.by_id(c, m.creator_id))
        players = [{"handle": p.handle, "submitted": p.submitted_at is not None,
                    "score": None if p.score is None or p.score == -1.0 else p.score,
                    "forfeit": p.score == -1.0, "rating_before": p.rating_before, "rating_after": p.rating_after}
                   for p in await self._players(match_id)]
        return MatchView(m.id, m.scenario, m.state, m.seats, creator.handle if creator else "?", players,
                         m.deadline, m.note)

    async def matches(self, states: tuple[str, ...]) -> list[MatchView]:
        ids = await self.services.store.read(lambda c: [r[0] for r in c.execute(
            sa.select(arena_matches.c.id).where(arena_matches.c.state.in_(states))
            .order_by(arena_matches.c.created_at.desc()).limit(100))])
        return [await self.view(i) for i in ids]

    async def history(self, actor: Actor) -> list[MatchView]:
        ids = await self.services.store.read(lambda c: [r[0] for r in c.execute(
            sa.select(arena_matches.c.id).join(arena_players, arena_players.c.match_id == arena_matches.c.id)
            .where(arena_players.c.user_id == actor.id,
                   arena_matches.c.state.in_(("done", "no_contest", "cancelled")))
            .order_by(arena_matches.c.created_at.desc()).limit(100))])
        return [await self.view(i) for i in ids]

    async def standing(self, actor: Actor) -> dict[str, Any]:
        """The player's rating and rank (rank None before a first rated match), and the instance's match count."""
        return await self.services.store.read(lambda c: ratings.standing(c, actor.id))

    async def leaderboard(self, limit: int = 50) -> list[dict[str, Any]]:
        return await self.services.store.read(lambda c: ratings.leaderboard(c, limit))
