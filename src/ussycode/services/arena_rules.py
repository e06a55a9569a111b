"""The arena's pure rules: what a scenario file holds, what a scorer must print, and how ratings move (ELO, 1200
to start, K=32)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ussycode import durations
from ussycode.errors import UsageError

START_RATING, K = 1200.0, 32.0


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    description: str = Field(max_length=500)
    players: tuple[int, int] = (2, 8)
    duration: str = "15m"
    image: str | None = None
    player_setup: str = ""
    target_setup: str = ""
    probes: list[str] = Field(default_factory=list, max_length=10)
    scorer: str


def load_scenario(directory: Path) -> Scenario:
    try:
        spec = Scenario(**tomllib.loads((directory / "scenario.toml").read_text(encoding="utf-8")))
    except (OSError, tomllib.TOMLDecodeError, ValidationError, TypeError) as exc:
        raise UsageError(f"scenario {directory.name} is broken: {str(exc).splitlines()[0][:200]}") from None
    low, high = spec.players
    if not 2 <= low <= high <= 8:
        raise UsageError(f"scenario {directory.name}: players must be within 2..8")
    durations.parse_duration(spec.duration)
    return spec


def elo(ratings: dict[str, float], scores: dict[str, float]) -> dict[str, float]:
    """New ratings after one match: every pair of players is a game (win 1, tie 0.5), from the ratings before."""
    new = dict(ratings)
    for a in scores:
        for b in scores:
            if a == b:
                continue
            expected = 1.0 / (1.0 + 10 ** ((ratings[b] - ratings[a]) / 400.0))
            actual = 1.0 if scores[a] > scores[b] else 0.5 if scores[a] == scores[b] else 0.0
            new[a] += K * (actual - expected)
    return new


def parse_scores(out: str, handles: list[str]) -> dict[str, float] | None:
    """The scorer's last line, ``{handle: score}`` for exactly ``handles`` (None: the match is no contest)."""
    try:
        doc = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    if not isinstance(doc, dict) or set(doc) != set(handles):
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in doc.values()):
        return None
    return {k: float(v) for k, v in doc.items()}
