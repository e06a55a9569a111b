"""Items shipped with ussycode that an operator can replace or add to (VM templates, arena scenarios).

An item is a directory named like :data:`NAME_RE` that holds a marker file (``template.toml``, ``scenario.toml``),
under the packaged folder and then under the operator's folder in the data directory; the operator's directory of
the same name wins. Reading and checking an item's files is the caller's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


def item_dirs(bases: Sequence[Path], marker: str) -> dict[str, Path]:
    """Every item's directory by name: the first base's in name order, then the later bases' new ones, a later
    base's directory replacing an earlier one of the same name in place."""
    found: dict[str, Path] = {}
    for base in bases:
        if base.is_dir():
            for d in sorted(base.iterdir()):
                if d.is_dir() and NAME_RE.fullmatch(d.name) and (d / marker).is_file():
                    found[d.name] = d
    return found


def item_dir(bases: Sequence[Path], name: str, marker: str) -> Path | None:
    """The directory of item ``name`` (the last base that has it), or None. ``name`` must match NAME_RE."""
    for base in reversed(bases):
        if (base / name / marker).is_file():
            return base / name
    return None
