"""Shared by the benchmark scripts: result files and the printed table.

Every figure is reported with the baseline measured in the same run and their ratio, so numbers from machines
of different speed stay comparable. A result file is ``bench/results/<name>.json``::

    {"name": "...", "when": "...", "rows": [{"metric", "value", "unit", "baseline", "baseline_value",
                                            "ratio", "goal", "met"}], "notes": [...]}
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def row(metric: str, value: float, unit: str, baseline: str, baseline_value: float, goal: str = "",
        met: bool | None = None) -> dict[str, Any]:
    ratio = value / baseline_value if baseline_value else float("nan")
    return {"metric": metric, "value": round(value, 4), "unit": unit, "baseline": baseline,
            "baseline_value": round(baseline_value, 4), "ratio": round(ratio, 3), "goal": goal, "met": met}


def write(name: str, rows: list[dict[str, Any]], notes: list[str] | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"name": name, "when": dt.datetime.now(dt.UTC).isoformat(), "rows": rows,
                                "notes": notes or []}, indent=2))
    print_table([json.loads(path.read_text())])
    return path


def print_table(results: list[dict[str, Any]]) -> None:
    header = f"{'benchmark':<14} {'metric':<44} {'value':>12} {'baseline':>12} {'ratio':>7}  goal"
    print(header)
    print("-" * len(header))
    for res in results:
        for r in res.get("rows", []):
            met = "" if r.get("met") is None else (" ok" if r["met"] else " MISSED")
            print(f"{res['name']:<14} {r['metric'][:44]:<44} {r['value']:>10.3f}{r['unit'][:2]:<2} "
                  f"{r['baseline_value']:>10.3f}{r['unit'][:2]:<2} {r['ratio']:>7.2f}  {r.get('goal', '')}{met}")
        for note in res.get("notes", []):
            print(f"{'':<14} note: {note}")
